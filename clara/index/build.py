"""Building an index: every document compressed once (each process its own shards, an interrupted build resumes
with the missing ones), then rank 0 merges the shards into the search index and the documents file."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import faiss
import numpy as np
import torch
from safetensors.torch import save_file

from clara.errors import CorpusIndexError
from clara.files import write_json_atomic
from clara.index.corpus import corpus_hash
from clara.index.search import SearchSettings, make_search_index, normalised_rows, pair_queries, recall_against_exact
from clara.index.store import (
    BUILD_FILE,
    DOCS_FILE,
    FAISS_FILE,
    INDEX_FORMAT,
    INDEX_FORMAT_VERSION,
    META_FILE,
    SHARD_FILE,
    STORAGE_DTYPES,
    compressor_fingerprint,
    read_json,
    read_shard,
)
from clara.locks import LOCK_FILES
from clara.model.collate import encode_documents
from clara.model.model import ClaraModel, eval_mode
from clara.parallel.distributed import broadcast

RECALL_QUERIES = 1000
RECALL_K = 5
# What must agree between an unfinished build and the one asked for before its shards are reused.
BUILD_KEYS = ("fingerprint", "corpus_sha256", "documents", "n_mem", "hidden", "storage_dtype", "shard_size")


def _check_resumable(out_dir: str, plan: dict) -> str | None:
    """None when out_dir may hold this build, else the one-line reason it may not."""
    previous = read_json(os.path.join(out_dir, BUILD_FILE))
    if previous is None:
        if os.path.isdir(out_dir) and set(os.listdir(out_dir)) - set(LOCK_FILES):
            return f"--out {out_dir}: folder exists and is not a corpus index; choose a new folder"
        return None
    differ = [key for key in BUILD_KEYS if previous.get(key) != plan[key]]
    if differ:
        return (
            f"--out {out_dir}: holds a build of another corpus or checkpoint (differs in {', '.join(differ)}); "
            "choose a new folder or delete this one"
        )
    return None


@torch.no_grad()
def compress_texts(
    model: ClaraModel, texts: list[str], batch_size: int, device: torch.device, progress=None
) -> torch.Tensor:
    """Memory states [D, n, H] (float32, on the CPU) of the texts, compressed batch_size at a time."""
    parts = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        ids, mask, _ = encode_documents(model.tokenizer, model.tokens, chunk, model.settings.doc_max_length)
        parts.append(model.compress(ids.to(device), mask.to(device))[0].float().cpu())
        if progress is not None:
            progress.update(len(chunk))
    return torch.cat(parts)


def build_index(
    model: ClaraModel,
    ids: list[str],
    texts: list[str],
    out_dir: str,
    *,
    batch_size: int = 32,
    shard_size: int = 4096,
    storage_dtype: str = "float32",
    search: SearchSettings | None = None,
    checkpoint: str = "",
    corpus: str = "",
    rank: int = 0,
    world: int = 1,
    device: torch.device | None = None,
    show_progress: bool = True,
    log=print,
) -> dict:
    """Compress every document (this rank's shards), merge on rank 0; returns the index's meta (every rank)."""
    import torch.distributed as dist
    from tqdm import tqdm

    search = search or SearchSettings()
    device = device if device is not None else model.mem_embeddings.device
    if storage_dtype not in STORAGE_DTYPES:
        raise CorpusIndexError(f"--storage_dtype {storage_dtype!r}: expected one of {', '.join(STORAGE_DTYPES)}")
    if len(set(ids)) != len(ids):
        raise CorpusIndexError("document ids must be unique")
    n_shards = math.ceil(len(ids) / shard_size)
    plan = {
        "format": INDEX_FORMAT,
        "format_version": INDEX_FORMAT_VERSION,
        "checkpoint": checkpoint,
        "fingerprint": compressor_fingerprint(model),
        "corpus": corpus,
        "corpus_sha256": corpus_hash(ids, texts),
        "documents": len(ids),
        "n_mem": model.tokens.n_mem,
        "hidden": model.hidden_size,
        "storage_dtype": storage_dtype,
        "shard_size": shard_size,
        "shards": n_shards,
    }
    problem = None
    if rank == 0:
        problem = _check_resumable(out_dir, plan)
        if problem is None:
            os.makedirs(out_dir, exist_ok=True)
            write_json_atomic(os.path.join(out_dir, BUILD_FILE), plan)
    problem = broadcast(problem, rank, world)
    if problem:
        raise CorpusIndexError(problem)

    shard_path = [os.path.join(out_dir, SHARD_FILE.format(i)) for i in range(n_shards)]
    mine = [i for i in range(rank, n_shards, world) if not os.path.isfile(shard_path[i])]
    done = n_shards - sum(not os.path.isfile(p) for p in shard_path)
    if rank == 0 and done:
        log(f"Resuming {out_dir}: {done} of {n_shards} shard(s) already built")
    todo = sum(len(range(i * shard_size, min((i + 1) * shard_size, len(ids)))) for i in mine)
    progress = None
    if show_progress and rank == 0:
        progress = tqdm(
            total=todo,
            desc="index" + (" (rank 0)" if world > 1 else ""),
            unit="doc",
            dynamic_ncols=True,
            file=sys.stderr,
        )
    started = time.perf_counter()
    with eval_mode(model):
        for i in mine:
            rows = slice(i * shard_size, min((i + 1) * shard_size, len(ids)))
            memory = compress_texts(model, texts[rows], batch_size, device, progress)
            tmp = shard_path[i] + f".tmp{rank}"
            save_file(
                {"memory": memory.to(STORAGE_DTYPES[storage_dtype]).contiguous()},
                tmp,
                metadata={"first_row": str(rows.start)},
            )
            os.replace(tmp, shard_path[i])
    compress_seconds = time.perf_counter() - started
    if progress is not None:
        progress.close()
    if world > 1:
        dist.barrier()
    meta = None
    if rank == 0:
        meta = _merge(out_dir, plan, ids, texts, search, log)
        meta["compressed_here"] = todo
        meta["compress_seconds_rank0"] = round(compress_seconds, 3)
        write_json_atomic(os.path.join(out_dir, META_FILE), meta)
    return broadcast(meta, rank, world)


def _merge(out_dir: str, plan: dict, ids: list[str], texts: list[str], search: SearchSettings, log) -> dict:
    """Rank 0: the search index over every shard, the documents file and the figures of the build."""
    started = time.perf_counter()
    vectors = np.concatenate([normalised_rows(read_shard(out_dir, i)) for i in range(plan["shards"])])
    index = make_search_index(vectors, search)
    effective = {"nlist": index.nlist, "nprobe": index.nprobe} if search.kind == "ivf" else {}
    meta = {
        **plan,
        "search": search.__dict__ | effective,
        "bytes_per_document": plan["n_mem"] * plan["hidden"] * STORAGE_DTYPES[plan["storage_dtype"]].itemsize,
    }
    if search.kind != "flat":
        queries = pair_queries(vectors, min(RECALL_QUERIES, len(vectors)))
        k = min(RECALL_K, len(vectors))
        _, exact_rows = make_search_index(vectors, SearchSettings("flat")).search(queries, k)
        meta[f"recall@{k}_vs_exact"] = recall_against_exact(index, exact_rows, queries, k)
        log(
            f"{search.kind} index: recall@{k} against exact search {meta[f'recall@{k}_vs_exact']:.4f} "
            f"({len(queries)} queries: midpoints of random pairs of stored documents)"
        )
    faiss.write_index(index, os.path.join(out_dir, FAISS_FILE + ".tmp"))
    os.replace(os.path.join(out_dir, FAISS_FILE + ".tmp"), os.path.join(out_dir, FAISS_FILE))
    with open(os.path.join(out_dir, DOCS_FILE + ".tmp"), "w", encoding="utf-8") as out:
        out.writelines(
            json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n" for doc_id, text in zip(ids, texts)
        )
    os.replace(os.path.join(out_dir, DOCS_FILE + ".tmp"), os.path.join(out_dir, DOCS_FILE))
    meta["merge_seconds"] = round(time.perf_counter() - started, 3)
    return meta
