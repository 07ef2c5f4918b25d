"""Answer from a compressed corpus (the official `stage2_mips` path).

A document is compressed once, by the checkpoint's compressor, and answered from many times: a
question is encoded by the query reasoner, the nearest stored documents are found by the cosine
score that stage 2 trains (inner product of the normalised, flattened memory states), and the
generator reads the stored memory vectors of the top-k, never their text.

    python -m clara.index --checkpoint CK --corpus FOLDER|FILE.jsonl|passages.json --out DIR [--storage_dtype D]
        [--faiss KIND]
    python -m clara.index add --checkpoint CK --index DIR --corpus NEW [--replace]
    python -m clara.index remove --index DIR --ids FILE
    python -m clara.index compact --index DIR

The corpus is a folder of .txt, .md, .html and .pdf files (each file's path in it is its id), or a file that holds
`{"id": ..., "text": ...}` per line, or records with a `docs` list (any stage's data), whose documents get content
ids (`doc-` and 16 hex digits of the text's SHA-256) and are stored once however often they occur. Every document
is cut into passages of at most the checkpoint's DOC_MAX_LENGTH tokens (one that fits keeps its id, a longer one's
passages are `ID#1`, `ID#2`, ...), or the passages file python -m clara.synthesize wrote is used when it was cut
for the same tokenizer and length. An index folder holds:

    build.json                   what the first build was (checkpoint fingerprint, corpus hash, shard size)
    memory-NNNNN.safetensors     memory vectors [docs, n_mem, hidden] per shard ("memory"), in the storage dtype:
                                 float32, bfloat16, float16, or int8 / fp8 (e4m3) with a float32 "scale" per
                                 memory vector, dequantized on read
    documents-NNNNN.jsonl        the shard's ids and texts, in row order (read by byte offset, on demand)
    search-GGGGG.faiss           the search structure of generation GGGGG: exact (flat), approximate over float32
                                 rows (ivf, hnsw), or over product-quantized codes (pq, ivfpq, opq), whose
                                 candidates are re-scored exactly from the stored vectors
    index.json                   published last, atomically: the settings, the shards in row order, the removed
                                 rows (tombstones), the search file and the generation
    pending.json                 while an add or compact runs: what it does, so that a rerun resumes it

Shards are planned by document count, so they do not depend on the number of processes: under
torchrun process r compresses shards r, r + world, ... and rank 0 writes the search structure, one
shard at a time; a build that was interrupted resumes with the shards that are missing
(clara.parallel.shards). add, remove and compact write new files only and publish index.json with the
generation one higher; a server answering from the folder swaps to it between batches.

    corpus       the corpus format (standard library only: it is what python -m clara.synthesize reads too)
    folder       a folder of documents as users have them (.txt, .md, .html through BeautifulSoup, .pdf through
                 the optional pypdf), with the files it skipped and why
    passages     the one splitter into passages the compressor reads whole, and the passages file
    store        the folder's files, the compressor fingerprint that ties it to a checkpoint, reading it back
    search       FAISS indexes (exact or approximate) and their recall against exact search
    build        compressing the corpus in resumable shards; rank 0 writes the search structure, streaming
    update       add, remove and compact: a corpus that grows and shrinks
    answer       questions -> query vectors -> the nearest stored documents -> the generator's answers
    __main__     python -m clara.index (a command line)
    ask          python -m clara.ask: answers and retrieved documents printed (a command line)

It may import clara.model, clara.data, clara.parallel, clara.stages and the settings; clara.evaluation
(whose CLaRa API and open-corpus evaluation read an index), clara.training, clara.serving and clara.synthesis
are above it. Corpus reading and passages live here, below synthesis, so that synthesis (which may import this
package's corpus, folder and passages modules) and the index cut documents with the same code. This file imports
nothing, so reading and splitting a corpus (corpus, folder, passages: a tokenizer is loaded only when asked for)
does not load torch.
"""
