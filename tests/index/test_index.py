"""Corpus indexes: `python -m clara.index`, answering from stored vectors, `clara.ask`, open-corpus evaluation.

Two stage2 checkpoints of the tiny model are made here without training: fresh adapters whose
LoRA weights are set to seeded noise, so that every role computes something of its own. They
check plumbing and agreement between code paths (batched vs. one at a time, one process vs. two,
an index vs. the same documents passed as candidates), not quality; the trained example model's
recall is in the README.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from clara.errors import CorpusIndexError
from clara.evaluation.inference import CLaRa
from clara.evaluation.metrics import exact_match
from clara.index.answer import answer_from_index
from clara.index.corpus import read_corpus
from clara.index.search import SearchSettings, make_search_index, pair_queries, recall_against_exact
from clara.index.store import SEARCH_FILE, SHARD_FILE, load_index
from tests.helpers import EXAMPLE, noisy_checkpoint, noisy_pair, read_jsonl, run_module, run_torchrun

N_QUESTIONS = 4
N_DOCS = 40
SHARD = 16  # 40 documents: shards of 16, 16 and 8
TOP_K = 3
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("index")


@pytest.fixture(scope="module")
def checkpoints(workdir) -> dict[str, Path]:
    """a and b differ in every role; a_reasoner shares a's compressor and memory embeddings only."""
    return {
        **noisy_pair(workdir),
        "a_reasoner": noisy_checkpoint(
            workdir / "ck_a2", {"encoder_adapter": 1, "decoder_adapter": 22, "query_reasoner_adapter": 23}
        ),
    }


@pytest.fixture(scope="module")
def data(workdir) -> dict[str, Path]:
    """A corpus of example documents that holds the gold documents of the first held-out questions."""
    questions = read_jsonl(EXAMPLE / "end_to_end_data_eval.jsonl")[:N_QUESTIONS]
    corpus = {doc["id"]: doc for doc in read_jsonl(EXAMPLE / "corpus.jsonl")}
    chosen = [corpus.pop(i) for q in questions for i in q["gold_ids"]]
    chosen += list(corpus.values())[: N_DOCS - len(chosen)]
    corpus_path, questions_path = workdir / "corpus.jsonl", workdir / "questions.jsonl"
    corpus_path.write_text("".join(json.dumps(d) + "\n" for d in chosen), encoding="utf-8")
    questions_path.write_text("".join(json.dumps(q) + "\n" for q in questions), encoding="utf-8")
    return {"corpus": corpus_path, "questions": questions_path}


def index_args(checkpoint: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        "clara.index",
        "--checkpoint",
        str(checkpoint),
        "--corpus",
        str(corpus),
        "--out",
        str(out),
        "--batch_size",
        "4",
        "--shard_size",
        str(SHARD),
        *extra,
    ]


@pytest.fixture(scope="module")
def built(workdir, checkpoints, data) -> tuple[subprocess.CompletedProcess, Path]:
    out = workdir / "index_a"
    return run_module(index_args(checkpoints["a"], data["corpus"], out)), out


def stored_memory(out: Path) -> torch.Tensor:
    shards = sorted(p for p in os.listdir(out) if p.startswith("memory-"))
    return torch.cat([load_file(str(out / name))["memory"].float() for name in shards])


# -- indexing -----------------------------------------------------------------------------------------------
def test_index_stores_every_document_compressed_as_one_at_a_time(built, checkpoints, data):
    proc, out = built
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "doc/s" in proc.stderr  # the progress bar's rate
    assert f"Index written to {out}: {N_DOCS} documents" in proc.stdout
    meta = json.loads((out / "index.json").read_text())
    assert len(meta["shards"]) == 3 and meta["documents"] == N_DOCS and meta["search"]["kind"] == "flat"
    assert meta["bytes_per_document"] == 4 * 64 * 4  # n_mem x hidden x float32
    assert meta["generation"] == 0 and meta["removed"] == []
    index = load_index(str(out))
    ids, texts = read_corpus(str(data["corpus"]))
    assert index.ids == ids and index.search_index.ntotal == N_DOCS
    assert [index.text(row) for row in range(N_DOCS)] == texts  # read from disk by offset
    memory = stored_memory(out)
    model = CLaRa.from_pretrained(str(checkpoints["a"]), batch_size=1)
    alone, _ = model.compress_documents(documents=texts)  # one document per forward: no padding
    torch.testing.assert_close(memory, alone, rtol=1e-4, atol=1e-5)
    # Exact search: a stored document's own direction finds it first, with cosine 1.
    rows = torch.nn.functional.normalize(memory.flatten(1), dim=-1).numpy()
    scores, found = index.search(rows[:5], 1)
    assert found[:, 0].tolist() == list(range(5)) and np.allclose(scores[:, 0], 1.0, atol=1e-5)


