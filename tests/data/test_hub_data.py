"""Hub data sets (`hf:NAME:CONFIG[:SPLIT]`) and `python -m clara.benchmark`, with the network off.

No machine here reaches the Hub, so the tests build a small data set in the Hub layout (a README with a
`configs:` section, JSON lines and Parquet files) with the configurations and fields of
apple/CLaRa_multi_stage, a few rows each from the example data, and load it through `datasets` with
HF_DATASETS_OFFLINE / HF_HUB_OFFLINE set: as a local directory, and as a Hub id found in a Hugging Face
cache built here. The `instruction_tuning` configuration has `answer` as a string in one Parquet file and
a list in the other (the cast that plain `datasets.load_dataset` refuses) and one row with empty `docs`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clara.data.load import load_records
from clara.data.spec import parse_source
from clara.errors import DataError
from clara.stages import get_stage
from tests.helpers import REPO, run_module

EXAMPLE = REPO / "example"
QA_SETS = ("2wiki", "hotpotqa", "musique", "nq")
SETTINGS = ("with_pos", "no_pos")
EVAL_ROWS = 4  # rows per evaluation configuration
LIST_ANSWER_ROW = 1  # in every eval configuration and in instruction_tuning's second file (row SHARD + 1)
SHARD = 12  # rows in instruction_tuning's first Parquet file
BAD_ROW = SHARD + 4  # instruction_tuning's row with empty docs
PREFIX_ROWS = 3  # rows of the readable first file of `prefix_only`
HUB_ID = "clara-test/hub-copy"  # the Hub id the fake Hugging Face cache holds


def example_rows(name: str, start: int, count: int) -> list[dict]:
    lines = (EXAMPLE / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[start : start + count]]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path.name


def write_parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def instruction_row(row: dict) -> dict:
    """The official instruction_tuning fields: question, docs, gold_answer, answer."""
    return {"question": row["question"], "docs": row["docs"], "gold_answer": row["answers"], "answer": row["answers"]}


def e2e_row(row: dict, setting: str, other_doc: str) -> dict:
    """The official e2e fields: question, answer, docs, pos_index; no_pos replaces the positive document."""
    docs = list(row["docs"])
    if setting == "no_pos":
        for index in row["pos_index"]:
            docs[index] = other_doc
    return {
        "question": row["question"],
        "answer": row["gold_answer"],
        "docs": docs,
        "pos_index": row["pos_index"] if setting == "with_pos" else [],
    }


def build_hub_copy(root: Path) -> dict[str, list[dict]]:
    """Write the data set; return each configuration's rows as written (for the checks)."""
    configs: dict[str, list[dict]] = {}
    readme: list[str] = []

    def add(config: str, files: list[str]) -> None:
        readme.extend(
            [f"- config_name: {config}", "  data_files:", "  - split: train", "    path:"]
            + [f"    - {config}/{name}" for name in files]
        )

    configs["pretraining"] = example_rows("pretrain_data.jsonl", 0, 24)
    add("pretraining", [write_jsonl(root / "pretraining" / "train-00000.jsonl", configs["pretraining"])])

    rows = [instruction_row(r) for r in example_rows("instruction_tuning_data.jsonl", 0, 2 * SHARD)]
    second = [dict(r, answer=[r["answer"]]) for r in rows[SHARD:]]  # the same field as a list in this file
    second[BAD_ROW - SHARD]["docs"] = []
    write_parquet(root / "instruction_tuning" / "train-00000.parquet", rows[:SHARD])
    write_parquet(root / "instruction_tuning" / "train-00001.parquet", second)
    configs["instruction_tuning"] = rows[:SHARD] + second
    add("instruction_tuning", ["train-00000.parquet", "train-00001.parquet"])

    eval_rows = example_rows("instruction_tuning_data_eval.jsonl", 0, 100)
    e2e_train = example_rows("end_to_end_data.jsonl", 0, 100)
    e2e_eval = example_rows("end_to_end_data_eval.jsonl", 0, 100)
    for n, dataset in enumerate(QA_SETS):
        for setting in SETTINGS:
            part = slice(EVAL_ROWS * n, EVAL_ROWS * (n + 1))
            inst = [instruction_row(r) for r in eval_rows[part]]
            if setting == "no_pos":  # the documents without the one that holds the answer
                inst = [dict(r, docs=r["docs"][1:] + [eval_rows[-1]["docs"][0]]) for r in inst]
            inst[LIST_ANSWER_ROW]["answer"] = [inst[LIST_ANSWER_ROW]["answer"], "another answer"]
            other_doc = e2e_eval[-1]["docs"][0]
            for config, config_rows in (
                (f"inst_eval_{dataset}_{setting}", inst),
                (
                    f"e2e_training_ours_{dataset}_{setting}",
                    [e2e_row(r, setting, other_doc) for r in e2e_train[8 * n : 8 * (n + 1)]],
                ),
                (f"e2e_eval_ours_{dataset}_{setting}", [e2e_row(r, setting, other_doc) for r in e2e_eval[part]]),
            ):
                configs[config] = config_rows
                add(config, [write_jsonl(root / config / "train-00000.jsonl", config_rows)])

    # Only its first file can be read: loading a prefix must not open the second.
    configs["prefix_only"] = eval_rows[:PREFIX_ROWS]
    write_parquet(root / "prefix_only" / "train-00000.parquet", [instruction_row(r) for r in eval_rows[:PREFIX_ROWS]])
    (root / "prefix_only" / "train-00001.parquet").write_bytes(b"not a Parquet file")
    add("prefix_only", ["train-00000.parquet", "train-00001.parquet"])

    (root / "README.md").write_text(
        "---\nconfigs:\n" + "\n".join(readme) + "\n---\n# CLaRa data (test copy)\n", encoding="utf-8"
    )
    return configs


