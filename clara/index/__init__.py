"""Answer from a compressed corpus (the official `stage2_mips` path).

A document is compressed once, by the checkpoint's compressor, and answered from many times: a
question is encoded by the query reasoner, the nearest stored documents are found by the cosine
score that stage 2 trains (inner product of the normalised, flattened memory states), and the
generator reads the stored memory vectors of the top-k, never their text.

    python -m clara.index --checkpoint CK --corpus FILE.jsonl --out DIR [--faiss flat|ivf|hnsw]

The corpus holds `{"id": ..., "text": ...}` per line, or records with a `docs` list (any stage's
data), whose documents get content ids (`doc-` and 16 hex digits of the text's SHA-256) and are
stored once however often they occur. An index folder holds:

    build.json                   what is being built (checkpoint fingerprint, corpus hash, shard plan)
    memory-00000.safetensors ... memory vectors [docs, n_mem, hidden] per shard ("memory"), in the
                                 storage dtype (float32, or bfloat16 / float16 on request)
    documents.jsonl              ids and texts, in row order
    faiss.index                  inner product over the normalised flattened float32 vectors
    index.json                   written last: build.json plus the search settings and build figures

Shards are planned by document count, so they do not depend on the number of processes: under
torchrun process r compresses shards r, r + world, ... and rank 0 merges them; a build that was
interrupted resumes with the shards that are missing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from clara.checkpoint import CheckpointError, added_token_rows
from clara.collate import Batch, build_decoder, encode_documents
from clara.corpus import content_id, corpus_hash, read_corpus  # noqa: F401 (clara.index's API too)
from clara.data import DataError, iter_lines
from clara.distributed import broadcast
from clara.errors import CorpusIndexError
from clara.locks import LOCK_FILES
from clara.metrics import cover_exact_match, exact_match, f1_score, retrieval_summary
from clara.model import ClaraModel
from clara.stages import QUERY_REASONER, stage2

INDEX_FORMAT = "clara-index"
INDEX_FORMAT_VERSION = 1
BUILD_FILE = "build.json"
META_FILE = "index.json"
DOCS_FILE = "documents.jsonl"
FAISS_FILE = "faiss.index"
SHARD_FILE = "memory-{:05d}.safetensors"
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SEARCH_KINDS = ("flat", "ivf", "hnsw")
RECALL_QUERIES = 1000
RECALL_K = 5
# What must agree between an unfinished build and the one asked for before its shards are reused.
BUILD_KEYS = ("fingerprint", "corpus_sha256", "documents", "n_mem", "hidden", "storage_dtype", "shard_size")


# -- the checkpoint an index belongs to ------------------------------------------------------------------------
def compressor_fingerprint(model: ClaraModel) -> str:
    """SHA-256 of what decides the memory vectors: the compressor's LoRA weights, the memory embeddings,
    the added tokens' rows, a sample of the base model's embeddings and the document length.

    Weights are hashed as bfloat16, so a model loaded in float32 on CPU and in bfloat16 on a GPU
    agree. Checkpoints that differ only in the query reasoner or the generator share a fingerprint
    (and an index): stage 2 keeps the compressor and its memory embeddings frozen, so a stage1_2
    checkpoint and the stage2 checkpoints trained from it share one index.
    """
    digest = hashlib.sha256(json.dumps([model.settings.n_mem_tokens, model.settings.doc_max_length]).encode())

    def add(name: str, tensor: torch.Tensor) -> None:
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())

    for name, param in sorted(model.peft_model.named_parameters()):
        if ".encoder_adapter." in name:
            add(name, param)
    add("mem_embeddings", model.mem_embeddings)
    for name, rows in sorted(added_token_rows(model).items()):
        add(name, rows)
    add("base_embedding_sample", model.causal_lm.get_input_embeddings().weight[:256])
    return digest.hexdigest()


# -- search indexes --------------------------------------------------------------------------------------------
@dataclass
class SearchSettings:
    """flat: exact inner product. ivf: inverted lists (nlist cells, nprobe searched). hnsw: graph (m, ef_search)."""

    kind: str = "flat"
    nlist: int | None = None  # None: 4 sqrt(N), at most N / 39 (faiss wants 39 training points per cell)
    nprobe: int = 16
    hnsw_m: int = 32
    ef_search: int = 128


def make_search_index(vectors: np.ndarray, settings: SearchSettings, seed: int = 0) -> faiss.Index:
    """A FAISS index over normalised float32 rows [N, d], inner product metric."""
    n, dim = vectors.shape
    if settings.kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif settings.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = settings.ef_search
    elif settings.kind == "ivf":
        nlist = settings.nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        train = vectors
        if n > 64 * nlist:  # k-means needs no more than this; sampling keeps large builds fast
            train = vectors[np.random.default_rng(seed).choice(n, 64 * nlist, replace=False)]
        index.cp.seed = seed
        index.train(train)
        index.nprobe = min(settings.nprobe, nlist)
    else:
        raise CorpusIndexError(f"--faiss {settings.kind!r}: expected one of {', '.join(SEARCH_KINDS)}")
    index.add(vectors)
    return index


def pair_queries(vectors: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Queries that are not stored rows: normalised midpoints of random pairs of stored rows."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, len(vectors), count), rng.integers(0, len(vectors), count)
    queries = vectors[a] + vectors[b]
    return queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)


def recall_against_exact(approximate: faiss.Index, exact_rows: np.ndarray, queries: np.ndarray, k: int) -> float:
    """Mean share of the exact top-k that the approximate index also returns in its top-k."""
    _, found = approximate.search(queries, k)
    return float(np.mean([len(set(f) & set(e)) / k for f, e in zip(found.tolist(), exact_rows.tolist())]))


def normalised_rows(memory: torch.Tensor) -> np.ndarray:
    """Memory states [D, n, H] -> the float32 rows FAISS searches: flattened, unit length."""
    return F.normalize(memory.float().flatten(1), dim=-1).numpy()


# -- building ----------------------------------------------------------------------------------------------------
def _write_json(path: str, obj: dict) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as out:
        json.dump(obj, out, indent=2)
    os.replace(path + ".tmp", path)


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _check_resumable(out_dir: str, plan: dict) -> str | None:
    """None when out_dir may hold this build, else the one-line reason it may not."""
    previous = _read_json(os.path.join(out_dir, BUILD_FILE))
    if previous is None:
        if os.path.isdir(out_dir) and set(os.listdir(out_dir)) - set(LOCK_FILES):
            return f"--out {out_dir}: folder exists and is not a corpus index; choose a new folder"
        return None
    differ = [key for key in BUILD_KEYS if previous.get(key) != plan[key]]
    if differ:
        return (f"--out {out_dir}: holds a build of another corpus or checkpoint (differs in {', '.join(differ)}); "
                "choose a new folder or delete this one")
    return None


@torch.no_grad()
def compress_texts(model: ClaraModel, texts: list[str], batch_size: int, device: torch.device,
                   progress=None) -> torch.Tensor:
    """Memory states [D, n, H] (float32, on the CPU) of the texts, compressed batch_size at a time."""
    parts = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        ids, mask, _ = encode_documents(model.tokenizer, model.tokens, chunk, model.settings.doc_max_length)
        parts.append(model.compress(ids.to(device), mask.to(device))[0].float().cpu())
        if progress is not None:
            progress.update(len(chunk))
    return torch.cat(parts)


def build_index(model: ClaraModel, ids: list[str], texts: list[str], out_dir: str, *, batch_size: int = 32,
                shard_size: int = 4096, storage_dtype: str = "float32", search: SearchSettings | None = None,
                checkpoint: str = "", corpus: str = "", rank: int = 0, world: int = 1,
                device: torch.device | None = None, show_progress: bool = True, log=print) -> dict:
    """Compress every document (this rank's shards), merge on rank 0; returns the index's meta (every rank)."""
    import torch.distributed as dist
    from tqdm import tqdm

    search = search or SearchSettings()
    device = device if device is not None else model.mem_embeddings.device
    if storage_dtype not in STORAGE_DTYPES:
        raise CorpusIndexError(f"--dtype {storage_dtype!r}: expected one of {', '.join(STORAGE_DTYPES)}")
    if len(set(ids)) != len(ids):
        raise CorpusIndexError("document ids must be unique")
    n_shards = math.ceil(len(ids) / shard_size)
    plan = {"format": INDEX_FORMAT, "format_version": INDEX_FORMAT_VERSION, "checkpoint": checkpoint,
            "fingerprint": compressor_fingerprint(model), "corpus": corpus, "corpus_sha256": corpus_hash(ids, texts),
            "documents": len(ids), "n_mem": model.tokens.n_mem, "hidden": model.hidden_size,
            "storage_dtype": storage_dtype, "shard_size": shard_size, "shards": n_shards}
    problem = None
    if rank == 0:
        problem = _check_resumable(out_dir, plan)
        if problem is None:
            os.makedirs(out_dir, exist_ok=True)
            _write_json(os.path.join(out_dir, BUILD_FILE), plan)
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
        progress = tqdm(total=todo, desc="index" + (" (rank 0)" if world > 1 else ""), unit="doc",
                        dynamic_ncols=True, file=sys.stderr)
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        for i in mine:
            rows = slice(i * shard_size, min((i + 1) * shard_size, len(ids)))
            memory = compress_texts(model, texts[rows], batch_size, device, progress)
            tmp = shard_path[i] + f".tmp{rank}"
            save_file({"memory": memory.to(STORAGE_DTYPES[storage_dtype]).contiguous()}, tmp,
                      metadata={"first_row": str(rows.start)})
            os.replace(tmp, shard_path[i])
    finally:
        model.train(was_training)
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
        _write_json(os.path.join(out_dir, META_FILE), meta)
    return broadcast(meta, rank, world)


def _merge(out_dir: str, plan: dict, ids: list[str], texts: list[str], search: SearchSettings, log) -> dict:
    """Rank 0: the search index over every shard, the documents file and the figures of the build."""
    started = time.perf_counter()
    vectors = np.concatenate([normalised_rows(_read_shard(out_dir, i)) for i in range(plan["shards"])])
    index = make_search_index(vectors, search)
    effective = {"nlist": index.nlist, "nprobe": index.nprobe} if search.kind == "ivf" else {}
    meta = {**plan, "search": search.__dict__ | effective,
            "bytes_per_document": plan["n_mem"] * plan["hidden"] * STORAGE_DTYPES[plan["storage_dtype"]].itemsize}
    if search.kind != "flat":
        queries = pair_queries(vectors, min(RECALL_QUERIES, len(vectors)))
        k = min(RECALL_K, len(vectors))
        _, exact_rows = make_search_index(vectors, SearchSettings("flat")).search(queries, k)
        meta[f"recall@{k}_vs_exact"] = recall_against_exact(index, exact_rows, queries, k)
        log(f"{search.kind} index: recall@{k} against exact search {meta[f'recall@{k}_vs_exact']:.4f} "
            f"({len(queries)} queries: midpoints of random pairs of stored documents)")
    faiss.write_index(index, os.path.join(out_dir, FAISS_FILE + ".tmp"))
    os.replace(os.path.join(out_dir, FAISS_FILE + ".tmp"), os.path.join(out_dir, FAISS_FILE))
    with open(os.path.join(out_dir, DOCS_FILE + ".tmp"), "w", encoding="utf-8") as out:
        for doc_id, text in zip(ids, texts):
            out.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
    os.replace(os.path.join(out_dir, DOCS_FILE + ".tmp"), os.path.join(out_dir, DOCS_FILE))
    meta["merge_seconds"] = round(time.perf_counter() - started, 3)
    return meta


def _read_shard(out_dir: str, i: int) -> torch.Tensor:
    with safe_open(os.path.join(out_dir, SHARD_FILE.format(i)), framework="pt") as shard:
        return shard.get_tensor("memory")


# -- using an index ----------------------------------------------------------------------------------------------
@dataclass
class CorpusIndex:
    path: str
    meta: dict
    ids: list[str]
    texts: list[str]
    search_index: faiss.Index

    def memory(self, rows: list[int]) -> torch.Tensor:
        """Stored memory states [len(rows), n, H] (float32) of these rows."""
        size = self.meta["shard_size"]
        out = []
        for row in rows:
            with safe_open(os.path.join(self.path, SHARD_FILE.format(row // size)), framework="pt") as shard:
                out.append(shard.get_slice("memory")[row % size:row % size + 1].float())
        return torch.cat(out)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and rows [Q, k] of the k nearest documents of normalised float32 queries [Q, d]."""
        return self.search_index.search(queries, min(k, len(self.ids)))


def load_index(path: str) -> CorpusIndex:
    meta = _read_json(os.path.join(path, META_FILE))
    if meta is None:
        what = "an unfinished build (run python -m clara.index again to finish it)" \
            if os.path.isfile(os.path.join(path, BUILD_FILE)) else "not a corpus index"
        raise CorpusIndexError(f"--index {path}: {what}; no {META_FILE}")
    if meta.get("format") != INDEX_FORMAT or meta.get("format_version", 0) > INDEX_FORMAT_VERSION:
        raise CorpusIndexError(f"{path}/{META_FILE}: not a corpus index this toolkit reads")
    ids, texts = [], []
    with open(os.path.join(path, DOCS_FILE), encoding="utf-8") as handle:
        for line in handle:
            doc = json.loads(line)
            ids.append(doc["id"])
            texts.append(doc["text"])
    search_index = faiss.read_index(os.path.join(path, FAISS_FILE))
    if meta["search"]["kind"] == "ivf":
        search_index.nprobe = meta["search"]["nprobe"]
    elif meta["search"]["kind"] == "hnsw":
        search_index.hnsw.efSearch = meta["search"]["ef_search"]
    return CorpusIndex(path, meta, ids, texts, search_index)


def check_index_matches(index: CorpusIndex, model: ClaraModel, checkpoint: str = "this model") -> None:
    """Refuse an index whose vectors another compressor made: they would be read as noise."""
    mine = compressor_fingerprint(model)
    if index.meta["fingerprint"] != mine:
        raise CorpusIndexError(f"--index {index.path} was built with the compressor of {index.meta['checkpoint']!r} "
                         f"(fingerprint {index.meta['fingerprint'][:12]}), not that of {checkpoint} ({mine[:12]}); "
                         f"rebuild it: python -m clara.index --checkpoint {checkpoint} --corpus ... --out NEW_DIR")


@dataclass
class IndexAnswers:
    answers: list[str]
    ids: list[list[str]]  # per question, the retrieved document ids in rank order
    rows: list[list[int]]  # the same as rows of the index
    scores: list[list[float]]  # their cosine scores


@torch.no_grad()
def encode_questions(model: ClaraModel, questions: list[str], device: torch.device) -> np.ndarray:
    """The query reasoner's memory states of the questions, as normalised float32 rows."""
    ids, mask, _ = encode_documents(model.tokenizer, model.tokens, questions, model.settings.doc_max_length)
    query, _ = model.compress(ids.to(device), mask.to(device), QUERY_REASONER)
    return normalised_rows(query.cpu())


def generator_inputs(model: ClaraModel, index: CorpusIndex, questions: list[str], rows: list[list[int]],
                     max_len: int, seed: int) -> tuple[Batch, torch.Tensor]:
    """The generator's stage-2 prompts for the questions, and the stored vectors [slots * n, H] of each
    question's documents (the index rows, generation_top_k per question) for their memory slots."""
    top_k = model.settings.generation_top_k
    memory = index.memory([row for found in rows for row in found])
    examples = [stage2.example({"question": q, "answer": ""}, model.tokens.n_mem, top_k, seed)[:2] + (None,)
                for q in questions]
    dec_ids, dec_mask, _ = build_decoder(model.tokenizer, model.tokens, examples, max_len)
    empty = torch.empty(0, 0, dtype=torch.long)
    batch = Batch(enc_ids=empty, enc_mask=empty, dec_ids=dec_ids, dec_mask=dec_mask, labels=None,
                  docs_per_sample=[top_k] * len(questions), questions=questions, answers=[""] * len(questions))
    return batch, memory.reshape(-1, model.hidden_size)


@torch.no_grad()
def answer_from_index(model: ClaraModel, index: CorpusIndex, questions: list[str], *, retrieve: int | None = None,
                      batch_size: int = 8, max_new_tokens: int = 64, max_len: int = 1024, seed: int = 42,
                      device: torch.device | None = None, generate: bool = True) -> IndexAnswers:
    """Retrieve each question's top documents with the query reasoner and answer from their stored vectors.

    The generator reads the first generation_top_k retrieved documents (the checkpoint's prompt has
    that many slots); `retrieve` (default the same) sets how many ids are returned. No document is
    compressed here. The caller checks the index with check_index_matches.
    """
    if QUERY_REASONER not in model.adapter_names:
        raise CheckpointError(f"the model has no {QUERY_REASONER}: answering from an index needs a stage2 "
                              "checkpoint (or clara.inference.ensure_query_reasoner)")
    device = device if device is not None else model.mem_embeddings.device
    top_k = model.settings.generation_top_k
    if len(index.ids) < top_k:
        raise CorpusIndexError(f"--index {index.path}: {len(index.ids)} documents, fewer than generation_top_k={top_k}")
    retrieve = max(retrieve or top_k, top_k)
    result = IndexAnswers([], [], [], [])
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(questions), batch_size):
            chunk = list(questions[start:start + batch_size])
            scores, rows = index.search(encode_questions(model, chunk, device), retrieve)
            result.rows += rows.tolist()
            result.scores += scores.tolist()
            result.ids += [[index.ids[r] for r in found] for found in rows.tolist()]
            if not generate:
                continue
            batch, vectors = generator_inputs(model, index, chunk, rows[:, :top_k].tolist(), max_len, seed)
            texts, _ = model.generate(batch.to(device), max_new_tokens=max_new_tokens, vectors=vectors.to(device))
            result.answers += texts
    finally:
        model.train(was_training)
    return result


