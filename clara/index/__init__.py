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

    store        the folder's files, the compressor fingerprint that ties it to a checkpoint, reading it back
    search       FAISS indexes (exact or approximate) and their recall against exact search
    build        compressing the corpus in resumable shards; rank 0 merges them
    answer       questions -> query vectors -> the nearest stored documents -> the generator's answers
    open_corpus  the open-corpus evaluation: recall over the whole index, answers from its vectors
    __main__     python -m clara.index
"""

from clara.corpus import content_id, corpus_hash, read_corpus
from clara.errors import CorpusIndexError
from clara.index.answer import IndexAnswers, answer_from_index, encode_questions, generator_inputs
from clara.index.build import build_index, compress_texts
from clara.index.open_corpus import open_corpus_summary
from clara.index.search import (
    SEARCH_KINDS,
    SearchSettings,
    make_search_index,
    normalised_rows,
    pair_queries,
    recall_against_exact,
)
from clara.index.store import (
    SHARD_FILE,
    STORAGE_DTYPES,
    CorpusIndex,
    check_index_matches,
    compressor_fingerprint,
    load_index,
)

__all__ = ["SEARCH_KINDS", "SHARD_FILE", "STORAGE_DTYPES", "CorpusIndex", "CorpusIndexError", "IndexAnswers",
           "SearchSettings", "answer_from_index", "build_index", "check_index_matches", "compress_texts",
           "compressor_fingerprint", "content_id", "corpus_hash", "encode_questions", "generator_inputs",
           "load_index", "make_search_index", "normalised_rows", "open_corpus_summary", "pair_queries",
           "read_corpus", "recall_against_exact"]
