"""Reading and validating training data (README: "Data"), directly and through `python -m clara.train`."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clara.data.load import load_records
from clara.data.spec import parse_source
from clara.errors import DataError
from clara.stages import get_stage
from tests.helpers import REPO, subprocess_env

GOOD = {
    "stage1": {
        "question": ["What is the sacred animal of Vorlan?"],
        "answers": ["owl"],
        "docs": ["Vorlan is a kingdom. Its sacred animal is owl."],
    },
    "stage1_2": {
        "question": "What is the sacred animal of Vorlan?",
        "answer": "owl",
        "docs": ["Vorlan is a kingdom. Its sacred animal is owl.", "Seishon is a fortress."],
    },
    "stage2": {
        "question": "What is the sacred animal of Vorlan?",
        "gold_answer": "owl",
        "docs": ["Seishon is a fortress.", "Vorlan is a kingdom. Its sacred animal is owl.", "Fouldina."],
        "pos_index": [1],
    },
}
MIN_DOCS = {"stage1": 1, "stage1_2": 1, "stage2": 2}


def write_lines(path: Path, lines: list) -> str:
    """Objects become JSON lines; bytes are written as they are; str lines as UTF-8 text."""
    with open(path, "wb") as out:
        for line in lines:
            if isinstance(line, bytes):
                out.write(line + b"\n")
            elif isinstance(line, str):
                out.write(line.encode("utf-8") + b"\n")
            else:
                out.write(json.dumps(line).encode("utf-8") + b"\n")
    return str(path)


def load(stage: str, path: str, **kwargs):
    return load_records(get_stage(stage), parse_source(path), min_docs=MIN_DOCS[stage], log=lambda *a: None, **kwargs)


def with_(stage: str, **changes) -> dict:
    record = json.loads(json.dumps(GOOD[stage]))
    for key, value in changes.items():
        if value is ...:
            record.pop(key)
        else:
            record[key] = value
    return record


# (stage, bad line, the field the message names)
BAD_RECORDS = {
    "missing-question": ("stage1_2", with_("stage1_2", question=...), "question"),
    "missing-docs": ("stage1_2", with_("stage1_2", docs=...), "docs"),
    "missing-answer": ("stage2", with_("stage2", gold_answer=...), "answers"),
    "missing-stage1-question": ("stage1", with_("stage1", question=...), "question"),
    "question-not-a-string": ("stage1_2", with_("stage1_2", question=["a", "list"]), "question"),
    "answer-not-a-string": ("stage1_2", with_("stage1_2", answer=7), "answer"),
    "docs-not-strings": ("stage1_2", with_("stage1_2", docs=[1, 2]), "docs"),
    "stage1-question-not-a-list": ("stage1", with_("stage1", question={"q": 1}), "question"),
    "pos-index-not-integers": ("stage2", with_("stage2", pos_index=["1"]), "pos_index"),
    "data-type-unknown": ("stage1", with_("stage1", data_type="summary"), "data_type"),
    "empty-docs": ("stage1_2", with_("stage1_2", docs=[]), "docs"),
    "empty-stage1-docs": ("stage1", with_("stage1", docs=[]), "docs"),
    "unequal-question-answer-lists": ("stage1", with_("stage1", question=["q1", "q2"], answers=["a1"]), "answers"),
    "pos-index-out-of-range": ("stage2", with_("stage2", pos_index=[3]), "pos_index"),
    "pos-index-negative": ("stage2", with_("stage2", pos_index=[-1]), "pos_index"),
    "too-few-candidates": ("stage2", with_("stage2", docs=["only one"], pos_index=[0]), "docs"),
    "invalid-utf8-in-a-document": (
        "stage1_2",
        b'{"question": "q", "answer": "a", "docs": ["caf\xe9 au lait"]}',
        "docs",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_record_stops_with_file_line_and_field(tmp_path, case):
    stage, bad, field = BAD_RECORDS[case]
    path = write_lines(tmp_path / "data.jsonl", [GOOD[stage], "", bad, GOOD[stage]])
    with pytest.raises(DataError) as error:
        load(stage, path)
    message = str(error.value)
    # Line 3: the blank line 2 is skipped but still counted.
    assert re.search(rf"{re.escape(path)}:3: field '{field}': expected .+, got .+", message), message
    assert f"{path}:1" not in message and f"{path}:4" not in message
    assert "1 bad record" in message


@pytest.mark.parametrize(
    "bad,expected",
    [
        ('{"question": "q", ', "not valid JSON"),
        ('["a JSON list"]', "expected a JSON object, got list"),
        ('"a string"', "expected a JSON object, got str"),
        (b"\xff\xfe not text at all", "not valid UTF-8"),
    ],
    ids=["not-json", "list", "string", "not-utf8"],
)
def test_lines_that_are_not_records(tmp_path, bad, expected):
    path = write_lines(tmp_path / "data.jsonl", [GOOD["stage1_2"], bad])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: {expected}")):
        load("stage1_2", path)


def test_every_bad_line_is_named_first_20_then_a_count(tmp_path):
    lines = []
    for i in range(30):
        lines.append(GOOD["stage1_2"] if i % 6 == 0 else with_("stage1_2", docs=[]))
    bad_lines = [i + 1 for i in range(30) if i % 6 != 0]
    assert len(bad_lines) == 25
    path = write_lines(tmp_path / "data.jsonl", lines)
    with pytest.raises(DataError) as error:
        load("stage1_2", path)
    message = str(error.value)
    named = [int(n) for n in re.findall(rf"{re.escape(path)}:(\d+): ", message)]
    assert named == bad_lines[:20]
    assert "25 bad record" in message and "5 more" in message


def test_several_files_name_the_file_of_the_bad_line(tmp_path):
    first = write_lines(tmp_path / "a.jsonl", [GOOD["stage1_2"]] * 2)
    second = write_lines(tmp_path / "b.jsonl", [GOOD["stage1_2"], with_("stage1_2", answer=...)])
    with pytest.raises(DataError, match=re.escape(f"{second}:2: field 'answers'")):
        load("stage1_2", f"{first},{second}")
    assert len(load("stage1_2", f"{first},{first}")) == 4


def test_skip_loads_the_good_records_and_writes_the_rejected(tmp_path):
    good = [with_("stage2", question=f"question {i}?") for i in range(3)]
    bad = [with_("stage2", pos_index=[9]), "not json", b'{"question": "\xff"}']
    path = write_lines(tmp_path / "data.jsonl", [good[0], bad[0], good[1], bad[1], bad[2], good[2]])
    rejected = tmp_path / "out" / "rejected.jsonl"
    messages = []
    records = load_records(
        get_stage("stage2"),
        parse_source(path),
        bad_samples="skip",
        min_docs=2,
        rejected_path=str(rejected),
        log=messages.append,
    )
    assert [r["question"] for r in records] == ["question 0?", "question 1?", "question 2?"]
    assert records[0]["answer"] == "owl" and records[0]["pos_index"] == [1] and records[0]["has_pos_index"]
    assert any("3" in m and "kipped" in m for m in messages), messages
    rows = [json.loads(line) for line in rejected.read_text(encoding="utf-8").splitlines()]
    assert [(r["file"], r["line"]) for r in rows] == [(path, 2), (path, 4), (path, 5)]
    assert "pos_index" in rows[0]["reason"] and "JSON" in rows[1]["reason"] and "UTF-8" in rows[2]["reason"]
    assert json.loads(rows[0]["text"]) == bad[0] and rows[1]["text"] == "not json"


def test_no_good_record_at_all_is_an_error(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", ["not json"])
    with pytest.raises(DataError, match="no usable"):
        load("stage1_2", path, bad_samples="skip", rejected_path=str(tmp_path / "rejected.jsonl"))


# -- field aliases and normalisation -------------------------------------------------------------------------
def test_field_aliases(tmp_path):
    docs = ["Vorlan is a kingdom."]
    lines = [
        {"question": "q1", "answer": "a1", "context": docs},
        {"question": "q2", "answers": ["a2", "other"], "content": docs},
        {"question": "q3", "gold_answer": "a3", "docs": docs},
        {"question": "q4", "golden_answers": ["a4", "other"], "docs": docs},
        {"question": "q5", "answer": ["a5"], "content": "a single document as a string"},
    ]
    records = load("stage1_2", write_lines(tmp_path / "s12.jsonl", lines))
    assert [r["answer"] for r in records] == ["a1", "a2", "a3", "a4", "a5"]
    assert [r["docs"] for r in records] == [docs] * 4 + [["a single document as a string"]]
    assert all(not r["has_pos_index"] for r in records)

    stage2 = load(
        "stage2",
        write_lines(
            tmp_path / "s2.jsonl",
            [{"question": "q", "golden_answers": ["g", "h"], "context": ["d0", "d1"], "pos_index": 1}],
        ),
    )
    assert (stage2[0]["answer"], stage2[0]["docs"], stage2[0]["pos_index"]) == ("g", ["d0", "d1"], [1])


def test_stage1_records_normalise(tmp_path):
    lines = [
        {"question": ["q1", "q2"], "answers": ["a1", "a2"], "docs": ["d"]},  # QA: every pair, in order
        {"question": "one question", "answer": "one answer", "context": ["d"]},
        {"data_type": "paraphrase", "docs": ["d"], "answers": ["the paraphrase", "another"]},
        {"data_type": "paraphrase", "content": ["d"], "gold_answer": "a paraphrase"},
    ]
    records = load("stage1", write_lines(tmp_path / "s1.jsonl", lines))
    assert [r["data_type"] for r in records] == ["qa", "qa", "paraphrase", "paraphrase"]
    assert records[0]["questions"] == ["q1", "q2"] and records[0]["answers"] == ["a1", "a2"]
    assert records[1]["questions"] == ["one question"] and records[1]["answers"] == ["one answer"]
    assert records[2]["answers"] == ["the paraphrase"] and records[2]["questions"] == []
    assert records[3]["answers"] == ["a paraphrase"]


def test_example_files_are_valid():
    for stage, name in (
        ("stage1", "pretrain_data.jsonl"),
        ("stage1_2", "instruction_tuning_data.jsonl"),
        ("stage2", "end_to_end_data.jsonl"),
    ):
        records = load_records(
            get_stage(stage),
            parse_source(str(REPO / "example" / name)),
            min_docs=get_stage(stage).min_docs(5),
            log=lambda *a: None,
            max_samples=10,
        )
        assert len(records) == 10


# -- through the training command ------------------------------------------------------------------------------
def train_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "clara.train", *args]


@pytest.fixture()
def bad_stage1_file(tmp_path) -> str:
    with open(REPO / "example" / "pretrain_data.jsonl", encoding="utf-8") as handle:
        good = [json.loads(line) for line, _ in zip(handle, range(3))]
    return write_lines(
        tmp_path / "bad.jsonl", [good[0], with_("stage1", question=["q1", "q2"]), good[1], "{oops", good[2]]
    )


@pytest.mark.slow
def test_cli_bad_data_exits_2_before_any_model_loads(tmp_path, bad_stage1_file):
    # A base model directory with nothing in it: loading it would fail with a traceback, so exit 2
    # with the data errors shows that the data was checked before any model was loaded.
    no_model = tmp_path / "no_model"
    no_model.mkdir()
    started = time.monotonic()
    result = subprocess.run(
        train_command(
            "--dataset",
            bad_stage1_file,
            "--save_path",
            str(tmp_path / "run"),
            "--max_steps",
            "1",
            "--model_path",
            str(no_model),
        ),
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{bad_stage1_file}:2: field 'answers'" in result.stderr
    assert f"{bad_stage1_file}:4: not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < 90, f"failing on bad data took {elapsed:.0f}s"
    assert not (tmp_path / "run" / "rejected.jsonl").exists()


@pytest.mark.slow
def test_cli_skip_trains_one_step_and_writes_rejected(tmp_path, bad_stage1_file):
    save = tmp_path / "run"
    result = subprocess.run(
        train_command(
            "--dataset",
            bad_stage1_file,
            "--save_path",
            str(save),
            "--max_steps",
            "1",
            "--bad_samples",
            "skip",
            "--doc_max_length",
            "32",
            "--compress_rate",
            "8",
            "--batch_size",
            "1",
            "--micro_batch_size",
            "1",
            "--max_len",
            "512",
            "--debug_mode",
            "false",
        ),
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Skipped 2 bad record" in result.stdout + result.stderr
    rows = [json.loads(line) for line in (save / "rejected.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["file"], r["line"]) for r in rows] == [(bad_stage1_file, 2), (bad_stage1_file, 4)]
    metrics = [json.loads(line) for line in (save / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert metrics[-1]["step"] == 1
    assert (save / "config.json").is_file()
