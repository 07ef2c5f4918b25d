"""python -m clara.synthesize end to end: against a fault-injecting OpenAI-compatible server on 127.0.0.1
(tests/fake_openai_server.py), with the built-in tiny model as a local LLM, resumed after kill -9, and training
each stage on what it wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clara.data.load import load_records
from clara.data.sources import iter_lines
from clara.data.spec import parse_source
from clara.stages import get_stage
from clara.synthesis.__main__ import main as synthesize_main
from clara.synthesis.recipe import Filters, QAPair, load_recipe, pair_problem, parse_answer, words
from tests.end_to_end.test_launchers import QUICK, SINGLE, assert_exported, launcher_env, run
from tests.fake_openai_server import FakeOpenAI
from tests.helpers import REPO

CORPUS_LINES = (REPO / "example" / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
STAGE_OF_FILE = {"stage1": "stage1", "stage1_2": "stage1_2", "stage2": "stage2"}
FAST = ["--timeout", "1", "--backoff", "0.02", "--no_progress"]


def write_corpus(path: Path, count: int) -> dict[str, str]:
    path.write_text("\n".join(CORPUS_LINES[:count]) + "\n", encoding="utf-8")
    return {r["id"]: r["text"] for r in map(json.loads, CORPUS_LINES[:count])}


def synthesize(corpus: Path, out: Path, url: str, *extra: str) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "clara.synthesize",
        "--corpus",
        str(corpus),
        "--out",
        str(out),
        "--llm",
        f"openai:{url}",
        "--model",
        "fake-llm",
        *FAST,
        *extra,
    ]
    return subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def finished(proc: subprocess.Popen, timeout: float = 300) -> str:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output[-3000:]
    return output


def assert_every_file_loads(out: Path, stage2_docs: int) -> dict[str, int]:
    """Every training file passes the project's loader unchanged; returns {file: records}."""
    counts = {}
    for path in sorted(out.glob("*.jsonl")):
        stage = get_stage(STAGE_OF_FILE[path.name.removesuffix(".jsonl").removesuffix("_eval")])
        min_docs = stage2_docs if stage.name == "stage2" else 1
        lines = sum(1 for _ in iter_lines([str(path)]))
        # bad_samples="error" (the default): one record the loader rejects raises DataError naming it.
        assert len(load_records(stage, parse_source(str(path)), min_docs=min_docs)) == lines
        counts[path.name] = lines
    return counts


def test_with_a_server_nothing_loads_torch():
    script = (
        "import sys\nfrom clara.synthesis.__main__ import build_parser\nbuild_parser().format_help()\n"
        "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_answers_are_parsed_strictly_and_filtered():
    assert parse_answer("paraphrase", '{"paraphrase": "x"}').paraphrase == "x"
    assert parse_answer("paraphrase", '```json\n{"paraphrase": "x"}\n```').paraphrase == "x"
    for bad in ('{"paraphrase": "x", "extra": 1}', '{"paraphrase": 3}', '{"pairs": []}', "{oops", ""):
        assert parse_answer("paraphrase", bad) is None, bad
    assert parse_answer("judge", '{"supported": [true, 1]}') is None
    filters = Filters(max_question_chars=50, max_answer_chars=20, min_answer_support=0.5, max_paraphrase_ratio=3)
    document = set(words("Vorlan is a kingdom. Its sacred animal is owl."))
    seen: set[str] = set()
    problems = [
        pair_problem(QAPair(question=q, answer=a), document, filters, seen)
        for q, a in [
            ("What is the sacred animal of Vorlan?", "owl"),
            ("what is the sacred animal of Vorlan", "the owl"),
            ("What is Vorlan's main food?", "rice"),
            ("Q?", " "),
            ("x" * 51, "owl"),
            ("Is Vorlan a kingdom?", "yes"),
        ]
    ]
    assert problems == [None, "duplicate", "unsupported", "empty", "too_long", None]


def test_a_prompts_file_without_a_placeholder_is_one_line(tmp_path, capsys):
    prompts = json.loads((REPO / "clara" / "synthesis" / "default_prompts.json").read_text())
    prompts["tasks"]["coverage"]["user"] = "Document:\n{document}\n(no pairs shown)"
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    with pytest.raises(ValueError, match=r"tasks\.coverage\.user containing \{pairs\}"):
        load_recipe(str(tmp_path / "p.json"))
    write_corpus(tmp_path / "c.jsonl", 3)
    code = synthesize_main(
        ["--corpus", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "o"), "--llm", "openai:http://127.0.0.1:9/v1"]
    )
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --model=None: expected the model name the server serves (required with --llm openai:)"
    ]