def offline_env(hf_home: Path) -> dict:
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO),
        NO_COLOR="1",
        HF_HOME=str(hf_home),
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
    )
    env.pop("WORLD_SIZE", None)
    return env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hub")


@pytest.fixture(scope="module")
def hub(workdir) -> tuple[Path, dict[str, list[dict]]]:
    root = workdir / "clara_multi_stage"
    return root, build_hub_copy(root)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def run_command(command: list[str], env: dict, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=900)


def quiet(*args, **kwargs) -> None:
    pass


# -- loading -------------------------------------------------------------------------------------------------
def test_plain_datasets_refuses_the_mixed_field_that_load_records_normalises(hub, offline):
    root, configs = hub
    files = sorted(str(f) for f in (root / "instruction_tuning").glob("*.parquet"))
    with pytest.raises(Exception, match="(?i)cast"):  # the Parquet type cast reported on the official set
        list(datasets.load_dataset("parquet", data_files=files, split="train", streaming=True))
    records = load_records(
        get_stage("stage1_2"), parse_source(f"hf:{root}:instruction_tuning"), bad_samples="skip", log=quiet
    )
    expected = [r for i, r in enumerate(configs["instruction_tuning"]) if i != BAD_ROW]
    assert len(records) == len(expected)
    for got, row in zip(records, expected):
        answer = row["answer"][0] if isinstance(row["answer"], list) else row["answer"]
        assert (got["question"], got["answer"], got["docs"]) == (row["question"], answer, row["docs"])
    assert records[SHARD + 1]["answer"] == configs["instruction_tuning"][SHARD + 1]["answer"][0]


def test_every_stage_format_loads_with_its_split_named_or_not(hub, offline):
    root, configs = hub
    stage1 = load_records(get_stage("stage1"), parse_source(f"hf:{root}:pretraining"), log=quiet)
    assert [r["questions"] for r in stage1] == [
        r.get("question", []) if r["data_type"] == "qa" else [] for r in configs["pretraining"]
    ]
    config = "e2e_eval_ours_nq_with_pos"
    stage2 = load_records(get_stage("stage2"), parse_source(f"hf:{root}:{config}:train"), min_docs=5, log=quiet)
    assert [(r["answer"], list(r["pos_index"]), r["has_pos_index"]) for r in stage2] == [
        (row["answer"], row["pos_index"], True) for row in configs[config]
    ]
    evaluation = load_records(get_stage("stage1_2"), parse_source(f"hf:{root}:inst_eval_nq_no_pos"), log=quiet)
    assert evaluation[LIST_ANSWER_ROW]["answer"] == configs["inst_eval_nq_no_pos"][LIST_ANSWER_ROW]["answer"][0]

    with pytest.raises(DataError, match=r"BuilderConfig 'nope' not found"):
        load_records(get_stage("stage1_2"), parse_source(f"hf:{root}:nope"), log=quiet)
    with pytest.raises(DataError, match=r":pretraining:test: no split 'test'; configuration 'pretraining' has train"):
        load_records(get_stage("stage1"), parse_source(f"hf:{root}:pretraining:test"), log=quiet)


