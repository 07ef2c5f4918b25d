"""A corpus that grows and shrinks: `python -m clara.index add | remove | compact` (clara.index.update).

The promise checked here: after any sequence of add, remove and compact, search returns what a fresh build of
the resulting corpus returns (the same top-k ids, ties by id, scores within 1e-5: batches pad differently, so
floats move by about 1e-6). The checkpoints are the noisy stage2 checkpoints of the index tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import clara.index.build as build
from clara.errors import CorpusIndexError
from clara.index.search import normalised_rows, pair_queries
from clara.index.store import PENDING_FILE, SHARD_FILE, load_index, referenced_files
from clara.index.update import add_documents, remove_documents
from clara.locks import holding
from clara.model.checkpoint import load_model
from tests.helpers import EXAMPLE, noisy_pair, read_jsonl, run_module

SHARD = 8
K = 5


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("update")


@pytest.fixture(scope="module")
def checkpoints(workdir) -> dict[str, Path]:
    return noisy_pair(workdir)


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return read_jsonl(EXAMPLE / "corpus.jsonl")[:40]


def write_corpus(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return path


def build_folder(checkpoint: Path, corpus: Path, out: Path) -> None:
    proc = run_module(
        ["clara.index", "--checkpoint", str(checkpoint), "--corpus", str(corpus), "--out", str(out)]
        + ["--batch_size", "4", "--shard_size", str(SHARD), "--no_progress"]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def add(checkpoint: Path, index: Path, corpus: Path, *extra: str):
    return run_module(
        ["clara.index", "add", "--checkpoint", str(checkpoint), "--index", str(index), "--corpus", str(corpus)]
        + ["--batch_size", "3", "--no_progress", *extra]
    )


def remove(index: Path, ids: list[str], ids_file: Path):
    ids_file.write_text("".join(i + "\n" for i in ids), encoding="utf-8")
    return run_module(["clara.index", "remove", "--index", str(index), "--ids", str(ids_file)])


def assert_searches_alike(changed: Path, fresh: Path) -> None:
    """Every query finds the same top-k ids in both, with scores within 1e-5."""
    a, b = load_index(str(changed)), load_index(str(fresh))
    assert a.documents == b.documents
    rows = normalised_rows(b.memory(list(range(len(b.ids)))))
    queries = np.concatenate([rows, pair_queries(rows, 60)])  # stored documents and points between them
    scores_a, rows_a = a.search(queries, K)
    scores_b, rows_b = b.search(queries, K)
    assert [[a.ids[r] for r in found] for found in rows_a.tolist()] == [
        [b.ids[r] for r in found] for found in rows_b.tolist()
    ]
    np.testing.assert_allclose(scores_a, scores_b, atol=1e-5)


@pytest.mark.slow
def test_after_add_remove_and_compact_search_equals_a_fresh_build(workdir, checkpoints, docs):
    base, new = docs[:24], docs[24:36]
    out = workdir / "grown"
    build_folder(checkpoints["a"], write_corpus(workdir / "base.jsonl", base), out)

    proc = add(checkpoints["a"], out, write_corpus(workdir / "new.jsonl", new))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Added 12 documents to {out}: 36 documents, generation 1" in proc.stdout
    gone = [docs[0]["id"], docs[5]["id"], docs[30]["id"]]
    proc = remove(out, gone, workdir / "gone.txt")
    assert proc.returncode == 0 and "33 documents, generation 2" in proc.stdout, proc.stderr
    now = [d for d in base + new if d["id"] not in gone]
    build_folder(checkpoints["a"], write_corpus(workdir / "now.jsonl", now), workdir / "fresh_1")
    assert_searches_alike(out, workdir / "fresh_1")

    # A stored id comes back with a new text only with --replace.
    changed = [{"id": docs[3]["id"], "text": "Vorlan is a kingdom. Its main food is rice."}, docs[36]]
    proc = add(checkpoints["a"], out, write_corpus(workdir / "changed.jsonl", changed))
    assert proc.returncode == 2 and f"1 id(s) already in --index {out}: '{docs[3]['id']}'" in proc.stderr
    assert "--replace" in proc.stderr
    proc = add(checkpoints["a"], out, workdir / "changed.jsonl", "--replace")
    assert proc.returncode == 0 and "34 documents, generation 3" in proc.stdout, proc.stderr
    now = [d for d in now if d["id"] != docs[3]["id"]] + changed
    build_folder(checkpoints["a"], write_corpus(workdir / "now2.jsonl", now), workdir / "fresh_2")
    assert_searches_alike(out, workdir / "fresh_2")

    before = json.loads((out / "index.json").read_text())
    proc = run_module(["clara.index", "compact", "--index", str(out)])
    assert proc.returncode == 0 and "34 documents in 5 shard(s), generation 4" in proc.stdout, proc.stderr
    meta = json.loads((out / "index.json").read_text())
    assert meta["removed"] == [] and meta["rows"] == 34
    assert_searches_alike(out, workdir / "fresh_2")
    # What neither generation 4 nor 3 (a server may still answer from it) reads is gone.
    left = {p.name for p in out.iterdir() if p.name.startswith(("memory-", "documents-", "search-", "pending"))}
    assert left == referenced_files(meta) | referenced_files(before)
    first = before["next_shard"]
    assert {shard["number"] for shard in meta["shards"]} == set(range(first, first + 5))  # numbers never reused


@pytest.fixture(scope="module")
def small(workdir, checkpoints, docs) -> Path:
    """An index of 12 documents whose ids are passages (`DOC#N`) of 4 documents."""
    passages = [{"id": f"doc{i // 3}#{i % 3}", "text": d["text"]} for i, d in enumerate(docs[:12])]
    out = workdir / "small"
    build_folder(checkpoints["a"], write_corpus(workdir / "passages.jsonl", passages), out)
    return out


def test_a_document_id_removes_its_passages_and_a_passage_id_one(workdir, small, tmp_path):
    out = tmp_path / "index"
    out.mkdir()
    for path in small.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    remove_documents(str(out), ["doc1"], log=lambda *a: None)
    meta = remove_documents(str(out), ["doc2#0", "doc1#2"], log=lambda *a: None)  # doc1#2: removed already
    index = load_index(str(out))
    assert meta["generation"] == 2 and index.documents == 8
    assert sorted(index.ids[r] for r in index.removed) == ["doc1#0", "doc1#1", "doc1#2", "doc2#0"]
    rows = normalised_rows(index.memory(list(range(12))))
    _, found = index.search(rows, 8)
    assert not set(found.flatten().tolist()) & index.removed  # search never returns a removed row
    with pytest.raises(CorpusIndexError, match=r"1 id\(s\) not in --index .*'doc9'"):
        remove_documents(str(out), ["doc0", "doc9"])
    # The command line: the same message, exit 2, nothing changed.
    proc = remove(out, ["doc9"], tmp_path / "ids.txt")
    assert proc.returncode == 2 and "'doc9'" in proc.stderr.strip().splitlines()[-1]
    assert load_index(str(out)).generation == 2


def test_another_compressor_and_a_held_lock_are_refused(workdir, small, checkpoints, docs, tmp_path):
    corpus = write_corpus(tmp_path / "more.jsonl", docs[20:22])
    proc = add(checkpoints["b"], small, corpus)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "was built with the compressor of" in last and "fingerprint" in last
    with holding(str(small), "a test"):
        proc = remove(small, ["doc0"], tmp_path / "ids.txt")
    assert proc.returncode == 2 and "is in use by another run" in proc.stderr and "a test" in proc.stderr
    assert load_index(str(small)).generation == 0


def test_an_add_killed_after_its_first_shard_resumes(workdir, small, checkpoints, docs, tmp_path, monkeypatch):
    out = tmp_path / "index"
    out.mkdir()
    for path in small.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    corpus = write_corpus(tmp_path / "more.jsonl", docs[20:40])  # 20 documents: new shards 2, 3 and 4
    model = load_model(str(checkpoints["a"]))
    written = build.write_shard

    def write_one_then_die(path, number, *args):
        if number > 2:
            raise KeyboardInterrupt  # what kill -9 leaves: the pending plan and one new shard
        written(path, number, *args)

    monkeypatch.setattr(build, "write_shard", write_one_then_die)
    # A killed add of other documents first: its shard 2 must not be taken for this add's.
    with pytest.raises(KeyboardInterrupt):
        add_documents(model, str(out), [d["id"] for d in docs[30:40]], [d["text"] for d in docs[30:40]])
    with pytest.raises(KeyboardInterrupt):
        add_documents(model, str(out), [d["id"] for d in docs[20:40]], [d["text"] for d in docs[20:40]])
    assert (out / PENDING_FILE).exists() and (out / SHARD_FILE.format(2)).exists()
    assert docs[20]["id"] in (out / "documents-00002.jsonl").read_text()
    assert json.loads((out / "index.json").read_text())["generation"] == 0  # nothing published
    kept = (out / SHARD_FILE.format(2)).stat().st_mtime_ns
    proc = add(checkpoints["a"], out, corpus)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Resuming the add" in proc.stdout and "1 of 3 new shard(s) already built" in proc.stdout
    assert (out / SHARD_FILE.format(2)).stat().st_mtime_ns == kept
    index = load_index(str(out))
    assert index.generation == 1 and index.documents == 32 and not (out / PENDING_FILE).exists()
    assert index.ids[12:] == [d["id"] for d in docs[20:40]]
    assert torch.equal(index.memory(list(range(12))), load_index(str(small)).memory(list(range(12))))
    scores, found = index.search(normalised_rows(index.memory(list(range(12, 32)))), 1)
    assert found[:, 0].tolist() == list(range(12, 32)) and np.allclose(scores, 1.0, atol=1e-5)