@pytest.mark.slow
def test_two_processes_under_torchrun_build_the_same_index(workdir, built, checkpoints, data):
    out = workdir / "index_torchrun"
    proc = run_torchrun(
        [
            *index_args(checkpoints["a"], data["corpus"], out),
        ],
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    meta = json.loads((out / "index.json").read_text())
    assert meta["compressed_here"] == N_DOCS - SHARD  # rank 0: shards 0 and 2; rank 1 compressed shard 1
    torch.testing.assert_close(stored_memory(out), stored_memory(built[1]), rtol=1e-5, atol=1e-6)
    texts = sorted(p.name for p in out.glob("documents-*.jsonl"))
    assert texts == sorted(p.name for p in built[1].glob("documents-*.jsonl"))
    assert all((out / name).read_text() == (built[1] / name).read_text() for name in texts)


@pytest.mark.slow
def test_interrupted_build_resumes_with_the_missing_shards(workdir, built, checkpoints, data):
    out = workdir / "index_resume"
    proc = run_module(index_args(checkpoints["a"], data["corpus"], out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The state a build killed after shards 0 and 2 leaves: build.json and those shards, nothing merged.
    for name in ("index.json", SEARCH_FILE.format(0), SHARD_FILE.format(1)):
        (out / name).unlink()
    kept = {i: (out / SHARD_FILE.format(i)).stat().st_mtime_ns for i in (0, 2)}
    proc = run_module(index_args(checkpoints["a"], data["corpus"], out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Resuming" in proc.stdout and "2 of 3 shard(s) already built" in proc.stdout
    assert {i: (out / SHARD_FILE.format(i)).stat().st_mtime_ns for i in (0, 2)} == kept
    assert json.loads((out / "index.json").read_text())["compressed_here"] == SHARD
    torch.testing.assert_close(stored_memory(out), stored_memory(built[1]), rtol=1e-5, atol=1e-6)
    # The unfinished build of one checkpoint is not finished with another's vectors.
    (out / "index.json").unlink()
    proc = run_module(index_args(checkpoints["b"], data["corpus"], out))
    assert proc.returncode == 2
    assert "holds a build of another corpus or checkpoint (differs in fingerprint)" in proc.stderr


def test_bad_records_and_duplicate_ids_are_named_by_file_and_line(workdir, checkpoints):
    corpus = workdir / "bad_corpus.jsonl"
    corpus.write_text(
        '{"id": "a", "text": "Vorlan is a kingdom."}\n'
        '{"id": "b", "text": ""}\n'
        "not json\n"
        '{"id": "a", "text": "Another text."}\n'
        '{"text": "no id"}\n'
        '{"docs": ["Some text.", "Some text."]}\n',
        encoding="utf-8",
    )
    proc = run_module(index_args(checkpoints["a"], corpus, workdir / "index_bad"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == f"error: 4 bad corpus record(s) in {corpus}:"
    assert lines[1:] == [
        f"{corpus}:2: field 'text': expected a non-empty string",
        f"{corpus}:3: not valid JSON (Expecting value, column 1)",
        f"{corpus}:4: field 'id': duplicate id 'a' (first on line 1)",
        f"{corpus}:5: field 'id': expected a string or integer, got nothing",
    ]
    assert not (workdir / "index_bad").exists()
    # docs lists: content ids, a document repeated anywhere is stored once.
    corpus.write_text('{"docs": ["One.", "Two."]}\n{"docs": ["Two.", "Three."]}\n', encoding="utf-8")
    ids, texts = read_corpus(str(corpus))
    assert texts == ["One.", "Two.", "Three."] and len(set(ids)) == 3 and all(i.startswith("doc-") for i in ids)


def test_approximate_index_reports_its_recall_against_exact_search(workdir, checkpoints, data):
    out = workdir / "index_hnsw"
    proc = run_module(index_args(checkpoints["a"], data["corpus"], out, "--faiss", "hnsw", "--dtype", "float16"))
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "--dtype float16" in last and "--storage_dtype" in last  # its old meaning
    assert not out.exists()
    proc = run_module(
        index_args(checkpoints["a"], data["corpus"], out, "--faiss", "hnsw", "--storage_dtype", "float16")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((out / "index.json").read_text())
    assert "recall@5 against exact search" in proc.stdout
    assert meta["recall@5_vs_exact"] >= 0.95 and meta["bytes_per_document"] == 4 * 64 * 2
    assert load_file(str(out / SHARD_FILE.format(0)))["memory"].dtype == torch.float16
    # IVF on clustered random vectors: probing every cell is exact, probing one is not always.
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 32))[rng.integers(0, 50, 4000)] + 0.3 * rng.normal(size=(4000, 32))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    queries = pair_queries(vectors, 200)
    _, exact = make_search_index(vectors, SearchSettings("flat")).search(queries, 5)
    every = make_search_index(vectors, SearchSettings("ivf", nlist=64, nprobe=64))
    one = make_search_index(vectors, SearchSettings("ivf", nlist=64, nprobe=1))
    assert recall_against_exact(every, exact, queries, 5) == 1.0
    assert recall_against_exact(one, exact, queries, 5) < 1.0


def test_int8_storage_with_a_compressed_search_re_ranks_to_the_exact_order(workdir, built, checkpoints, data):
    out = workdir / "index_int8_pq"
    proc = run_module(index_args(checkpoints["a"], data["corpus"], out, "--storage_dtype", "int8", "--faiss", "pq"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((out / "index.json").read_text())
    assert meta["bytes_per_document"] == 4 * 64 + 4 * 4  # int8 values and a float32 scale per memory vector
    assert meta["search"] | {"pq_m": 32, "pq_bits": 5, "rerank": 64} == meta["search"]  # 32 bytes, 32 centroids
    assert load_file(str(out / SHARD_FILE.format(0)))["memory"].dtype == torch.int8
    exact, compact = load_index(str(built[1])), load_index(str(out))
    torch.testing.assert_close(
        compact.memory(list(range(N_DOCS))), exact.memory(list(range(N_DOCS))), atol=0.05, rtol=0
    )
    queries = pair_queries(torch.nn.functional.normalize(stored_memory(built[1]).flatten(1), dim=-1).numpy(), 30)
    _, found_exact = exact.search(queries, 5)
    scores, found = compact.search(queries, 5)
    assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(found.tolist(), found_exact.tolist())]) >= 0.95
    assert (np.diff(scores, axis=1) <= 1e-5).all()  # re-scored exactly: best first


# -- answering ----------------------------------------------------------------------------------------------
def test_answers_from_the_index_equal_answers_from_the_same_documents_as_candidates(built, checkpoints, data):
    _, out = built
    questions = [q["question"] for q in read_jsonl(data["questions"])]
    model = CLaRa.from_pretrained(str(checkpoints["a"]), batch_size=2)
    answers, ids = model.generate_from_questions(questions, index=str(out), max_new_tokens=NEW_TOKENS)
    index = load_index(str(out))
    candidates, chosen = model.generate_from_questions(
        questions, [[index.text(row) for row in range(N_DOCS)]] * len(questions), max_new_tokens=NEW_TOKENS
    )
    assert ids == [[index.ids[i] for i in row] for row in chosen.tolist()]
    assert answers == candidates
    assert all(len(row) == TOP_K for row in ids)
    # The official flag selects the same path.
    assert model.generate_from_questions(questions, index=str(out), stage2_mips=True, max_new_tokens=NEW_TOKENS) == (
        answers,
        ids,
    )
    # A checkpoint with the same compressor and memory embeddings answers from the same index.
    other = CLaRa.from_pretrained(str(checkpoints["a_reasoner"]))
    assert len(other.generate_from_questions(questions[:1], index=str(out), max_new_tokens=2)[1][0]) == TOP_K


def test_an_index_of_another_checkpoint_is_refused(built, checkpoints):
    _, out = built
    model = CLaRa.from_pretrained(str(checkpoints["b"]))
    with pytest.raises(CorpusIndexError, match="was built with the compressor of .*ck_a.*rebuild it"):
        model.generate_from_questions(["What is the main food of Fegund?"], index=str(out))
    proc = run_module(["clara.ask", "--checkpoint", str(checkpoints["b"]), "--index", str(out), "Where?"])
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("error: --index ") and "rebuild it" in last


def test_ask_prints_the_answer_and_the_retrieved_documents(built, checkpoints, data):
    _, out = built
    question = read_jsonl(data["questions"])[0]["question"]
    proc = run_module(
        [
            "clara.ask",
            "--checkpoint",
            str(checkpoints["a"]),
            "--index",
            str(out),
            question,
            "--max_new_tokens",
            str(NEW_TOKENS),
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = CLaRa.from_pretrained(str(checkpoints["a"]))
    answers, ids = model.generate_from_questions([question], index=str(out), max_new_tokens=NEW_TOKENS)
    index = load_index(str(out))
    lines = proc.stdout.strip().splitlines()
    assert lines[:2] == [f"Q: {question}", f"A: {answers[0]}"]
    for rank, (line, doc_id) in enumerate(zip(lines[2:], ids[0]), start=1):
        first_words = " ".join(index.text(index.ids.index(doc_id)).split()[:12])
        assert line.startswith(f"  {rank}. [") and f"] {doc_id}: {first_words}" in line
    assert len(lines) == 2 + TOP_K


# -- open-corpus evaluation ------------------------------------------------------------------------------------
def test_open_corpus_recall_and_answers_next_to_the_closed_candidate_numbers(workdir, built, checkpoints, data):
    _, out = built
    output = workdir / "open_eval.jsonl"
    proc = run_module(
        [
            "clara.evaluate",
            "--checkpoint",
            str(checkpoints["a"]),
            "--dataset",
            str(data["questions"]),
            "--index",
            str(out),
            "--max_new_tokens",
            str(NEW_TOKENS),
            "--output",
            str(output),
            "--no_progress",
        ]
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "stage2 evaluation of" in proc.stdout and "open-corpus evaluation" in proc.stdout
    metrics = json.loads((workdir / "open_eval.summary.json").read_text())["metrics"]
    assert "recall@3" in metrics  # the closed-candidate numbers stay (top-3 chosen: no recall@5)
    model = CLaRa.from_pretrained(str(checkpoints["a"]))
    records = read_jsonl(data["questions"])
    answers, _ = model.generate_from_questions(
        [r["question"] for r in records], index=str(out), max_new_tokens=NEW_TOKENS
    )
    ranked = answer_from_index(
        model.model, load_index(str(out)), [r["question"] for r in records], retrieve=5, generate=False
    ).ids
    for k in (1, 3, 5):
        hits = [len(set(r["gold_ids"]) & set(found[:k])) / len(r["gold_ids"]) for r, found in zip(records, ranked)]
        assert metrics[f"open_recall@{k}"] == pytest.approx(sum(hits) / len(hits))
    em = [exact_match(a, r["gold_answer"]) for a, r in zip(answers, records)]
    assert metrics["open_exact_match"] == pytest.approx(sum(em) / len(em))
    assert metrics["open_documents"] == N_DOCS and metrics["open_generated"] == N_QUESTIONS


# -- the bench rows ----------------------------------------------------------------------------------------------
def test_retrieval_bench_rows(workdir):
    out = workdir / "bench.json"
    proc = run_module(
        [
            "bench",
            "--retrieval",
            "--sizes",
            "2000",
            "--queries",
            "20",
            "--index_docs",
            "64",
            "--questions",
            "2",
            "--max_new_tokens",
            "2",
            "--json",
            str(out),
        ]
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {row["row"]: row for row in json.loads(out.read_text())}
    assert rows["memory per document (float32)"]["value"] == "2048 B + 2048 B"
    assert rows["memory per document (float16)"]["value"] == "1024 B + 2048 B"
    answering = [row for name, row in rows.items() if name.startswith("answer a question, 20 candidates")]
    assert len(answering) == 2 and all(r["stored_ms"] > 0 and r["compressing_ms"] > 0 for r in answering)
    search = rows["search over 2,000 documents"]
    assert search["flat_ms"] > 0 and 0.9 <= search["recall"] <= 1.0
    assert "indexing throughput" in proc.stdout
