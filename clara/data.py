"""JSON Lines reading and validation per stage (README: "Data").

Every line is checked before training starts; good records are normalised to one schema per stage
(the `question` field is a list in stage1 and a string elsewhere, which Arrow cannot mix) and
stored with `datasets` (Arrow, memory-mapped), so large files do not have to fit in memory.
A configuration of a Hub data set, `hf:NAME:CONFIG[:SPLIT]`, is read row by row through `datasets` and
gets the same checks (see the section at the end).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import datasets
import huggingface_hub

from clara.config import HUB_PREFIX, HubSource, parse_hub_source, split_paths
from clara.errors import DataError
from clara.stages import Stage, get_stage

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
        "answer": datasets.Value("string"),  # the first gold answer: trained on, and scored as in the paper
        "answers": datasets.Sequence(datasets.Value("string")),  # every gold answer, for the *_any metrics
        "docs": datasets.Sequence(datasets.Value("string")),
        "pos_index": datasets.Sequence(datasets.Value("int64")),
        "has_pos_index": datasets.Value("bool"),
    }),
}


class BadRecord(ValueError):
    pass


@dataclass
class LoadReport:
    # (file, line, reason, raw text); for a Hub data set (hf:NAME:CONFIG:SPLIT, row index, reason, row as JSON)
    rejected: list[tuple[str, int, str, str]] = field(default_factory=list)

    def messages(self) -> list[str]:
        return [f"{path} row {line}: {reason}" if path.startswith(HUB_PREFIX) else f"{path}:{line}: {reason}"
                for path, line, reason, _ in self.rejected]


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
    answers = _gold_answers(obj)
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
    return {"question": question, "answer": answers[0], "answers": answers, "docs": docs,
            "pos_index": pos_index or [], "has_pos_index": pos_index is not None}


NORMALISERS = {"stage1": normalise_stage1, "answer": normalise_answer_record}


def normalise(stage: Stage, obj, min_docs: int = 1) -> dict:
    """One record in the stage's schema, or BadRecord saying what is wrong."""
    if not isinstance(obj, dict):
        raise BadRecord(f"expected a JSON object, got {_describe(obj)}")
    return NORMALISERS[stage.schema](obj, min_docs)


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


def parse_line(stage: Stage, raw: bytes, min_docs: int) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadRecord(_utf8_problem(raw, error)) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as error:
        raise BadRecord(f"not valid JSON ({error.msg}, column {error.colno})") from None
    return normalise(stage, obj, min_docs)


