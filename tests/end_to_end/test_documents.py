"""A folder of documents as a user has them, synthesized and indexed (issue 30's "done when"): a 40-page PDF, an
HTML page, a 20,000-word Markdown file, an empty file and a broken PDF. Every passage fits the compressor, the
files that gave nothing are named, summary.json counts each file's passages, and the index uses the passages
synthesis cut, or refuses them when the checkpoint reads another length."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from clara.index.build import build_index
from clara.index.passages import load_tokenizer, token_counter
from clara.index.store import load_index
from clara.model.checkpoint import load_model
from clara.ports import free_port
from tests.end_to_end.test_synthesize import FAST
from tests.fake_openai_server import FakeOpenAI
from tests.helpers import noisy_checkpoint, read_jsonl, run_module, subprocess_env, write_pdf

pytestmark = pytest.mark.slow

KINDS = ("kingdom", "harbor", "valley", "city")
FACTS = ("main food", "lucky number", "banner color", "sacred animal")
VALUES = ("rice", "seven", "teal", "owl", "corn", "amber", "otter", "nine")
DOC_MAX_LENGTH = 128  # the noisy checkpoint's


def place(rng: random.Random, number: int) -> str:
    name = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(3)).capitalize() + str(number)
    facts = " ".join(f"Its {fact} is {rng.choice(VALUES)}." for fact in rng.sample(FACTS, 3))
    return f"{name} is a {rng.choice(KINDS)}. {facts}"


def make_folder(folder: Path) -> None:
    rng = random.Random(30)
    folder.mkdir()
    words, paragraphs = 0, ["# The atlas"]
    while words < 20_000:
        paragraphs.append(place(rng, len(paragraphs)))
        words += len(paragraphs[-1].split())
    (folder / "atlas.md").write_text("\n\n".join(paragraphs), encoding="utf-8")
    pages = ["\n\n".join(place(rng, 1000 + 10 * page + i) for i in range(8)) for page in range(40)]
    write_pdf(folder / "report.pdf", "\f".join(pages))
    body = "".join(f"<p>{place(rng, 2000 + i)}</p>" for i in range(5))
    (folder / "harbors.html").write_text(f"<html><body><script>x()</script>{body}</body></html>", encoding="utf-8")
    (folder / "empty.txt").write_text("", encoding="utf-8")
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog")


def test_a_folder_is_synthesized_and_indexed_within_doc_max_length(tmp_path):
    docs, out = tmp_path / "docs", tmp_path / "data"
    make_folder(docs)
    with FakeOpenAI({}) as fake:
        proc = run_module(
            ["clara", "synthesize", "--corpus", str(docs), "--out", str(out), "--llm", f"openai:{fake.url}"]
            + ["--model", "fake-llm", "--tokenizer", "tiny", "--doc_max_length", str(DOC_MAX_LENGTH), *FAST]
            + ["--rounds", "0", "--concurrency", "64", "--shard_size", "2048"]
        )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "skipped broken.pdf: not a readable PDF" in proc.stdout
    assert "skipped empty.txt: empty (no text)" in proc.stdout
    assert "3 of 5 files read (2 skipped)" in proc.stdout

    saved = json.loads((out / "passages.json").read_text(encoding="utf-8"))
    assert saved["tokenizer"] == "tiny" and saved["doc_max_length"] == DOC_MAX_LENGTH
    passages = saved["passages"]
    count = token_counter(load_tokenizer("tiny"))
    assert max(count([p["text"] for p in passages])) <= DOC_MAX_LENGTH
    corpus = json.loads((out / "summary.json").read_text(encoding="utf-8"))["corpus"]
    per_file = corpus["passages_per_document"]
    assert set(per_file) == {"atlas.md", "report.pdf", "harbors.html"}
    assert per_file["atlas.md"] > 100 and per_file["report.pdf"] >= 40 and per_file["harbors.html"] > 1
    assert sum(per_file.values()) == len(passages) == corpus["passages"]
    assert set(corpus["skipped"]) == {"broken.pdf", "empty.txt"}
    assert {p["id"] for p in passages if p["document"] == "harbors.html"} == {
        f"harbors.html#{n}" for n in range(1, per_file["harbors.html"] + 1)
    }
    stage2 = read_jsonl(out / "stage2.jsonl")
    passage_ids = {p["id"] for p in passages}
    assert stage2 and all(set(r["gold_ids"]) <= passage_ids for r in stage2)

    checkpoint = noisy_checkpoint(
        tmp_path / "ck", {"encoder_adapter": 1, "decoder_adapter": 2, "query_reasoner_adapter": 3}
    )
    index = tmp_path / "index"
    proc = run_module(
        ["clara", "index", "--checkpoint", str(checkpoint), "--corpus", str(out / "passages.json")]
        + ["--out", str(index), "--no_progress", "--batch_size", "64"]
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"Every passage fits DOC_MAX_LENGTH={DOC_MAX_LENGTH}" in proc.stdout
    assert load_index(str(index)).ids == [p["id"] for p in passages]


def test_the_index_refuses_passages_cut_for_another_length(tmp_path):
    docs, out = tmp_path / "docs", tmp_path / "data"
    docs.mkdir()
    (docs / "atlas.md").write_text("\n\n".join(place(random.Random(i), i) for i in range(30)), encoding="utf-8")
    with FakeOpenAI({}) as fake:
        proc = run_module(
            ["clara", "synthesize", "--corpus", str(docs), "--out", str(out), "--llm", f"openai:{fake.url}"]
            + ["--model", "fake-llm", "--tokenizer", "tiny", "--doc_max_length", "64", "--rounds", "0", *FAST]
        )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checkpoint = noisy_checkpoint(
        tmp_path / "ck", {"encoder_adapter": 1, "decoder_adapter": 2, "query_reasoner_adapter": 3}
    )
    proc = run_module(
        ["clara", "index", "--checkpoint", str(checkpoint), "--corpus", str(out / "passages.json")]
        + ["--out", str(tmp_path / "index"), "--no_progress"]
    )
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DOC_MAX_LENGTH=64" in proc.stderr and f"DOC_MAX_LENGTH={DOC_MAX_LENGTH}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_evaluate_says_how_many_documents_the_compressor_reads_only_the_beginning_of(tmp_path):
    rng = random.Random(1)
    long_document = " ".join(place(rng, i) for i in range(20))
    records = [
        {"question": "What is the main food?", "docs": [long_document] + [place(rng, 100 + i) for i in range(3)]}
        | {"gold_answer": "rice", "pos_index": [0]},
        {"question": "What is the lucky number?", "docs": [place(rng, 200 + i) for i in range(4)]}
        | {"gold_answer": "seven", "pos_index": [1]},
    ]
    dataset = tmp_path / "eval.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    checkpoint = noisy_checkpoint(
        tmp_path / "ck", {"encoder_adapter": 1, "decoder_adapter": 2, "query_reasoner_adapter": 3}
    )
    proc = run_module(
        ["clara", "evaluate", "--checkpoint", str(checkpoint), "--dataset", str(dataset), "--max_new_tokens", "2"]
        + ["--no_progress"]
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"1 of 8 documents of the records are longer than DOC_MAX_LENGTH={DOC_MAX_LENGTH} tokens" in proc.stdout


def test_serve_says_how_many_stored_documents_the_compressor_read_only_the_beginning_of(tmp_path):
    """An index built without cutting (the Python API, or an earlier clara) may hold longer documents."""
    rng = random.Random(2)
    checkpoint = noisy_checkpoint(
        tmp_path / "ck", {"encoder_adapter": 1, "decoder_adapter": 2, "query_reasoner_adapter": 3}
    )
    texts = [" ".join(place(rng, 10 * i + j) for j in range(8 if i < 2 else 1)) for i in range(8)]
    model = load_model(str(checkpoint), torch.float32, "eager")
    build_index(model, [f"d{i}" for i in range(8)], texts, str(tmp_path / "index"), show_progress=False, log=print)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "clara", "serve", "--checkpoint", str(checkpoint), "--index", str(tmp_path / "index")]
        + ["--port", str(port)],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while server.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
    finally:
        server.terminate()
        output = server.communicate(timeout=60)[0]
    assert f"2 of 8 documents of {tmp_path / 'index'} are longer than DOC_MAX_LENGTH={DOC_MAX_LENGTH}" in output, output