# -- open-corpus evaluation ------------------------------------------------------------------------------------
def open_corpus_summary(model: ClaraModel, index: CorpusIndex, questions: list[str], answers: list[str],
                        gold_ids: list[list[str] | None], generate_limit: int, ks: tuple[int, ...] = (1, 3, 5),
                        **answer_kwargs) -> tuple[dict, list[dict]]:
    """Recall@k over the whole index against gold_ids, and EM / F1 / cover-EM of the answers generated from it
    (the first generate_limit questions). Returns the summary and per-question rows."""
    head = answer_from_index(model, index, questions[:generate_limit], retrieve=max(ks), **answer_kwargs)
    rest = answer_from_index(model, index, questions[generate_limit:], retrieve=max(ks), generate=False,
                             **answer_kwargs)
    ranked = head.ids + rest.ids
    summary: dict = {"documents": len(index.ids)}
    retrieval = retrieval_summary(ranked, gold_ids, ks)
    summary.update(sorted(retrieval.items(), key=lambda kv: (not kv[0].startswith("recall@"),
                                                             not kv[0].startswith("precision@"))))
    rows = []
    for i, question in enumerate(questions):
        row = {"index": i, "question": question, "answer": answers[i], "retrieved": ranked[i], "gold_ids": gold_ids[i],
               "prediction": head.answers[i] if i < generate_limit else None}
        if row["prediction"] is not None:
            row.update(exact_match=exact_match(row["prediction"], answers[i]),
                       f1=f1_score(row["prediction"], answers[i]),
                       cover_exact_match=cover_exact_match(row["prediction"], answers[i]))
        rows.append(row)
    generated = rows[:generate_limit]
    for key in ("exact_match", "f1", "cover_exact_match"):
        summary[key] = sum(r[key] for r in generated) / len(generated) if generated else float("nan")
    summary["generated"] = len(generated)
    return summary, rows
