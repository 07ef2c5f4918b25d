"""Building an index: every document compressed once (each process its own shards, an interrupted build resumes
with the missing ones: clara.parallel.shards), then rank 0 writes the search structure, one shard at a time, and
publishes index.json. Writing shards and search structures is shared with add and compact (clara.index.update)."""

from __future__ import annotations

import os
import sys
import time

import faiss
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from clara.errors import CorpusIndexError
from clara.files import atomic_path, write_json_atomic, write_text_atomic
from clara.index.corpus import corpus_hash
from clara.index.passages import count_longer
from clara.index.search import (
    SearchSettings,
    effective_settings,
    empty_search_index,
    exact_top_k,
    normalised_rows,
    pair_queries,
    recall_against_exact,
    training_rows,
)
from clara.index.store import (
    BUILD_FILE,
    INDEX_FORMAT,
    INDEX_FORMAT_VERSION,
    META_FILE,
    SEARCH_FILE,
    STORAGE_DTYPES,
    bytes_per_document,
    compressor_fingerprint,
    from_storage,
    publish_meta,
    read_json,
    shard_names,
    texts_lines,
    to_storage,
)
from clara.locks import LOCK_FILES
from clara.model.collate import encode_documents
from clara.model.model import ClaraModel, eval_mode
from clara.parallel.distributed import broadcast
from clara.parallel.shards import ShardedJob, changed_settings

RECALL_QUERIES = 1000
RECALL_K = 5
# What must agree between an unfinished build and the one asked for before its shards are reused.
BUILD_KEYS = ("fingerprint", "corpus_sha256", "documents", "n_mem", "hidden", "storage_dtype", "shard_size")


def _check_resumable(out_dir: str, plan: dict) -> str | None:
    """None when out_dir may hold this build, else the one-line reason it may not."""
    published = read_json(os.path.join(out_dir, META_FILE))
    if published is not None and published.get("generation", 0) > 0:
        return (
            f"--out {out_dir}: holds an index changed by add, remove or compact since its build; choose a new "
            "folder, or change this one with clara index add / remove"
        )
    previous = read_json(os.path.join(out_dir, BUILD_FILE))
    if previous is None:
        if os.path.isdir(out_dir) and set(os.listdir(out_dir)) - set(LOCK_FILES):
            return f"--out {out_dir}: folder exists and is not a corpus index; choose a new folder"
        return None
    if differ := changed_settings(previous, plan, BUILD_KEYS):
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


def write_shard(out_dir: str, number: int, tensors: dict[str, torch.Tensor], ids: list[str], texts: list[str]) -> None:
    """Shard `number`: its texts file, then its memory file (clara.index.store.to_storage's tensors). Each is
    written whole; the memory file, written last, is what marks the shard done."""
    memory_name, texts_name = shard_names(number)
    write_text_atomic(os.path.join(out_dir, texts_name), texts_lines(ids, texts))
    with atomic_path(os.path.join(out_dir, memory_name)) as tmp:
        save_file(tensors, tmp)


def shard_vectors(out_dir: str, shards: list[dict]):
    """The normalised float32 search rows of each shard in turn: one shard in memory at a time."""
    for shard in shards:
        with safe_open(os.path.join(out_dir, shard_names(shard["number"])[0]), framework="pt") as handle:
            yield normalised_rows(from_storage({name: handle.get_tensor(name) for name in handle.keys()}))


def _sample_rows(out_dir: str, shards: list[dict], count: int, seed: int = 0) -> np.ndarray:
    """`count` search rows drawn evenly from every shard, read one shard at a time."""
    total = sum(shard["rows"] for shard in shards)
    chosen = np.sort(np.random.default_rng(seed).choice(total, min(count, total), replace=False))
    parts, first = [], 0
    for shard, vectors in zip(shards, shard_vectors(out_dir, shards)):
        mine = chosen[(chosen >= first) & (chosen < first + shard["rows"])] - first
        parts.append(vectors[mine])
        first += shard["rows"]
    return np.concatenate(parts)


