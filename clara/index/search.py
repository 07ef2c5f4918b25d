"""Search structures over the stored vectors: FAISS indexes (exact or approximate) and their recall against exact
search."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from clara.errors import CorpusIndexError

SEARCH_KINDS = ("flat", "ivf", "hnsw", "pq", "ivfpq", "opq")
# The kinds that search a compressed code: their candidates are re-scored exactly from the stored vectors.
COMPRESSED_KINDS = ("pq", "ivfpq", "opq")
OPQ_ITERATIONS = 10  # faiss's 50 cost minutes on 2 cores for little recall once the candidates are re-ranked
PQ_MAX_BYTES = 256  # default code size cap: a 7B base's 65,536 wide rows would otherwise get 8 KB codes


@dataclass
class SearchSettings:
    """flat: exact inner product. ivf: inverted lists (nlist cells, nprobe searched). hnsw: graph (m, ef_search).
    pq: product-quantized codes of pq_m bytes; ivfpq: ivf over such codes; opq: a learnt rotation, then pq.
    The compressed kinds return their best `rerank` candidates re-scored exactly from the stored vectors."""

    kind: str = "flat"
    nlist: int | None = None  # None: 4 sqrt(N), at most N / 39 (faiss wants 39 training points per cell)
    nprobe: int = 16
    hnsw_m: int = 32
    ef_search: int = 128
    pq_m: int | None = None  # None: the largest divisor of the width up to width / 8 and PQ_MAX_BYTES
    pq_bits: int | None = None  # None: 8, fewer for a corpus too small to train 256 centroids per part
    rerank: int = 64


def ivf_cells(n: int, settings: SearchSettings) -> int:
    """nlist, or 4 sqrt(N) at most N / 39 (faiss wants 39 training points per cell)."""
    return settings.nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))


def pq_bytes(dim: int, settings: SearchSettings) -> int:
    """Subquantizers (code bytes at 8 bits): pq_m, or the largest divisor of dim up to dim / 8 and PQ_MAX_BYTES."""
    if settings.pq_m is not None:
        if dim % settings.pq_m:
            raise CorpusIndexError(f"--pq_m {settings.pq_m}: expected a divisor of the search width {dim}")
        return settings.pq_m
    return max(m for m in range(1, min(dim // 8, PQ_MAX_BYTES) + 1) if dim % m == 0)


def pq_bits(n: int, settings: SearchSettings) -> int:
    """Bits per subquantizer code: 8, or fewer where n rows cannot train 2^bits centroids."""
    return settings.pq_bits or max(1, min(8, int(math.log2(max(n, 2)))))


def training_rows(n: int, settings: SearchSettings) -> int:
    """How many rows training needs (0: none): k-means needs no more than 64 per cell, PQ about 100 per centroid."""
    if settings.kind == "ivf":
        return min(n, 64 * ivf_cells(n, settings))
    if settings.kind in COMPRESSED_KINDS:
        return min(n, max(64 * ivf_cells(n, settings) if settings.kind == "ivfpq" else 0, 100 * 256))
    return 0


def empty_search_index(dim: int, n: int, settings: SearchSettings, train: np.ndarray | None, seed: int = 0):
    """A FAISS index (inner product) for n normalised float32 rows of width dim, trained on `train` where its
    kind needs training; the rows are added afterwards, one shard at a time."""
    if settings.kind == "flat":
        return faiss.IndexFlatIP(dim)
    if settings.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = settings.ef_search
        return index
    if settings.kind == "ivf":
        nlist = ivf_cells(n, settings)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        if len(train) > 64 * nlist:
            train = train[np.random.default_rng(seed).choice(len(train), 64 * nlist, replace=False)]
        index.cp.seed = seed
        index.train(train)
        index.nprobe = min(settings.nprobe, nlist)
        return index
    if settings.kind in COMPRESSED_KINDS:
        m, bits = pq_bytes(dim, settings), pq_bits(len(train), settings)
        if settings.kind == "pq":
            index = faiss.IndexPQ(dim, m, bits, faiss.METRIC_INNER_PRODUCT)
        elif settings.kind == "opq":
            rotation = faiss.OPQMatrix(dim, m)
            rotation.niter = OPQ_ITERATIONS
            index = faiss.IndexPreTransform(rotation, faiss.IndexPQ(dim, m, bits, faiss.METRIC_INNER_PRODUCT))
        else:
            nlist = ivf_cells(n, settings)
            index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, m, bits, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = seed
            index.nprobe = min(settings.nprobe, nlist)
        index.train(train)
        return index
    raise CorpusIndexError(f"--faiss {settings.kind!r}: expected one of {', '.join(SEARCH_KINDS)}")


def effective_settings(index: faiss.Index, settings: SearchSettings, dim: int, trained_on: int) -> dict:
    """The settings a built index uses (defaults resolved), for index.json."""
    fields = dict(settings.__dict__)
    if settings.kind in ("ivf", "ivfpq"):
        fields |= {"nlist": index.nlist, "nprobe": index.nprobe}
    if settings.kind in COMPRESSED_KINDS:
        fields |= {"pq_m": pq_bytes(dim, settings), "pq_bits": pq_bits(trained_on, settings)}
    return fields


def make_search_index(vectors: np.ndarray, settings: SearchSettings, seed: int = 0) -> faiss.Index:
    """A FAISS index over normalised float32 rows [N, d], inner product metric."""
    index = empty_search_index(vectors.shape[1], len(vectors), settings, vectors, seed)
    index.add(vectors)
    return index


def exact_top_k(parts: Iterable[np.ndarray], queries: np.ndarray, k: int) -> np.ndarray:
    """Rows [Q, k] of the exact top-k by inner product over rows given in parts (one shard at a time)."""
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_rows = np.zeros((len(queries), 0), dtype=np.int64)
    first = 0
    for part in parts:
        scores = np.concatenate([best_scores, queries @ part.T], axis=1)
        rows = np.concatenate(
            [best_rows, np.broadcast_to(np.arange(first, first + len(part)), (len(queries), len(part)))], axis=1
        )
        keep = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best_scores, best_rows = np.take_along_axis(scores, keep, 1), np.take_along_axis(rows, keep, 1)
        first += len(part)
    return best_rows


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
