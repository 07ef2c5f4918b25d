"""Preparing data once, in parallel, and keeping it (README: "Data at scale"): clara.data's cache, the
parallel pass, the MAX_LEN check's byte bound, and the launcher's handling of bad records on two ranks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from clara.data import cache as data_cache
from clara.data import prepare as data_prepare
from clara.data.load import load_records
from clara.data.prepare import prepare
from clara.data.records import BadRecord, normalise
from clara.data.sources import plan_tasks
from clara.data.spec import JsonlFiles, parse_source
from clara.errors import DataError
from clara.model.collate import Collator, LengthCheck
from clara.stages import get_stage
from clara.training.run_workers import worker_status
from tests.helpers import REPO

TINY = str(REPO / "clara" / "tiny_model")
STAGE1 = get_stage("stage1")


@pytest.fixture(autouse=True)
def data_cache_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "prepared"
    monkeypatch.setenv("CLARA_DATA_CACHE", str(folder))
    return folder


def example_lines(name: str = "pretrain_data.jsonl", count: int = 40) -> list[str]:
    return (REPO / "example" / name).read_text(encoding="utf-8").splitlines()[:count]


def write(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def check(max_len: int = 2048) -> LengthCheck:
    return LengthCheck(STAGE1, TINY, 8, 256, max_len, 5, 42)


def quiet(*_):
    pass


# -- one pass in parallel --------------------------------------------------------------------------------------
def test_byte_ranges_in_two_processes_give_the_records_and_lines_of_one_pass(tmp_path):
    lines = example_lines(count=30)
    lines[4], lines[17] = "not json", json.dumps({"question": ["q"], "answers": [], "docs": ["d"]})
    lines.insert(10, "")  # a blank line still counts as a line
    path = write(tmp_path / "data.jsonl", lines)
    tasks = plan_tasks(JsonlFiles((str(path),)), workers=2, chunk_bytes=2000)
    assert len(tasks) > 4 and tasks[0].start == 0 and tasks[-1].end == os.path.getsize(path)
    assert all(a.end == b.start for a, b in zip(tasks, tasks[1:]))
    folder = tmp_path / "shards"
    folder.mkdir()
    parallel = prepare(tasks, STAGE1, 1, check(), 2, str(folder), progress=False)
    assert [(line, reason[:14]) for _, line, reason, _ in parallel.rejected] == [
        (5, "not valid JSON"),
        (19, "field 'answers"),
    ]
    assert parallel.workers == 2 and parallel.records == 28
    import datasets

    got = datasets.concatenate_datasets([datasets.Dataset.from_file(str(folder / s)) for s in parallel.shards])
    good = [normalise(STAGE1, json.loads(line)) for line in lines if line and line not in (lines[4], lines[18])]
    assert got.to_list() == good


def test_the_byte_bound_agrees_with_tokenizing_every_record():
    """At MAX_LEN values between the records' token counts, the bound and tokenizing every record reject the
    same records with the same message."""
    from transformers import AutoTokenizer

    from clara.model.collate import encode_supervised
    from clara.stages.prompts import add_special_tokens

    tokenizer = AutoTokenizer.from_pretrained(TINY)
    tokens = add_special_tokens(tokenizer, 8)
    records = [normalise(STAGE1, json.loads(line)) for line in example_lines(count=200)]
    lengths = sorted(
        len(encode_supervised(tokenizer, *STAGE1.example(r, 8, 5, 42), max_len=sys.maxsize)[0]) for r in records
    )
    for max_len in (lengths[0], lengths[len(lengths) // 2], lengths[-1] - 1):
        fast = check(max_len)()
        exact = Collator(STAGE1, tokenizer, tokens, 256, max_len, 5, 42).length_problem
        assert [fast(r) for r in records] == [exact(r) for r in records]
        assert any(exact(r) for r in records) and not all(exact(r) for r in records)


# -- done once: the cache ----------------------------------------------------------------------------------------
def test_a_second_load_opens_the_cache_without_reading_the_input(tmp_path, monkeypatch):
    lines = example_lines()
    lines[3] = "not json"
    path = write(tmp_path / "data.jsonl", lines)
    source = parse_source(path)
    said = []
    first = load_records(
        STAGE1, source, "skip", log=said.append, make_check=check(), rejected_path=str(tmp_path / "r1.jsonl")
    )
    assert any(m.startswith(f"Prepared {path}: 39 records, 1 rejected") for m in said), said

    def no_reading(task):
        raise AssertionError(f"the input was read again: {task}")

    monkeypatch.setattr(data_prepare, "iter_rows", no_reading)
    said.clear()
    second = load_records(
        STAGE1, source, "skip", log=said.append, make_check=check(), rejected_path=str(tmp_path / "r2.jsonl")
    )
    assert second.to_list() == first.to_list()
    assert any("from the cache" in m for m in said) and any("Skipped 1 bad record" in m for m in said), said
    assert (tmp_path / "r2.jsonl").read_text() == (tmp_path / "r1.jsonl").read_text()
    with pytest.raises(DataError, match=f"{path}:4: not valid JSON"):  # BAD_SAMPLES=error: from the cache too
        load_records(STAGE1, source, log=quiet, make_check=check())


def test_a_changed_file_or_max_len_prepares_again(tmp_path):
    path = write(tmp_path / "data.jsonl", example_lines())
    said = []
    load_records(STAGE1, parse_source(path), log=said.append, make_check=check())
    load_records(STAGE1, parse_source(path), log=said.append, make_check=check(max_len=1024))
    write(tmp_path / "data.jsonl", example_lines(count=39))
    assert len(load_records(STAGE1, parse_source(path), log=said.append, make_check=check())) == 39
    assert [m.split(":")[0] for m in said] == ["Prepared /" + path[1:]] * 3
    load_records(STAGE1, parse_source(path), log=said.append, make_check=check())
    assert "from the cache" in said[-1]


def test_an_entry_is_published_whole_under_its_lock(tmp_path, data_cache_dir):
    """A second process asking for the entry while the first prepares it waits, then opens it."""
    path = write(tmp_path / "data.jsonl", example_lines())
    load_records(STAGE1, parse_source(path), log=quiet)
    entry = next(p for p in data_cache_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    shutil.rmtree(entry)
    said: list[str] = []
    with data_cache.entry_lock(str(entry), quiet):
        other = threading.Thread(
            target=lambda: said.append(len(load_records(STAGE1, parse_source(path), log=said.append)))
        )
        other.start()
        time.sleep(1.5)
        assert not entry.exists() and any("Waiting for another process" in str(m) for m in said), said
    other.join(timeout=60)
    assert said[-1] == 40 and entry.is_dir()
    assert not [p for p in data_cache_dir.iterdir() if ".tmp-" in p.name]


def test_a_waiting_rank_opens_the_entry_its_preparer_points_to(tmp_path, monkeypatch):
    path = write(tmp_path / "data.jsonl", example_lines())
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    got: list = []
    waiter = threading.Thread(
        target=lambda: got.append(load_records(STAGE1, parse_source(path), log=quiet, preparer=False))
    )
    waiter.start()
    time.sleep(1.0)
    assert not got
    prepared = load_records(STAGE1, parse_source(path), log=quiet)
    waiter.join(timeout=60)
    assert got[0].to_list() == prepared.to_list()


# -- sources -----------------------------------------------------------------------------------------------------
def test_gold_ids_are_read_with_the_record():
    record = {"question": "q", "answer": "a", "docs": ["d0", "d1"], "gold_ids": ["doc-1", 7]}
    normalised = normalise(get_stage("stage2"), record, 2)
    assert normalised["gold_ids"] == ["doc-1", "7"] and normalised["has_gold_ids"]
    assert not normalise(get_stage("stage2"), {**record, "gold_ids": None}, 2)["has_gold_ids"]
    with pytest.raises(BadRecord, match="field 'gold_ids'"):
        normalise(get_stage("stage2"), {**record, "gold_ids": {"id": 1}}, 2)


def hub_folder(root: Path, rows: list[dict]) -> str:
    (root / "long").mkdir(parents=True)
    (root / "long" / "train-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: long\n  data_files:\n  - split: train\n"
        "    path:\n    - long/train-00000.jsonl\n---\n",
        encoding="utf-8",
    )
    return f"hf:{root}:long"


def test_an_over_long_hub_row_is_named_by_row_index(tmp_path):
    rows = [json.loads(line) for line in example_lines(count=5)]
    rows[3] = {**rows[3], "answers": [" ".join(["word"] * 600)] * len(rows[3]["answers"])}
    dataset = hub_folder(tmp_path / "hub", rows)
    with pytest.raises(DataError, match=r"row 3: decoder input of \d+ tokens .* exceeds MAX_LEN=2048"):
        load_records(STAGE1, parse_source(dataset), log=quiet, make_check=check())


@pytest.mark.slow
def test_an_over_long_hub_row_stops_training_before_the_model_loads(tmp_path):
    rows = [json.loads(line) for line in example_lines(count=5)]
    rows[2] = {**rows[2], "answers": [" ".join(["word"] * 600)] * len(rows[2]["answers"])}
    dataset = hub_folder(tmp_path / "hub", rows)
    tokenizer_only = tmp_path / "tokenizer_only"  # loading a model from it would fail with a traceback
    tokenizer_only.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(Path(TINY) / name, tokenizer_only / name)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "clara.train",
            "--dataset",
            dataset,
            "--model_path",
            str(tokenizer_only),
            "--save_path",
            str(tmp_path / "run"),
            "--max_steps",
            "1",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "row 2: decoder input of" in result.stderr and "Traceback" not in result.stderr


# -- several ranks under the launcher -------------------------------------------------------------------------------
def test_the_runner_returns_the_failed_workers_own_status():
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def failed(code: int) -> ChildFailedError:
        failure = ProcessFailure(local_rank=0, pid=1, exitcode=code, error_file="/nonexistent")
        return ChildFailedError("clara.train", {0: failure})

    assert [worker_status(failed(c)) for c in (2, 1, -9, -15)] == [2, 1, 137, 143]


SPY = """import os, sys
_watched = os.environ.get("CLARA_TEST_WATCH")
def _hook(event, args):
    if event == "open" and _watched and isinstance(args[0], str) and args[0] == _watched:
        with open(os.environ["CLARA_TEST_OPENS"] + "." + os.environ.get("RANK", "none"), "a") as out:
            out.write("opened\\n")
