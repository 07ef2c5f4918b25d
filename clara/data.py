"""JSON Lines reading and validation per stage (spec section 3).

Every line is checked before training starts; good records are normalised to one schema per stage
(the `question` field is a list in stage1 and a string elsewhere, which Arrow cannot mix) and
stored with `datasets` (Arrow, memory-mapped), so large files do not have to fit in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import datasets

DOC_FIELDS = ("docs", "context", "content")
ANSWER_FIELDS = ("answers", "answer", "gold_answer", "golden_answers")
MAX_REPORTED_ERRORS = 20

FEATURES = {
    "stage1": datasets.Features({
        "data_type": datasets.Value("string"),
        "questions": datasets.Sequence(datasets.Value("string")),
        "answers": datasets.Sequence(datasets.Value("string")),
        "docs": datasets.Sequence(datasets.Value("string")),
    }),
    "answer": datasets.Features({
        "question": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "docs": datasets.Sequence(datasets.Value("string")),
        "pos_index": datasets.Sequence(datasets.Value("int64")),
        "has_pos_index": datasets.Value("bool"),
    }),
}


class DataError(ValueError):
    """Bad records; the message names every bad FILE:LINE (the first 20 and a count)."""


class BadRecord(ValueError):
    pass


@dataclass
class LoadReport:
    rejected: list[tuple[str, int, str, str]] = field(default_factory=list)  # (file, line, reason, raw text)

    def messages(self) -> list[str]:
        return [f"{path}:{line}: {reason}" for path, line, reason, _ in self.rejected]


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


def _single_answer(obj: dict) -> str:
    name, value = _pick(obj, ANSWER_FIELDS)
    if isinstance(value, list):
        if not value:
            raise BadRecord(f"field '{name}': expected a string or a non-empty list of strings, got []")
        value = value[0]
    return _string(name, value)


def normalise_stage1(obj: dict) -> dict:
    data_type = obj.get("data_type", "qa")
    docs = _docs(obj)
    if data_type == "paraphrase":
        return {"data_type": "paraphrase", "questions": [], "answers": [_single_answer(obj)], "docs": docs}
    if data_type != "qa":
        raise BadRecord(f"field 'data_type': expected \"qa\" or \"paraphrase\", got {_describe(data_type)}")
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
    answer = _single_answer(obj)
    docs = _docs(obj)
    if len(docs) < min_docs:
        raise BadRecord(f"field 'docs': expected at least {min_docs} candidate documents "
                        f"(GENERATION_TOP_K), got {len(docs)}")
    pos_index = obj.get("pos_index")
    if pos_index is not None:
        if isinstance(pos_index, int) and not isinstance(pos_index, bool):
            pos_index = [pos_index]
        if not isinstance(pos_index, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                      for i in pos_index):
            raise BadRecord(f"field 'pos_index': expected a list of integers, got {_describe(pos_index)}")
        bad = [i for i in pos_index if not 0 <= i < len(docs)]
        if bad:
            raise BadRecord(f"field 'pos_index': expected indices in 0..{len(docs) - 1}, got {bad}")
    return {"question": question, "answer": answer, "docs": docs, "pos_index": pos_index or [],
            "has_pos_index": pos_index is not None}


def normalise(stage: str, obj, min_docs: int = 1) -> dict:
    if not isinstance(obj, dict):
        raise BadRecord(f"expected a JSON object, got {_describe(obj)}")
    if stage == "stage1":
        return normalise_stage1(obj)
    return normalise_answer_record(obj, min_docs=min_docs if stage == "stage2" else 1)


def iter_lines(paths: list[str]) -> Iterator[tuple[str, int, bytes]]:
    for path in paths:
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if raw.strip():
                    yield path, number, raw


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
                return (f"field '{name}': expected valid UTF-8 text, got invalid bytes "
                        f"(byte {error.start} of the line)")
    return f"not valid UTF-8 (byte {error.start} of the line)"


def parse_line(stage: str, raw: bytes, min_docs: int) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadRecord(_utf8_problem(raw, error)) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as error:
        raise BadRecord(f"not valid JSON ({error.msg}, column {error.colno})") from None
    return normalise(stage, obj, min_docs)


def scan(stage: str, paths: list[str], min_docs: int = 1,
         check: Callable[[dict], str | None] | None = None) -> tuple[int, LoadReport]:
    """Check every line (and, with `check`, every normalised record); return the number of good records
    and the bad ones."""
    report = LoadReport()
    good = 0
    for path, number, raw in iter_lines(paths):
        try:
            record = parse_line(stage, raw, min_docs)
            problem = check(record) if check else None
            if problem:
                raise BadRecord(problem)
            good += 1
        except BadRecord as error:
            report.rejected.append((path, number, str(error), raw.decode("utf-8", errors="replace").rstrip("\n")))
    return good, report


def _generate(stage: str, paths: list[str], min_docs: int, bad_lines: str, fingerprint: list) -> Iterator[dict]:
    del fingerprint  # only part of the cache key: a changed file gets a new Arrow cache
    skip = {tuple(line) for line in json.loads(bad_lines)}
    for path, number, raw in iter_lines(paths):
        if (path, number) not in skip:
            yield parse_line(stage, raw, min_docs)


def split_paths(spec: str) -> list[str]:
    return [p.strip() for p in spec.split(",") if p.strip()]


def load_records(stage: str, dataset: str, bad_samples: str = "error", min_docs: int = 1,
                 rejected_path: str | None = None, max_samples: int | None = None,
                 log=print, make_check: Callable[[], Callable[[dict], str | None]] | None = None) -> datasets.Dataset:
    """Validate and load one stage's JSONL file(s) into an Arrow-backed dataset.

    make_check() returns a check for what the schema cannot see in a normalised record (a decoder
    input over MAX_LEN); it is called only once no record breaks the schema (or with skip), since
    making it may be costly (loading a tokenizer).
    Raises DataError naming the bad lines, unless bad_samples == "skip", in which case the bad
    lines are written to rejected_path and the good ones are loaded.
    """
    paths = split_paths(dataset)
    good, report = scan(stage, paths, min_docs)
    if make_check is not None and (bad_samples == "skip" or not report.rejected):
        good, report = scan(stage, paths, min_docs, make_check())
    if report.rejected:
        messages = report.messages()
        if bad_samples != "skip":
            shown = "\n".join(messages[:MAX_REPORTED_ERRORS])
            more = len(messages) - MAX_REPORTED_ERRORS
            tail = f"\n... and {more} more bad lines" if more > 0 else ""
            raise DataError(f"{len(messages)} bad record(s) in {dataset} ({stage}):\n{shown}{tail}\n"
                            "Fix them, or set BAD_SAMPLES=skip (--bad_samples skip) to train on the rest.")
        if rejected_path:
            os.makedirs(os.path.dirname(os.path.abspath(rejected_path)), exist_ok=True)
            with open(rejected_path, "w", encoding="utf-8") as out:
                for path, number, reason, raw in report.rejected:
                    out.write(json.dumps({"file": path, "line": number, "reason": reason, "text": raw},
                                         ensure_ascii=False) + "\n")
        log(f"Skipped {len(report.rejected)} bad record(s) of {dataset}"
            + (f"; written to {rejected_path}" if rejected_path else ""))
    if good == 0:
        raise DataError(f"{dataset}: no usable {stage} records")
    fingerprint = [(os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns) for p in paths]
    features = FEATURES["stage1" if stage == "stage1" else "answer"]
    records = datasets.Dataset.from_generator(
        _generate, features=features,
        gen_kwargs={"stage": stage, "paths": paths, "min_docs": min_docs, "fingerprint": fingerprint,
                    # A string: datasets would read a list of another length than `paths` as shards.
                    "bad_lines": json.dumps([[path, line] for path, line, _, _ in report.rejected])})
    if max_samples is not None and max_samples < len(records):
        records = records.select(range(max_samples))
    return records
