"""Search structures over the stored vectors: FAISS indexes (exact or approximate) and their recall against exact
search."""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from clara.errors import CorpusIndexError

SEARCH_KINDS = ("flat", "ivf", "hnsw")


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