sys.addaudithook(_hook)
"""


def launch_two_ranks(tmp_path: Path, data: str, save: Path, spy: Path) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        NUM_GPUS="2",
        DATASET=data,
        SAVE_PATH=str(save),
        MAX_STEPS="1",
        DEBUG_MODE="false",
        PYTHONPATH=f"{spy}{os.pathsep}{REPO}",
        CLARA_TEST_WATCH=data,
        CLARA_TEST_OPENS=str(tmp_path / "opens"),
        BATCH_SIZE="4",
        MICRO_BATCH_SIZE="2",
        NO_COLOR="1",
    )
    return subprocess.run(["bash", "./train_8gpu.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_ranks_prepare_once_and_a_bad_record_is_one_error(tmp_path):
    spy = tmp_path / "spy"
    spy.mkdir()
    (spy / "sitecustomize.py").write_text(SPY)
    lines = example_lines(count=24)
    data = write(tmp_path / "data.jsonl", lines)
    first = launch_two_ranks(tmp_path, data, tmp_path / "run1", spy)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert f"Prepared {data}: 24 records" in first.stdout
    assert (tmp_path / "opens.0").exists() and not (tmp_path / "opens.1").exists()  # rank 1 never opened it
    (tmp_path / "opens.0").unlink()
    second = launch_two_ranks(tmp_path, data, tmp_path / "run2", spy)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "from the cache" in second.stdout and not list(tmp_path.glob("opens.*"))  # nobody read it again

    bad = write(tmp_path / "bad.jsonl", lines[:5] + ["{oops"] + lines[5:])
    failed = launch_two_ranks(tmp_path, bad, tmp_path / "run3", spy)
    output = failed.stdout + failed.stderr
    assert failed.returncode == 2, output[-3000:]
    assert f"{bad}:6: not valid JSON" in output
    assert "Traceback" not in output and "ChildFailedError" not in output and "Root Cause" not in output
    assert output.rstrip().splitlines()[-1].startswith("[launcher] error: training failed (exit 2)")
