"""One record's schema per stage (README: "Data"): a raw row -> the stage's normalised record, or BadRecord.

Good records are normalised to one schema per stage (the `question` field is a list in stage1 and a
string elsewhere, which Arrow cannot mix), whatever the source kind they came from.
"""

from __future__ import annotations

import json

import datasets

from clara.stages import Stage

DOC_FIELDS = ("docs", "context", "content")
ANSWER_FIELDS = ("answers", "answer", "gold_answer", "golden_answers")
MAX_REPORTED_ERRORS = 20

FEATURES = {
    "stage1": datasets.Features(
        {
            "data_type": datasets.Value("string"),
            "questions": datasets.Sequence(datasets.Value("string")),
            "answers": datasets.Sequence(datasets.Value("string")),
            "docs": datasets.Sequence(datasets.Value("string")),
        }
    ),
    "answer": datasets.Features(
        {
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),  # the first gold answer: trained on, and scored as in the paper
            "answers": datasets.Sequence(datasets.Value("string")),  # every gold answer, for the *_any metrics
            "docs": datasets.Sequence(datasets.Value("string")),
            "pos_index": datasets.Sequence(datasets.Value("int64")),
            "has_pos_index": datasets.Value("bool"),
            "gold_ids": datasets.Sequence(datasets.Value("string")),  # open-corpus evaluation: the ids of the positives
            "has_gold_ids": datasets.Value("bool"),
        }
    ),
}


class BadRecord(ValueError):
    pass


def _describe(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _pick(obj: dict, names: tuple[str, ...], required: bool = True):
    for name in names:
        if name in obj:
            return name, obj[name]
    if required:
        raise BadRecord(f"field '{names[0]}': expected one of {', '.join(names)}, got nothing")
    return None, None


def _string(name: str, value) -> str:
    if not isinstance(value, str):
        raise BadRecord(f"field '{name}': expected a string, got {_describe(value)}")
    return value


def _string_list(name: str, value, allow_string: bool = False) -> list[str]:
    if allow_string and isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRecord(f"field '{name}': expected a list of strings, got {_describe(value)}")
    return value


def _docs(obj: dict) -> list[str]:
    name, value = _pick(obj, DOC_FIELDS)
    docs = _string_list(name, value, allow_string=name != "docs")
    if not docs:
        raise BadRecord(f"field '{name}': expected at least one document, got an empty list")
    return docs


def _gold_answers(obj: dict) -> list[str]:
    """Every gold answer: a string is one, a list holds several (the first is the one trained on)."""
    name, value = _pick(obj, ANSWER_FIELDS)
    if isinstance(value, list):
        if not value:
            raise BadRecord(f"field '{name}': expected a string or a non-empty list of strings, got []")
        return _string_list(name, value)
    return [_string(name, value)]


def _single_answer(obj: dict) -> str:
    return _gold_answers(obj)[0]


def normalise_stage1(obj: dict, min_docs: int = 1) -> dict:
    data_type = obj.get("data_type", "qa")
    docs = _docs(obj)
    if data_type == "paraphrase":
        return {"data_type": "paraphrase", "questions": [], "answers": [_single_answer(obj)], "docs": docs}
    if data_type != "qa":
        raise BadRecord(f'field \'data_type\': expected "qa" or "paraphrase", got {_describe(data_type)}')
    if "question" not in obj:
        raise BadRecord("field 'question': expected a list of strings, got nothing")
    questions = _string_list("question", obj["question"], allow_string=True)
    name, value = _pick(obj, ANSWER_FIELDS)
    answers = _string_list(name, value, allow_string=True)
    if not questions:
        raise BadRecord("field 'question': expected at least one question, got an empty list")
    if len(questions) != len(answers):
        raise BadRecord(f"field '{name}': expected {len(questions)} answers (one per question), got {len(answers)}")
    return {"data_type": "qa", "questions": questions, "answers": answers, "docs": docs}


def normalise_answer_record(obj: dict, min_docs: int = 1) -> dict:
    if "question" not in obj:
        raise BadRecord("field 'question': expected a string, got nothing")
    question = _string("question", obj["question"])
    answers = _gold_answers(obj)
    docs = _docs(obj)
    if len(docs) < min_docs:
        raise BadRecord(
            f"field 'docs': expected at least {min_docs} candidate documents (GENERATION_TOP_K), got {len(docs)}"
        )
    pos_index = obj.get("pos_index")
    if pos_index is not None:
        if isinstance(pos_index, int) and not isinstance(pos_index, bool):
            pos_index = [pos_index]
        if not isinstance(pos_index, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in pos_index
        ):
            raise BadRecord(f"field 'pos_index': expected a list of integers, got {_describe(pos_index)}")
        bad = [i for i in pos_index if not 0 <= i < len(docs)]
        if bad:
            raise BadRecord(f"field 'pos_index': expected indices in 0..{len(docs) - 1}, got {bad}")
    gold_ids = _gold_ids(obj.get("gold_ids"))
    return {
        "question": question,
        "answer": answers[0],
        "answers": answers,
        "docs": docs,
        "pos_index": pos_index or [],
        "has_pos_index": pos_index is not None,
        "gold_ids": gold_ids or [],
        "has_gold_ids": gold_ids is not None,
    }


def _gold_ids(value) -> list[str] | None:
    """The ids of a record's positive documents in a corpus index (strings or integers), None when absent."""
    if value is None:
        return None
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
        raise BadRecord(f"field 'gold_ids': expected a list of document ids, got {_describe(value)}")
    return [str(v) for v in value]


NORMALISERS = {"stage1": normalise_stage1, "answer": normalise_answer_record}


def normalise(stage: Stage, obj, min_docs: int = 1) -> dict:
    """One record in the stage's schema, or BadRecord saying what is wrong."""
    if not isinstance(obj, dict):
        raise BadRecord(f"expected a JSON object, got {_describe(obj)}")
    return NORMALISERS[stage.schema](obj, min_docs)


def _utf8_problem(raw: bytes, error: UnicodeDecodeError) -> str:
    """Name the field that holds the invalid bytes when the rest of the line is a JSON object."""
    try:
        obj = json.loads(raw.decode("utf-8", errors="surrogateescape"))
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        for name, value in obj.items():
            texts = value if isinstance(value, list) else [value]
            if any(isinstance(t, str) and any("\udc80" <= c <= "\udcff" for c in t) for t in texts):
                return f"field '{name}': expected valid UTF-8 text, got invalid bytes (byte {error.start} of the line)"
    return f"not valid UTF-8 (byte {error.start} of the line)"


def parse_line(stage: Stage, raw: bytes, min_docs: int) -> dict:
    """One JSON line (bytes) -> the stage's record, or BadRecord naming what is wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadRecord(_utf8_problem(raw, error)) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as error:
        raise BadRecord(f"not valid JSON ({error.msg}, column {error.colno})") from None
    return normalise(stage, obj, min_docs)


def parse_row(stage: Stage, row: bytes | str | dict, min_docs: int) -> dict:
    """A row of any source kind (a JSON line as bytes or text, or a table row as a dict) -> the stage's record."""
    if isinstance(row, dict):
        return normalise(stage, row, min_docs)
    return parse_line(stage, row.encode("utf-8") if isinstance(row, str) else row, min_docs)