def write_search(out_dir: str, shards: list[dict], settings: SearchSettings, generation: int, log) -> dict:
    """The search structure over the shards' rows, written as SEARCH_FILE of this generation; returns the meta's
    search fields (the effective settings, and recall@5 against exact search for an approximate kind)."""
    total = sum(shard["rows"] for shard in shards)
    train = _sample_rows(out_dir, shards, training_rows(total, settings)) if training_rows(total, settings) else None
    dim = None
    index = None
    for vectors in shard_vectors(out_dir, shards):
        if index is None:
            dim = vectors.shape[1]
            index = empty_search_index(dim, total, settings, train)
        index.add(vectors)
    search = effective_settings(index, settings, dim, 0 if train is None else len(train))
    fields = {"search": search, "search_file": SEARCH_FILE.format(generation)}
    if settings.kind != "flat":
        queries = pair_queries(_sample_rows(out_dir, shards, 2 * RECALL_QUERIES), min(RECALL_QUERIES, total))
        k = min(RECALL_K, total)
        exact_rows = exact_top_k(shard_vectors(out_dir, shards), queries, k)
        fields[f"recall@{k}_vs_exact"] = recall_against_exact(index, exact_rows, queries, k)
        log(
            f"{settings.kind} index: recall@{k} against exact search {fields[f'recall@{k}_vs_exact']:.4f} "
            f"({len(queries)} queries: midpoints of random pairs of stored documents)"
        )
    with atomic_path(os.path.join(out_dir, fields["search_file"])) as tmp:
        faiss.write_index(index, tmp)
    return fields


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

    search = search or SearchSettings()
    device = device if device is not None else model.mem_embeddings.device
    if storage_dtype not in STORAGE_DTYPES:
        raise CorpusIndexError(f"--storage_dtype {storage_dtype!r}: expected one of {', '.join(STORAGE_DTYPES)}")
    if len(set(ids)) != len(ids):
        raise CorpusIndexError("document ids must be unique")
    job = ShardedJob(len(ids), shard_size, lambda i: os.path.join(out_dir, shard_names(i)[0]))
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

    mine = job.pending(rank, world)
    done = job.count - len(job.pending())
    if rank == 0 and done:
        log(f"Resuming {out_dir}: {done} of {job.count} shard(s) already built")
    todo = job.items_in(mine)
    started = time.perf_counter()
    compress_shards(
        model, job, mine, ids, texts, out_dir, 0, batch_size, storage_dtype, device, show_progress and rank == 0, world
    )
    compress_seconds = time.perf_counter() - started
    if world > 1:
        dist.barrier()
    meta = None
    if rank == 0:
        started = time.perf_counter()
        shards = [{"number": i, "rows": stop - start} for i, (start, stop) in enumerate(job.ranges())]
        meta = {
            **plan,
            "generation": 0,
            "shards": shards,
            "next_shard": job.count,
            "rows": len(ids),
            "removed": [],
            "bytes_per_document": bytes_per_document(plan["n_mem"], plan["hidden"], storage_dtype),
            # what serve and evaluate report without reading every text again
            "longer_than_read": count_longer(model.tokenizer, texts, model.settings.doc_max_length),
            **write_search(out_dir, shards, search, 0, log),
            "compressed_here": todo,
            "compress_seconds_rank0": round(compress_seconds, 3),
        }
        meta["merge_seconds"] = round(time.perf_counter() - started, 3)
        publish_meta(out_dir, meta, None)
    return broadcast(meta, rank, world)


def compress_shards(
    model: ClaraModel,
    job: ShardedJob,
    shards: list[int],
    ids: list[str],
    texts: list[str],
    out_dir: str,
    first_number: int,
    batch_size: int,
    storage_dtype: str,
    device: torch.device,
    show_progress: bool,
    world: int = 1,
) -> None:
    """Compress and write the job's shards `shards` (job shard i is stored as shard first_number + i)."""
    from tqdm import tqdm

    ranges = job.ranges()
    progress = None
    if show_progress:
        progress = tqdm(
            total=job.items_in(shards),
            desc="index" + (" (rank 0)" if world > 1 else ""),
            unit="doc",
            dynamic_ncols=True,
            file=sys.stderr,
        )
    with eval_mode(model):
        for i in shards:
            start, stop = ranges[i]
            memory = compress_texts(model, texts[start:stop], batch_size, device, progress)
            write_shard(
                out_dir, first_number + i, to_storage(memory, storage_dtype), ids[start:stop], texts[start:stop]
            )
    if progress is not None:
        progress.close()
