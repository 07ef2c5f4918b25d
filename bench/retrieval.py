"""Answering from a compressed corpus (clara.index): the rows of `python -m bench --retrieval`.

- indexing throughput: documents per second through the compressor, batched, as `python -m clara.index`
  compresses them (the built-in tiny model; the example corpus's documents);
- memory per document: stored vectors n_mem x hidden x bytes of the storage dtype, plus the
  float32 copy the flat FAISS index keeps (n_mem x hidden x 4);
- search latency per question (one query at a time) over N stored documents of the tiny model's
  shape (8 memory vectors x hidden 64 = 512 floats), exact (flat) and approximate (IVF), with the
  approximate index's recall@5 against exact search. The vectors are random but clustered
  (N / 100 random centres plus noise), as embeddings of real documents are; the queries are
  fresh draws from the same distribution. Uniform random vectors have no neighbourhoods for an
  approximate index to exploit and are not what a compressor produces;
- time to answer one question with 20 candidates: from stored vectors (query reasoner, search,
  generator) versus compressing the 20 candidates for that question as CLaRa.generate_from_questions
  does with candidate lists; the same prompt, the same vectors, the same answer tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from bench.config import RETRIEVAL_STAGE
from bench.machine import add_threads_and_json, parse_with_threads
from clara.evaluation.inference import CLaRa
from clara.index.answer import answer_from_index
from clara.index.build import build_index, compress_texts
from clara.index.search import SearchSettings, make_search_index, recall_against_exact
from clara.index.store import STORAGE_DTYPES, load_index
from clara.model.checkpoint import build_model, load_model
from clara.model.model import ModelSettings

REPO = Path(__file__).resolve().parent.parent
TINY_SHAPE = (8, 64)  # memory vectors x hidden size of the tiny model at DOC_MAX_LENGTH 256, COMPRESS_RATE 32
K = 5


def tiny_model(checkpoint: str | None):
    if checkpoint:
        return load_model(checkpoint)
    settings = ModelSettings(base_model="tiny", n_mem_tokens=8, compress_rate=32, doc_max_length=256)
    torch.manual_seed(0)
    return build_model(settings, ["encoder_adapter", "decoder_adapter", "query_reasoner_adapter"])


def example_documents(count: int) -> list[str]:
    lines = (REPO / "example" / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines[:count]]


def indexing_rows(model, docs: int, batch_size: int) -> list[dict]:
    texts = example_documents(docs)
    model.eval()
    compress_texts(model, texts[:batch_size], batch_size, torch.device("cpu"))  # warm-up
    started = time.perf_counter()
    compress_texts(model, texts, batch_size, torch.device("cpu"))
    seconds = time.perf_counter() - started
    n_mem, hidden = model.tokens.n_mem, model.hidden_size
    rows = [
        {
            "row": "indexing throughput",
            "value": f"{len(texts) / seconds:.0f} docs/s",
            "detail": f"{len(texts)} example documents, batch {batch_size}, compressor forward only",
        }
    ]
    for name, dtype in STORAGE_DTYPES.items():
        stored = n_mem * hidden * dtype.itemsize
        rows.append(
            {
                "row": f"memory per document ({name})",
                "value": f"{stored} B + {n_mem * hidden * 4} B",
                "detail": f"stored {n_mem} x {hidden} x {dtype.itemsize} B; + flat FAISS copy {n_mem} x {hidden} x 4 B",
            }
        )
    return rows


def clustered_vectors(rng: np.random.Generator, centres: np.ndarray, count: int, noise: float = 0.5) -> np.ndarray:
    out = np.empty((count, centres.shape[1]), dtype=np.float32)
    for start in range(0, count, 100_000):  # in chunks: float64 temporaries of 1M x 512 would need 4 GB
        n = min(100_000, count - start)
        block = centres[rng.integers(0, len(centres), n)] + noise * rng.standard_normal(
            (n, centres.shape[1]), dtype=np.float32
        )
        out[start : start + n] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def per_query_ms(index: faiss.Index, queries: np.ndarray) -> float:
    started = time.perf_counter()
    for q in queries:
        index.search(q[None], K)
    return 1000 * (time.perf_counter() - started) / len(queries)


def search_rows(sizes: list[int], queries: int, nprobe: int) -> list[dict]:
    dim = TINY_SHAPE[0] * TINY_SHAPE[1]
    rows = []
    for size in sizes:
        rng = np.random.default_rng(size)
        centres = rng.standard_normal((max(1, size // 100), dim), dtype=np.float32)
        vectors = clustered_vectors(rng, centres, size)
        query = clustered_vectors(rng, centres, queries)
        flat = make_search_index(vectors, SearchSettings("flat"))
        flat_ms = per_query_ms(flat, query)
        _, exact = flat.search(query, K)
        del flat
        started = time.perf_counter()
        ivf = make_search_index(vectors, SearchSettings("ivf", nprobe=nprobe))
        build_s = time.perf_counter() - started
        ivf_ms = per_query_ms(ivf, query)
        recall = recall_against_exact(ivf, exact, query, K)
        rows.append(
            {
                "row": f"search over {size:,} documents",
                "value": f"flat {flat_ms:.2f} ms, ivf {ivf_ms:.2f} ms",
                "detail": f"ivf nlist {ivf.nlist} nprobe {ivf.nprobe}: recall@{K} vs exact {recall:.3f}, "
                f"built in {build_s:.0f} s; {queries} queries one at a time",
                "flat_ms": flat_ms,
                "ivf_ms": ivf_ms,
                "recall": recall,
            }
        )
        del ivf, vectors
    return rows


def answer_rows(model, questions: int, candidates: int, max_new_tokens: int, joined: int = 1) -> list[dict]:
    """Per question: answer from the stored vectors of its candidates vs compress its candidates now.

    joined > 1: each candidate is that many example documents in one text (cut at DOC_MAX_LENGTH tokens).
    """
    parts = example_documents(candidates * questions * joined)
    texts = [" ".join(parts[i : i + joined]) for i in range(0, len(parts), joined)]
    clara = CLaRa(model, stage=RETRIEVAL_STAGE, batch_size=1)
    asked = [f"What is the main food of {t.split()[0]}?" for t in texts[::candidates]]
    with tempfile.TemporaryDirectory() as tmp:
        stored, fresh = [], []
        for i, question in enumerate(asked):
            docs = texts[i * candidates : (i + 1) * candidates]
            build_index(
                model,
                [str(j) for j in range(candidates)],
                docs,
                f"{tmp}/{i}",
                show_progress=False,
                log=lambda *a, **k: None,
            )  # once per corpus, not per question: untimed
            index = load_index(f"{tmp}/{i}")
            if i == 0:  # warm-up of both paths
                answer_from_index(model, index, [question], max_new_tokens=max_new_tokens)
                clara.generate_from_questions([question], [docs], max_new_tokens=max_new_tokens)
            started = time.perf_counter()
            from_index = answer_from_index(model, index, [question], max_new_tokens=max_new_tokens)
            stored.append(time.perf_counter() - started)
            started = time.perf_counter()
            answers, chosen = clara.generate_from_questions([question], [docs], max_new_tokens=max_new_tokens)
            fresh.append(time.perf_counter() - started)
            if answers != from_index.answers or [str(c) for c in chosen[0].tolist()] != from_index.ids[0]:
                raise AssertionError(f"question {i}: the two paths disagree")
    stored_ms, fresh_ms = 1000 * statistics.median(stored), 1000 * statistics.median(fresh)
    length = "example documents" if joined == 1 else f"{joined} example documents each (up to DOC_MAX_LENGTH)"
    return [
        {
            "row": f"answer a question, {candidates} candidates of {length}",
            "value": f"stored {stored_ms:.1f} ms, compressing {fresh_ms:.1f} ms ({fresh_ms / stored_ms:.1f}x)",
            "detail": f"median of {questions} questions, batch 1, up to {max_new_tokens} new tokens; "
            "same answers and chosen documents on both paths",
            "stored_ms": stored_ms,
            "compressing_ms": fresh_ms,
        }
    ]


def format_rows(rows: list[dict]) -> str:
    width = max(len(r["row"]) for r in rows)
    value = max(len(r["value"]) for r in rows)
    lines = [f"{'measure'.ljust(width)}  {'value'.ljust(value)}  detail", f"{'-' * width}  {'-' * value}  ------"]
    lines += [f"{r['row'].ljust(width)}  {r['value'].ljust(value)}  {r['detail']}" for r in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench --retrieval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="stored documents of the search rows")
    parser.add_argument("--queries", type=int, default=100, help="search queries per size")
    parser.add_argument("--nprobe", type=int, default=16, help="IVF cells searched")
    parser.add_argument("--index_docs", type=int, default=1024, help="documents of the indexing row")
    parser.add_argument("--questions", type=int, default=10, help="questions of the answering row")
    parser.add_argument("--max_new_tokens", type=int, default=8, help="answer tokens at most (default 8)")
    parser.add_argument("--checkpoint", default=None, help="a checkpoint instead of the tiny model with fresh adapters")
    return add_threads_and_json(parser, 1)


def main(argv: list[str] | None = None) -> int:
    args = parse_with_threads(build_parser(), argv)
    model = tiny_model(args.checkpoint)
    model.requires_grad_(False)
    rows = indexing_rows(model, args.index_docs, 32)
    rows += answer_rows(model, args.questions, 20, args.max_new_tokens)
    rows += answer_rows(model, args.questions, 20, args.max_new_tokens, joined=8)
    rows += search_rows([int(s) for s in args.sizes.split(",") if s], args.queries, args.nprobe)
    print(format_rows(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