def scan(stage: Stage, paths: list[str], min_docs: int = 1,
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


def _handle_rejected(report: LoadReport, good: int, stage: Stage, dataset: str, bad_samples: str,
                     rejected_path: str | None, log) -> None:
    """Raise DataError naming the bad records, or (bad_samples == "skip") write them and say how many."""
    if report.rejected:
        messages = report.messages()
        if bad_samples != "skip":
            shown = "\n".join(messages[:MAX_REPORTED_ERRORS])
            more = len(messages) - MAX_REPORTED_ERRORS
            tail = f"\n... and {more} more bad lines" if more > 0 else ""
            raise DataError(f"{len(messages)} bad record(s) in {dataset} ({stage.name}):\n{shown}{tail}\n"
                            "Fix them, or set BAD_SAMPLES=skip (--bad_samples skip) to train on the rest.")
        if rejected_path:
            os.makedirs(os.path.dirname(os.path.abspath(rejected_path)), exist_ok=True)
            with open(rejected_path, "w", encoding="utf-8") as out:
                for path, number, reason, raw in report.rejected:
                    where = ({"dataset": path, "row": number} if path.startswith(HUB_PREFIX)
                             else {"file": path, "line": number})
                    out.write(json.dumps({**where, "reason": reason, "text": raw}, ensure_ascii=False) + "\n")
        log(f"Skipped {len(report.rejected)} bad record(s) of {dataset}"
            + (f"; written to {rejected_path}" if rejected_path else ""))
    if good == 0:
        raise DataError(f"{dataset}: no usable {stage.name} records")


def _generate(stage_name: str, paths: list[str], min_docs: int, bad_lines: str, fingerprint: list) -> Iterator[dict]:
    del fingerprint  # only part of the cache key: a changed file gets a new Arrow cache
    stage = get_stage(stage_name)  # by name: the Arrow cache key hashes these arguments
    skip = {tuple(line) for line in json.loads(bad_lines)}
    for path, number, raw in iter_lines(paths):
        if (path, number) not in skip:
            yield parse_line(stage, raw, min_docs)


def load_records(stage: Stage, dataset: str, bad_samples: str = "error", min_docs: int = 1,
                 rejected_path: str | None = None, max_samples: int | None = None,
                 log=print, make_check: Callable[[], Callable[[dict], str | None]] | None = None) -> datasets.Dataset:
    """Validate and load one stage's JSONL file(s) into an Arrow-backed dataset.

    make_check() returns a check for what the schema cannot see in a normalised record (a decoder
    input over MAX_LEN); it is called only once no record breaks the schema (or with skip), since
    making it may be costly (loading a tokenizer).
    Raises DataError naming the bad lines, unless bad_samples == "skip", in which case the bad
    lines are written to rejected_path and the good ones are loaded.
    """
    if dataset.startswith(HUB_PREFIX):
        return load_hub_records(stage, parse_hub_source(dataset, "dataset"), bad_samples, min_docs, rejected_path,
                                max_samples, log)
    paths = split_paths(dataset)
    good, report = scan(stage, paths, min_docs)
    if make_check is not None and (bad_samples == "skip" or not report.rejected):
        good, report = scan(stage, paths, min_docs, make_check())
    _handle_rejected(report, good, stage, dataset, bad_samples, rejected_path, log)
    fingerprint = [(os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns) for p in paths]
    features = FEATURES[stage.schema]
    records = datasets.Dataset.from_generator(
        _generate, features=features,
        gen_kwargs={"stage_name": stage.name, "paths": paths, "min_docs": min_docs, "fingerprint": fingerprint,
                    # A string: datasets would read a list of another length than `paths` as shards.
                    "bad_lines": json.dumps([[path, line] for path, line, _, _ in report.rejected])})
    if max_samples is not None and max_samples < len(records):
        records = records.select(range(max_samples))
    return records


# -- Hub data sets: hf:NAME:CONFIG[:SPLIT] ------------------------------------------------------------------
# Each data file is read on its own, JSON lines as text: `datasets` would cast every file of a configuration
# to one inferred schema, and the official set has fields that are a string in some rows and a list in
# others, which that cast refuses. normalise() then brings each row to the stage's schema, as for JSONL.
JSON_LINES_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
TABLE_MODULES = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
HUB_FILE = re.compile(r"hf://datasets/(?:[^/@]+/)?[^/@]+@([^/]+)/(.+)")


def _config_files(source: HubSource, path: str) -> tuple[str, list[str]]:
    """The split and the data files of source's configuration, read from the README of `path`."""
    try:
        builder = datasets.load_dataset_builder(path, source.config)
    except (ValueError, FileNotFoundError, ConnectionError) as error:  # unknown configuration or data set, no network
        raise DataError(f"{source}: {error}") from None
    splits = builder.config.data_files or {}
    split = source.split
    if split is None:
        if len(splits) != 1:
            raise DataError(f"{source}: configuration {source.config!r} has the splits {', '.join(splits)}; "
                            f"name one: {source}:SPLIT")
        split = next(iter(splits))
    elif split not in splits:
        raise DataError(f"{source}: no split {split!r}; configuration {source.config!r} has {', '.join(splits)}")
    return split, list(splits[split])


def _snapshot(source: HubSource, offline: bool) -> str:
    """A local copy (the huggingface_hub cache under HF_HOME) of the README and this configuration's files."""
    try:
        if offline:
            return huggingface_hub.snapshot_download(source.name, repo_type="dataset", local_files_only=True)
        _, remote = _config_files(source, source.name)
        located = [HUB_FILE.fullmatch(url) for url in remote]
        revision = located[0].group(1) if located and located[0] else None
        return huggingface_hub.snapshot_download(
            source.name, repo_type="dataset", revision=revision,
            allow_patterns=["README.md", *(match.group(2) for match in located if match)])
    except huggingface_hub.errors.LocalEntryNotFoundError:
        raise DataError(f"{source}: not in the Hugging Face cache ({huggingface_hub.constants.HF_HUB_CACHE}) and "
                        "offline mode is on (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE): load it once online, "
                        "or give a local directory in the Hub layout") from None


def hub_files(source: HubSource, streaming: bool) -> tuple[str, list[str]]:
    """(hf:NAME:CONFIG:SPLIT, the data files in order): local files, or remote ones to stream when `streaming`.

    A Hub data set is first downloaded into the Hugging Face cache (only this configuration's files), except
    when streaming online; offline it must be in the cache already.
    """
    offline = datasets.config.HF_HUB_OFFLINE
    local = os.path.isdir(source.name) or (streaming and not offline)
    split, files = _config_files(source, source.name if local else _snapshot(source, offline))
    return str(HubSource(source.name, source.config, split)), files


def _file_rows(file: str) -> Iterator[str | dict]:
    """One data file's rows in order: JSON lines as their text, tables as dicts in the file's own schema."""
    name = file.lower()
    if name.endswith(JSON_LINES_SUFFIXES):
        lines = datasets.load_dataset("text", data_files=[file], split="train", streaming=True)
        return (line["text"] for line in lines if line["text"].strip())
    suffix = os.path.splitext(name)[1]
    if suffix not in TABLE_MODULES:
        raise DataError(f"{file}: unsupported data file; expected JSON lines or "
                        + ", ".join(TABLE_MODULES))
    rows = datasets.load_dataset(TABLE_MODULES[suffix], data_files=[file], split="train", streaming=True)
    # A null in a table column means that the row lacks the field.
    return ({key: value for key, value in row.items() if value is not None} for row in rows)


def iter_hub_rows(files: list[str] | tuple[str, ...]) -> Iterator[tuple[int, str | dict]]:
    """(row index in the configuration's split, row), file after file."""
    index = 0
    for file in files:
        for row in _file_rows(file):
            yield index, row
            index += 1


def _hub_record(stage: Stage, row: str | dict, min_docs: int) -> dict:
    return parse_line(stage, row.encode("utf-8"), min_docs) if isinstance(row, str) else normalise(stage, row, min_docs)


def scan_hub(stage: Stage, label: str, files: list[str], min_docs: int = 1,
             max_samples: int | None = None) -> tuple[int, LoadReport]:
    """Check the rows up to the max_samples-th good one (all without it); the good count and the bad rows."""
    report = LoadReport()
    good = 0
    for index, row in iter_hub_rows(files):
        try:
            _hub_record(stage, row, min_docs)
        except BadRecord as error:
            raw = row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)
            report.rejected.append((label, index, str(error), raw))
            continue
        good += 1
        if good == max_samples:
            break
    return good, report


