"""What each storage and search choice of clara.index costs in answers: the rows of `python -m bench --index_choices`.

The corpus is compressed once (float32, exact search); every other choice is made from those vectors (stored in
its dtype, searched with its structure), so that the rows differ only in the choice. For each: open-corpus
recall@5 and answer exact match over the dataset's questions (clara.evaluation.open_corpus, as
`python -m clara.evaluate --index` computes them), their difference from float32 + flat, and the bytes per
document: on disk (memory shards and search file; the texts, the same for every choice, left out) and in RAM
while serving (the search structure; the shards are memory-mapped and only re-ranked rows are read).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from safetensors import safe_open

from bench.machine import add_threads_and_json, parse_with_threads
from clara.evaluation.open_corpus import open_corpus_summary
from clara.files import write_json_atomic
from clara.index.build import build_index, write_search, write_shard
from clara.index.corpus import read_corpus
from clara.index.search import SearchSettings
from clara.index.store import bytes_per_document, load_index, publish_meta, shard_names, to_storage
from clara.model.checkpoint import load_model

CHOICES = (
    "float32+flat,bfloat16+flat,float16+flat,int8+flat,fp8+flat,float32+hnsw,float32+ivf,"
    "int8+pq,int8+ivfpq,int8+opq,fp8+pq"
)


def restore(base: str, out: str, storage_dtype: str, search: SearchSettings) -> None:
    """An index of the base's documents and vectors, stored in storage_dtype and searched with `search`."""
    meta = load_index(base).meta
    os.makedirs(out)
    for shard in meta["shards"]:
        memory_name, texts_name = shard_names(shard["number"])
        with safe_open(os.path.join(base, memory_name), framework="pt") as handle:
            memory = handle.get_tensor("memory")
        with open(os.path.join(base, texts_name), encoding="utf-8") as handle:
            docs = [json.loads(line) for line in handle]
        write_shard(
            out, shard["number"], to_storage(memory, storage_dtype), [d["id"] for d in docs], [d["text"] for d in docs]
        )
    fields = write_search(out, meta["shards"], search, 0, lambda *a: None)
    bytes_each = bytes_per_document(meta["n_mem"], meta["hidden"], storage_dtype)
    publish_meta(out, {**meta, "storage_dtype": storage_dtype, "bytes_per_document": bytes_each, **fields}, None)


def measure(model, folder: str, records: list[dict], batch_size: int, max_new_tokens: int) -> dict:
    index = load_index(folder)
    started = time.perf_counter()
    summary, _ = open_corpus_summary(
        model,
        index,
        [r["question"] for r in records],
        [r["gold_answer"] for r in records],
        [r["gold_ids"] for r in records],
        len(records),
        (1, 3, 5),
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
    )
    documents = index.documents
    on_disk = sum(
        os.path.getsize(os.path.join(folder, name))
        for name in os.listdir(folder)
        if name.startswith(("memory-", "search-"))
    )
    in_ram = os.path.getsize(os.path.join(folder, index.meta["search_file"]))
    return {
        "exact_match": summary["exact_match"],
        "recall@5": summary["recall@5"],
        "disk_bytes_per_doc": on_disk / documents,
        "ram_bytes_per_doc": in_ram / documents,
        "vector_bytes_per_doc": index.meta["bytes_per_document"],
        "search": index.meta["search"],
        "seconds": round(time.perf_counter() - started, 1),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench --index_choices", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a stage2 checkpoint (the open-corpus walk-through's)")
    parser.add_argument("--corpus", default="example/corpus.jsonl", help="the corpus to index")
    parser.add_argument(
        "--dataset", default="example/open_corpus_data_eval.jsonl", help="questions with gold_answer and gold_ids"
    )
    parser.add_argument("--choices", default=CHOICES, help="storage+search pairs, comma-separated")
    parser.add_argument("--batch_size", type=int, default=8, help="questions per forward")
    parser.add_argument("--max_new_tokens", type=int, default=16, help="answer tokens at most (default 16)")
    return add_threads_and_json(parser, 2)


def main(argv: list[str] | None = None) -> int:
    args = parse_with_threads(build_parser(), argv)
    model = load_model(args.checkpoint)
    ids, texts = read_corpus(args.corpus)
    with open(args.dataset, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "float32+flat")
        build_index(model, ids, texts, base, checkpoint=args.checkpoint, show_progress=False, log=lambda *a: None)
        for choice in args.choices.split(","):
            storage_dtype, kind = choice.split("+")
            folder = os.path.join(tmp, choice)
            if folder != base:
                restore(base, folder, storage_dtype, SearchSettings(kind))
            row = {"choice": choice, **measure(model, folder, records, args.batch_size, args.max_new_tokens)}
            rows.append(row)
            print(
                f"{choice:16s} EM {row['exact_match']:.2f}  recall@5 {row['recall@5']:.2f}  "
                f"disk {row['disk_bytes_per_doc']:.0f} B/doc  RAM {row['ram_bytes_per_doc']:.0f} B/doc  "
                f"({row['seconds']} s)",
                flush=True,
            )
    if args.json:
        write_json_atomic(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
