"""The index at scale, on a synthetic corpus: the rows of `python -m bench --index_scale`.

The corpus is made here: N passages of about 150 words (sentences in the example corpus's style about made-up
places, so that a passage fits the tiny model's 256 tokens), compressed by the built-in tiny model with fresh
adapters. Reported:
- build throughput in passages/s (compression, and the whole build with the search structure);
- bytes per passage on disk (memory shards and search file) and in RAM while serving (the search structure;
  shards are memory-mapped), for each storage and search choice;
- search latency p50 / p99 (one question at a time through CorpusIndex.search, re-ranking included) and
  recall@5 against exact search, for flat, int8 + a compressed search re-ranked exactly, and HNSW.
The questions go through the query reasoner, as a served question does.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

import numpy as np
import torch

from bench.index_choices import restore
from bench.machine import add_threads_and_json, parse_with_threads
from bench.retrieval import tiny_model
from clara.files import write_json_atomic
from clara.index.answer import encode_questions
from clara.index.build import build_index
from clara.index.search import SearchSettings
from clara.index.store import load_index

KINDS = ("valley", "city", "harbor", "island", "village", "kingdom", "republic")
FACTS = {
    "national flower": ("daisy", "aster", "clover", "lily", "iris", "rose", "tulip"),
    "chief metal": ("pewter", "tin", "chrome", "gold", "bronze", "silver", "nickel"),
    "banner color": ("teal", "crimson", "purple", "brown", "grey", "green", "amber"),
    "main food": ("eggs", "corn", "plums", "rice", "bread", "fish", "beans"),
    "lucky number": ("six", "seven", "ten", "twenty", "thirty", "three", "nine"),
}
SYLLABLES = ("fe", "gund", "trom", "gu", "zoth", "nas", "fil", "thai", "zas", "tham", "nor", "lein", "tain", "mor")
CHOICES = (("float32", "flat"), ("int8", "pq"), ("float32", "hnsw"))


def place_name(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))).capitalize()


def synthetic_passage(rng: random.Random, words: int = 150) -> str:
    """About `words` words: places, each with its kind and some facts, one sentence each."""
    sentences: list[str] = []
    while sum(len(s.split()) for s in sentences) < words:
        name = place_name(rng)
        sentences.append(f"{name} is a {rng.choice(KINDS)}.")
        for fact in rng.sample(sorted(FACTS), 3):
            sentences.append(f"Its {fact} is {rng.choice(FACTS[fact])}.")
    return " ".join(sentences)


def synthetic_corpus(count: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    return [f"passage-{i:08d}" for i in range(count)], [synthetic_passage(rng) for _ in range(count)]


def folder_bytes(folder: str, prefixes: tuple[str, ...]) -> int:
    return sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder) if n.startswith(prefixes))


def latency_and_rows(index, queries: np.ndarray) -> tuple[float, float, np.ndarray]:
    """p50 and p99 milliseconds of one question at a time, and the top-5 rows of each."""
    times, rows = [], []
    for query in queries:
        started = time.perf_counter()
        _, found = index.search(query[None], 5)
        times.append(1000 * (time.perf_counter() - started))
        rows.append(found[0])
    return float(np.percentile(times, 50)), float(np.percentile(times, 99)), np.stack(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench --index_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=20_000, help="passages of the synthetic corpus")
    parser.add_argument("--queries", type=int, default=200, help="questions searched one at a time")
    parser.add_argument("--batch_size", type=int, default=32, help="passages per forward")
    parser.add_argument("--folder", default=None, help="keep the built indexes here (default: a temporary folder)")
    return add_threads_and_json(parser, 2)


def show_row(row: dict) -> None:
    print(
        f"{row['choice']:14s} disk {row['disk_bytes_per_passage']:.0f} B  RAM {row['ram_bytes_per_passage']:.0f} B  "
        f"p50 {row['p50_ms']:.2f} ms  p99 {row['p99_ms']:.2f} ms  recall@5 {row['recall@5_vs_exact']:.3f}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_with_threads(build_parser(), argv)
    model = tiny_model(None).eval()
    started = time.perf_counter()
    ids, texts = synthetic_corpus(args.passages)
    words = sum(len(t.split()) for t in texts) / len(texts)
    print(
        f"{args.passages} synthetic passages of {words:.0f} words on average in {time.perf_counter() - started:.0f} s"
    )
    questions = [f"What is the main food of {t.split()[0]}?" for t in texts[:: max(1, len(texts) // args.queries)]]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.folder or tmp
        base = os.path.join(root, "float32+flat")
        started = time.perf_counter()
        meta = build_index(model, ids, texts, base, batch_size=args.batch_size, show_progress=True, log=print)
        build_s = time.perf_counter() - started
        compress_rate = args.passages / meta["compress_seconds_rank0"]
        print(
            f"build: {compress_rate:.0f} passages/s compressing, {args.passages / build_s:.0f} passages/s in all "
            f"({build_s:.0f} s, merge {meta['merge_seconds']} s)",
            flush=True,
        )
        with torch.no_grad():
            queries = encode_questions(model, questions[: args.queries], torch.device("cpu"))
        exact = None
        for storage_dtype, kind in CHOICES:
            folder = os.path.join(root, f"{storage_dtype}+{kind}")
            started = time.perf_counter()
            if folder != base:
                restore(base, folder, storage_dtype, SearchSettings(kind))
            made_s = time.perf_counter() - started
            index = load_index(folder)
            p50, p99, found = latency_and_rows(index, queries)
            exact = found if exact is None else exact
            recall = float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(found.tolist(), exact.tolist())]))
            row = {
                "choice": f"{storage_dtype}+{kind}",
                "passages": args.passages,
                "disk_bytes_per_passage": folder_bytes(folder, ("memory-", "search-")) / args.passages,
                "text_bytes_per_passage": folder_bytes(folder, ("documents-",)) / args.passages,
                "ram_bytes_per_passage": os.path.getsize(os.path.join(folder, index.meta["search_file"]))
                / args.passages,
                "p50_ms": p50,
                "p99_ms": p99,
                "recall@5_vs_exact": recall,
                "made_from_float32_s": round(made_s, 1),
                "compress_passages_per_s": compress_rate,
                "build_passages_per_s": args.passages / build_s,
                "search": index.meta["search"],
            }
            rows.append(row)
            show_row(row)
            index.close()
    if args.json:
        write_json_atomic(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
