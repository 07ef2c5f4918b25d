"""Answer from a compressed corpus (the official `stage2_mips` path).

A document is compressed once, by the checkpoint's compressor, and answered from many times: a
question is encoded by the query reasoner, the nearest stored documents are found by the cosine
score that stage 2 trains (inner product of the normalised, flattened memory states), and the
generator reads the stored memory vectors of the top-k, never their text.

    python -m clara.index --checkpoint CK --corpus FOLDER|FILE.jsonl|passages.json --out DIR [--faiss flat|ivf|hnsw]

The corpus is a folder of .txt, .md, .html and .pdf files (each file's path in it is its id), or a file that holds
`{"id": ..., "text": ...}` per line, or records with a `docs` list (any stage's data), whose documents get content
ids (`doc-` and 16 hex digits of the text's SHA-256) and are stored once however often they occur. Every document
is cut into passages of at most the checkpoint's DOC_MAX_LENGTH tokens (one that fits keeps its id, a longer one's
passages are `ID#1`, `ID#2`, ...), or the passages file python -m clara.synthesize wrote is used when it was cut
for the same tokenizer and length. An index folder holds:

    build.json                   what is being built (checkpoint fingerprint, corpus hash, shard plan)
    memory-00000.safetensors ... memory vectors [docs, n_mem, hidden] per shard ("memory"), in the
                                 storage dtype (float32, or bfloat16 / float16 on request)
    documents.jsonl              ids and texts, in row order
    faiss.index                  inner product over the normalised flattened float32 vectors
    index.json                   written last: build.json plus the search settings and build figures

Shards are planned by document count, so they do not depend on the number of processes: under
torchrun process r compresses shards r, r + world, ... and rank 0 merges them; a build that was
interrupted resumes with the shards that are missing.

    corpus       the corpus format (standard library only: it is what python -m clara.synthesize reads too)
    folder       a folder of documents as users have them (.txt, .md, .html through BeautifulSoup, .pdf through
                 the optional pypdf), with the files it skipped and why
    passages     the one splitter into passages the compressor reads whole, and the passages file
    store        the folder's files, the compressor fingerprint that ties it to a checkpoint, reading it back
    search       FAISS indexes (exact or approximate) and their recall against exact search
    build        compressing the corpus in resumable shards; rank 0 merges them
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