def test_a_bad_row_is_named_by_data_set_configuration_and_row_index(hub, offline, tmp_path):
    root, _ = hub
    spec = f"hf:{root}:instruction_tuning"
    with pytest.raises(DataError) as caught:
        load_records(get_stage("stage1_2"), parse_source(spec), log=quiet)
    assert str(caught.value).splitlines()[:2] == [
        f"1 bad record(s) in {spec}:train (stage1_2):",
        f"{spec}:train row {BAD_ROW}: field 'docs': expected at least one document, got an empty list",
    ]
    rejected = tmp_path / "rejected.jsonl"
    load_records(get_stage("stage1_2"), parse_source(spec), bad_samples="skip", rejected_path=str(rejected), log=quiet)
    (line,) = [json.loads(x) for x in rejected.read_text().splitlines()]
    assert (line["dataset"], line["row"]) == (f"{spec}:train", BAD_ROW)
    assert json.loads(line["text"])["docs"] == []


def test_max_samples_reads_only_a_prefix(hub, offline):
    root, configs = hub
    spec = f"hf:{root}:prefix_only"
    records = load_records(get_stage("stage1_2"), parse_source(spec), max_samples=PREFIX_ROWS, log=quiet)
    assert [r["question"] for r in records] == [r["question"] for r in configs["prefix_only"]]
    assert len(load_records(get_stage("stage1_2"), parse_source(spec), max_samples=2, log=quiet)) == 2
    with pytest.raises(Exception, match="(?i)parquet"):  # all rows: the second file is read, and is no Parquet
        load_records(get_stage("stage1_2"), parse_source(spec), log=quiet)