def _generate_hub(stage_name: str, files: tuple[str, ...], min_docs: int, max_samples: int | None,
                  fingerprint: tuple) -> Iterator[dict]:
    del fingerprint  # only part of the cache key, as in _generate
    stage = get_stage(stage_name)
    good = 0
    for _, row in iter_hub_rows(files):
        try:
            record = _hub_record(stage, row, min_docs)
        except BadRecord:
            continue
        yield record
        good += 1
        if good == max_samples:
            return


def load_hub_records(stage: Stage, source: HubSource, bad_samples: str = "error", min_docs: int = 1,
                     rejected_path: str | None = None, max_samples: int | None = None,
                     log=print) -> datasets.Dataset:
    """load_records for one configuration of a Hub data set (or a local directory in the Hub layout).

    With max_samples only the rows up to the max_samples-th good one are read (streamed from the Hub when
    online), so a prefix of a set larger than the disk can be used; bad rows are named by row index.
    """
    label, files = hub_files(source, streaming=max_samples is not None)
    good, report = scan_hub(stage, label, files, min_docs, max_samples)
    _handle_rejected(report, good, stage, label, bad_samples, rejected_path, log)
    fingerprint = tuple((f, os.path.getsize(f), os.stat(f).st_mtime_ns) if os.path.isfile(f) else f for f in files)
    # Tuples, not lists: `datasets` would split list arguments into shards, each with its own max_samples.
    return datasets.Dataset.from_generator(
        _generate_hub, features=FEATURES[stage.schema],
        gen_kwargs={"stage_name": stage.name, "files": tuple(files), "min_docs": min_docs, "max_samples": max_samples,
                    "fingerprint": fingerprint})