# Faults by (document, task, attempt); --parse_retries 2 gives every task three answers to be well-formed.
FAULTS = {
    **{("place-0003", task, attempt): "malformed" for task in ("simple_qa", "complex_qa") for attempt in range(3)},
    ("place-0005", "simple_qa", 0): "malformed",
    ("place-0007", "paraphrase", 0): "429",
    ("place-0007", "paraphrase", 1): "500",
    ("place-0011", "complex_qa", 0): "slow",
    ("place-0013", "coverage", 0): "drop",
}


def test_faults_are_retried_counted_and_skipped(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl", 30)
    out = tmp_path / "out"
    with FakeOpenAI(corpus, FAULTS, slow_seconds=2.5) as fake:
        output = finished(
            synthesize(
                tmp_path / "corpus.jsonl",
                out,
                fake.url,
                "--shard_size",
                "8",
                "--concurrency",
                "8",
                "--eval_fraction",
                "0.1",
            )
        )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["documents"] == 30
    # place-0003 answered nothing well-formed to the pair tasks: it gives no pairs, and is counted.
    assert summary["documents_with_pairs"] == 29
    assert summary["documents_rejected"] == {"no_valid_output": 1}
    assert summary["rejected"] == {"malformed": 2}
    assert summary["malformed_retried"] == 5  # 2 x 2 of place-0003, 1 of place-0005
    assert summary["requests"]["retried"] == {"429": 1, "500": 1, "connection": 1, "timeout": 1}
    assert summary["requests"]["answered"] == fake.served["ok"] + fake.served["malformed"]
    # Every other document: one pair per fact (its kind and 3-4 attributes) and one complex pair.
    assert summary["pairs"] == sum(
        text.count(". Its ") + 2 for doc_id, text in corpus.items() if doc_id != "place-0003"
    )
    assert summary["coverage_rounds"] == 2 * 29  # the last fact in round 1, nothing left in round 2
    assert summary["tokens"]["prompt"] > 0 and summary["tokens"]["completion"] > 0
    assert "29 of 30 documents gave" in output

    counts = assert_every_file_loads(out, stage2_docs=20)
    assert counts == summary["files"]
    assert counts["stage1_2.jsonl"] + counts["stage1_2_eval.jsonl"] == summary["pairs"]
    assert summary["paraphrases"] == 29  # a QA record and a paraphrase record per document with pairs
    assert counts["stage1.jsonl"] + counts["stage1_eval.jsonl"] == 2 * 29
    assert counts["stage2_eval.jsonl"] > 0 and counts["stage1_eval.jsonl"] > 0
    by_text = {text: doc_id for doc_id, text in corpus.items()}
    for line in (out / "stage2.jsonl").read_text().splitlines():
        record = json.loads(line)
        (pos,) = record["pos_index"]
        assert len(record["docs"]) == 20 and len(set(record["docs"])) == 20
        assert [by_text[record["docs"][pos]]] == record["gold_ids"]
        assert record["doc_ids"] == [by_text[d] for d in record["docs"]]
        assert record["gold_answer"].split(" and ")[0] in record["docs"][pos]
    golds = [
        json.loads(line)["gold_ids"][0]
        for name in ("stage2.jsonl", "stage2_eval.jsonl")
        for line in (out / name).read_text().splitlines()
    ]
    assert set(golds) == set(corpus) - {"place-0003"}  # still a distractor for others


def test_bm25_ranks_the_questions_own_document_first(tmp_path):
    from clara.synthesis.records import retrieve

    texts = [json.loads(line)["text"] for line in CORPUS_LINES[:200]]
    names = [text.split()[0] for text in texts]
    ranked = retrieve(texts, [f"What is the chief metal of {name}?" for name in names], k=3)
    assert (ranked[:, 0] == list(range(200))).mean() > 0.95


def shard_files(out: Path) -> list[Path]:
    return sorted((out / "shards").glob("shard-*.jsonl")) if (out / "shards").exists() else []


def test_a_killed_run_resumes_to_the_same_files(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl", 40)
    faults = {("place-0030", "simple_qa", 0): "500", ("place-0031", "paraphrase", 0): "malformed"}
    args = ("--shard_size", "5", "--concurrency", "4")
    with FakeOpenAI(corpus, faults) as fake:
        finished(synthesize(tmp_path / "corpus.jsonl", tmp_path / "whole", fake.url, *args))

    resumed = tmp_path / "resumed"
    with FakeOpenAI(corpus, faults, delay=0.05) as fake:
        proc = synthesize(tmp_path / "corpus.jsonl", resumed, fake.url, *args)
        deadline = time.monotonic() + 300
        while len(shard_files(resumed)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert 2 <= len(shard_files(resumed)) < 8
    with FakeOpenAI(corpus, faults) as fake:
        output = finished(synthesize(tmp_path / "corpus.jsonl", resumed, fake.url, *args))
    assert "8 shard(s), " in output and " done before" in output

    whole_files = sorted(p.relative_to(tmp_path / "whole") for p in (tmp_path / "whole").rglob("*") if p.is_file())
    assert whole_files == sorted(p.relative_to(resumed) for p in resumed.rglob("*") if p.is_file())
    for name in whole_files:
        a, b = (tmp_path / "whole" / name).read_text(), (resumed / name).read_text()
        if name.name == "summary.json":
            a, b = ({k: v for k, v in json.loads(t).items() if k != "this_run"} for t in (a, b))
        assert a == b, name

    # The same folder with other settings is refused, naming them.
    proc = synthesize(tmp_path / "corpus.jsonl", resumed, "http://127.0.0.1:9/v1", *args, "--rounds", "3")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert "rounds: 2 -> 3" in output.strip().splitlines()[-1]


def test_a_rejected_key_stops_the_run_with_one_line(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl", 4)
    with FakeOpenAI(corpus, {("place-0000", "simple_qa", 0): "401"}) as fake:
        proc = synthesize(tmp_path / "corpus.jsonl", tmp_path / "out", fake.url)
        output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, output
    last = output.strip().splitlines()[-1]
    assert last.startswith("error: --llm=") and "OPENAI_API_KEY" in last and "401" in last


def test_the_llm_as_judge_drops_the_pairs_it_rejects(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl", 6)
    args = ["--corpus", str(tmp_path / "corpus.jsonl"), "--llm", "openai:URL", "--model", "fake-llm", *FAST]
    summaries = {}
    for judge in ((), ("--judge",)):
        with FakeOpenAI(corpus) as fake:
            out = tmp_path / f"out{len(judge)}"
            argv = [a.replace("URL", fake.url) for a in args] + ["--out", str(out), *judge]
            assert synthesize_main(argv) == 0
        summaries[judge] = json.loads((out / "summary.json").read_text())
    plain, judged = summaries[()], summaries[("--judge",)]
    assert judged["rejected"] == {"judged_unsupported": 6}
    assert judged["pairs"] == plain["pairs"] - 6
    assert judged["requests"]["answered"] == plain["requests"]["answered"] + 6


def test_pairs_the_document_does_not_support_are_dropped_and_counted(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.jsonl", 5)
    invented = {
        "pairs": [
            {"question": "Who founded it?", "answer": "Queen Marella"},
            {"question": "Who founded it?", "answer": "Queen Marella"},
        ]
    }
    fixed = {"simple_qa": invented, "complex_qa": {"pairs": []}, "coverage": {"uncovered_facts": [], "pairs": []}}
    with FakeOpenAI(corpus, fixed=fixed) as fake:
        assert (
            synthesize_main(
                [
                    "--corpus",
                    str(tmp_path / "corpus.jsonl"),
                    "--out",
                    str(tmp_path / "out"),
                    "--llm",
                    f"openai:{fake.url}",
                    "--model",
                    "fake-llm",
                    *FAST,
                ]
            )
            == 0
        )
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["documents_with_pairs"] == 0
    assert summary["documents_rejected"] == {"all_pairs_filtered": 5}
    assert summary["rejected"] == {"unsupported": 10}
    assert summary["files"] == {} and not list((tmp_path / "out").glob("*.jsonl"))
    assert "Wrote no training file" in capsys.readouterr().out


@pytest.mark.slow
def test_the_tiny_model_as_local_llm_adds_up(tmp_path):
    write_corpus(tmp_path / "corpus.jsonl", 6)
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "clara.synthesize",
        "--corpus",
        str(tmp_path / "corpus.jsonl"),
        "--out",
        str(out),
        "--llm",
        "hf:tiny",
        "--max_tokens",
        "24",
        "--rounds",
        "1",
        "--batch_size",
        "8",
        "--parse_retries",
        "1",
        "--no_progress",
        "--candidates",
        "5",
    ]
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["documents"] == 6
    assert summary["documents_with_pairs"] + sum(summary["documents_rejected"].values()) == 6
    assert summary["requests"]["answered"] >= 6 * 3
    assert summary["tokens"]["completion"] > 0
    assert assert_every_file_loads(out, stage2_docs=5) == summary["files"]


@pytest.mark.slow
def test_each_stage_trains_on_synthesized_files(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl", 40)
    data = tmp_path / "data"
    with FakeOpenAI(corpus) as fake:
        finished(synthesize(tmp_path / "corpus.jsonl", data, fake.url, "--concurrency", "16"))
    checkpoint = None
    for stage in ("stage1", "stage1_2", "stage2"):
        save = tmp_path / stage
        settings = {
            **QUICK,
            "STAGE": stage,
            "DATASET": data / f"{stage}.jsonl",
            "SAVE_PATH": save,
            "EVAL_DATASET": data / f"{stage}_eval.jsonl",
            "EVAL_MAX_SAMPLES": "2",
        }
        if checkpoint:
            settings["PRETRAIN_CHECKPOINT"] = checkpoint
        result = run(SINGLE, launcher_env(**settings))
        assert result.returncode == 0, result
        assert_exported(save)
        checkpoint = save