def test_a_hub_id_is_read_from_the_hugging_face_cache_offline(hub, workdir):
    """The huggingface_hub cache layout (datasets--OWNER--NAME/snapshots/REV, refs/main) built by hand."""
    root, configs = hub
    hf_home = workdir / "hf_home_cache"
    repo = hf_home / "hub" / ("datasets--" + HUB_ID.replace("/", "--"))
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(root, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    code = (
        "from clara.data.load import load_records\nfrom clara.data.spec import parse_source\n"
        "from clara.stages import get_stage\n"
        "print([r['answer'] for r in load_records(get_stage('stage1_2'), "
        f"parse_source('hf:{HUB_ID}:inst_eval_hotpotqa_with_pos'), log=print)])"
    )
    proc = run_command([sys.executable, "-c", code], offline_env(hf_home), cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = configs["inst_eval_hotpotqa_with_pos"]
    assert proc.stdout.strip().splitlines()[-1] == repr(
        [r["answer"][0] if isinstance(r["answer"], list) else r["answer"] for r in rows]
    )

    proc = run_command(
        [sys.executable, "-c", code.replace(HUB_ID, "clara-test/not-cached")], offline_env(hf_home), cwd=workdir
    )
    assert proc.returncode == 1
    assert "hf:clara-test/not-cached:inst_eval_hotpotqa_with_pos: not in the Hugging Face cache" in proc.stderr


# -- training and the paper's table --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(workdir, hub) -> dict[str, Path]:
    """stage1 -> stage1_2 -> stage2 on the Hub-layout configurations, three optimizer steps each, offline."""
    root, _ = hub
    env = offline_env(workdir / "hf_home")
    data = {"stage1": "pretraining", "stage1_2": "instruction_tuning", "stage2": "e2e_training_ours_nq_with_pos"}
    paths: dict[str, Path] = {}
    for stage, previous in (("stage1", None), ("stage1_2", "stage1"), ("stage2", "stage1_2")):
        save = workdir / f"ckpt_{stage}"
        args = [
            "clara.train",
            "--stage",
            stage,
            "--dataset",
            f"hf:{root}:{data[stage]}",
            "--save_path",
            str(save),
            "--max_steps",
            "3",
            "--batch_size",
            "4",
            "--micro_batch_size",
            "4",
            "--debug_mode",
            "false",
            "--bad_samples",
            "skip",
            "--max_new_tokens",
            "8",
        ]
        if previous:
            args += ["--pretrain_checkpoint", str(paths[previous])]
        proc = run_module(args, env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        paths[stage] = save
        (save / "train.log").write_text(proc.stdout + proc.stderr)
    return paths


@pytest.mark.slow
def test_training_on_hub_configurations(checkpoints, hub):
    root, _ = hub
    for stage, path in checkpoints.items():
        assert (path / "config.json").is_file(), stage
    log = (checkpoints["stage1_2"] / "train.log").read_text()
    assert "Skipped 1 bad record(s) of hf:" in log
    (line,) = [json.loads(x) for x in (checkpoints["stage1_2"] / "rejected.jsonl").read_text().splitlines()]
    assert (line["dataset"], line["row"]) == (f"hf:{root}:instruction_tuning:train", BAD_ROW)


def parse_table(stdout: str) -> tuple[list[str], dict[str, list[str]]]:
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return header, rows


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["stage1_2", "stage2"])
def test_benchmark_prints_the_full_table_and_resumes(stage, checkpoints, hub, workdir):
    root, configs = hub
    env = offline_env(workdir / "hf_home")
    output = workdir / f"benchmark_{stage}"
    args = [
        "clara.benchmark",
        "--checkpoint",
        str(checkpoints[stage]),
        "--data",
        str(root),
        "--output_dir",
        str(output),
        "--max_new_tokens",
        "8",
        "--no_progress",
    ]
    proc = run_module(args, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout)
    header, rows = parse_table(proc.stdout)
    metrics = ["EM", "F1", "CEM"] + (["R@1", "R@3", "R@5"] if stage == "stage2" else [])
    assert header == ["Data set"] + [f"{s} {m}" for s in ("Normal", "Oracle") for m in metrics]
    assert list(rows) == ["NQ", "HotpotQA", "MuSiQue", "2WikiMultihopQA", "Average"]
    prefix = "inst_eval_" if stage == "stage1_2" else "e2e_eval_ours_"
    keys = ["exact_match", "f1", "cover_exact_match"]
    keys += [f"recall@{k}" for k in (1, 3, 5)] if stage == "stage2" else []
    for label, name in (("NQ", "nq"), ("2WikiMultihopQA", "2wiki")):
        for column, setting in enumerate(("no_pos", "with_pos")):
            config = f"{prefix}{name}_{setting}"
            samples = [json.loads(x) for x in (output / f"{config}.jsonl").read_text().splitlines()]
            assert [s["question"] for s in samples] == [r["question"] for r in configs[config]]
            assert all(s["prediction"] is not None for s in samples)
            summary = json.loads((output / f"{config}.summary.json").read_text())
            assert summary["dataset"] == f"hf:{root}:{config}"
            cells = rows[label][column * len(keys) : (column + 1) * len(keys)]
            for key, cell in zip(keys, cells):
                value = summary["metrics"].get(key)
                assert cell == ("n/a" if value is None else f"{100 * value:.2f}"), (config, key)
    assert (output / "table.md").read_text().strip() == "\n".join(
        line for line in proc.stdout.splitlines() if line.startswith("|")
    )

    # A finished table is not evaluated again; a set whose results are gone is.
    again = run_module(args, env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "8 of 8 sets already done" in again.stdout
    assert parse_table(again.stdout) == (header, rows)
    (output / f"{prefix}musique_with_pos.summary.json").unlink()
    again = run_module(args, env)
    assert "7 of 8 sets already done" in again.stdout
    assert f"{prefix}musique_with_pos: {EVAL_ROWS} samples" in again.stdout
    assert parse_table(again.stdout) == (header, rows)


@pytest.mark.slow
def test_benchmark_on_jsonl_copies_in_two_processes_with_max_samples(checkpoints, hub, workdir):
    """A directory of CONFIG.jsonl files, --max_samples 2, under torchrun: the same cells as one process on
    the Hub layout with --max_samples 2."""
    root, configs = hub
    env = offline_env(workdir / "hf_home")
    copies = workdir / "jsonl_copies"
    for config, rows in configs.items():
        if config.startswith("e2e_eval_ours_"):
            write_jsonl(copies / f"{config}.jsonl", rows)
    common = [
        "--checkpoint",
        str(checkpoints["stage2"]),
        "--max_samples",
        "2",
        "--max_new_tokens",
        "8",
        "--batch_size",
        "1",
        "--no_progress",
    ]
    two = run_module(
        [
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "clara.benchmark",
            *common,
            "--data",
            str(copies),
            "--output_dir",
            str(workdir / "bench_two"),
        ],
        env,
    )
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one = run_module(["clara.benchmark", *common, "--data", str(root), "--output_dir", str(workdir / "bench_one")], env)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    assert parse_table(two.stdout) == parse_table(one.stdout)
    summary = json.loads((workdir / "bench_two" / "e2e_eval_ours_nq_with_pos.summary.json").read_text())
    assert summary["dataset"] == str(copies / "e2e_eval_ours_nq_with_pos.jsonl")
    assert summary["world_size"] == 2 and summary["metrics"]["samples"] == 2
