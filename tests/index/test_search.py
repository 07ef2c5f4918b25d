"""Search structures (clara.index.search): the compressed kinds and their build-time settings."""

from __future__ import annotations

import numpy as np
import pytest

from clara.errors import CorpusIndexError
from clara.index.search import (
    SearchSettings,
    exact_top_k,
    make_search_index,
    pq_bits,
    pq_bytes,
    recall_against_exact,
)


def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(40, dim))[rng.integers(0, 40, n)] + 0.5 * rng.normal(size=(n, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def test_code_size_and_bits_follow_the_width_and_the_corpus():
    assert pq_bytes(512, SearchSettings("pq")) == 64  # 8 dimensions per byte
    assert pq_bytes(16 * 4096, SearchSettings("pq")) == 256  # capped
    assert pq_bytes(256, SearchSettings("pq", pq_m=16)) == 16
    with pytest.raises(CorpusIndexError, match="--pq_m 7: expected a divisor of the search width 256"):
        pq_bytes(256, SearchSettings("pq", pq_m=7))
    assert pq_bits(40, SearchSettings("pq")) == 5 and pq_bits(100_000, SearchSettings("pq")) == 8


def test_streamed_exact_search_equals_flat_search():
    vectors = clustered(3000, 32)
    queries = clustered(50, 32, seed=1)  # not midpoints of stored rows: those tie, and ties may come in any order
    _, flat = make_search_index(vectors, SearchSettings("flat")).search(queries, 5)
    streamed = exact_top_k([vectors[:1000], vectors[1000:2500], vectors[2500:]], queries, 5)
    assert (streamed == flat).all()


@pytest.mark.parametrize("kind", ["pq", "ivfpq", "opq"])
def test_compressed_codes_re_ranked_exactly_find_the_exact_top_5(kind):
    vectors = clustered(4000, 64)
    queries = clustered(100, 64, seed=1)
    _, exact = make_search_index(vectors, SearchSettings("flat")).search(queries, 5)
    index = make_search_index(vectors, SearchSettings(kind, pq_m=16, nprobe=32))
    # 16 bytes per row instead of 256 (ivfpq: and one naming its cell)
    assert index.sa_code_size() == 16 + (kind == "ivfpq") and index.ntotal == 4000
    codes_only = recall_against_exact(index, exact, queries, 5)
    # What CorpusIndex.search does: the best 64 by code, re-scored from the stored vectors.
    _, candidates = index.search(queries, 64)
    scores = np.einsum("qd,qcd->qc", queries, vectors[candidates])
    reranked = np.take_along_axis(candidates, np.argsort(-scores, axis=1)[:, :5], 1)
    recall = np.mean([len(set(r) & set(e)) / 5 for r, e in zip(reranked.tolist(), exact.tolist())])
    assert recall >= 0.9 and recall > codes_only + 0.2
