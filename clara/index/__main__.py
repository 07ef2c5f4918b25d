"""python -m clara.index --checkpoint CK --corpus FILE.jsonl --out DIR: build a corpus index (see clara.index);
python -m clara.index add | remove | compact: change a built one (clara.index.update)."""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch

from clara.cli import add_model_flags, positive_int
from clara.errors import ConfigError, CorpusIndexError, FolderBusy, exit_status
from clara.index.build import build_index
from clara.index.folder import describe_skipped
from clara.index.passages import (
    Cut,
    describe_corpus,
    longer_than_read,
    read_source,
    source_passages,
    tokenizer_key,
)
from clara.index.search import SEARCH_KINDS, SearchSettings
from clara.index.store import STORAGE_DTYPES, read_meta
from clara.index.update import add_documents, compact_index, read_id_file, remove_documents
from clara.locks import holding
from clara.model.load import choose_runtime, load_for_use
from clara.parallel.console import rank_zero_print
from clara.parallel.distributed import broadcast, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clara.index",
        description="Compress every document of a corpus once with a checkpoint's compressor and store the "
        "memory vectors with a FAISS index, for answering with python -m clara.ask or "
        "CLaRa.generate_from_questions(questions, index=DIR). Under torchrun each process compresses "
        "its own shards (every GPU of every node); an interrupted build resumes with the missing shards. "
        "A built index changes with python -m clara.index add | remove | compact (each has its --help).",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (native or official layout)")
    parser.add_argument(
        "--corpus",
        required=True,
        help='a folder of .txt, .md, .html and .pdf files, JSONL ({"id": ..., "text": ...} per line, or records with '
        "a 'docs' list), or the passages.json clara synthesize wrote (used as cut, if cut for this compressor)",
    )
    parser.add_argument(
        "--overlap",
        type=int,
        default=0,
        help="tokens of a passage's last pieces that start the next passage of a document, at most (default 0)",
    )
    parser.add_argument("--out", required=True, help="index folder (created; an unfinished build there resumes)")
    parser.add_argument("--batch_size", type=positive_int, default=32, help="documents per forward (default 32)")
    parser.add_argument(
        "--shard_size",
        type=positive_int,
        default=4096,
        help="documents per stored shard, the unit of work and of resuming (default 4096)",
    )
    parser.add_argument(
        "--storage_dtype",
        default=None,
        choices=tuple(STORAGE_DTYPES),
        help="how the generator's memory vectors are stored: float32 (default), bfloat16, float16, or int8 / fp8 "
        "(e4m3) with a scale per memory vector, dequantized on read",
    )
    parser.add_argument(
        "--faiss",
        default="flat",
        choices=SEARCH_KINDS,
        help="flat (default): exact search; ivf or hnsw: approximate over float32 rows; pq, ivfpq or opq: over "
        "product-quantized codes (--pq_m bytes a document), the best --rerank candidates re-scored exactly from the "
        "stored vectors (recall@5 against exact search is measured at build time)",
    )
    parser.add_argument("--nlist", type=positive_int, default=None, help="ivf cells (default 4 sqrt(N), at most N/39)")
    parser.add_argument("--nprobe", type=positive_int, default=16, help="ivf cells searched per query (default 16)")
    parser.add_argument("--hnsw_m", type=positive_int, default=32, help="hnsw links per node (default 32)")
    parser.add_argument("--ef_search", type=positive_int, default=128, help="hnsw search breadth (default 128)")
    parser.add_argument(
        "--pq_m",
        type=positive_int,
        default=None,
        help="pq/ivfpq/opq: code bytes per document, a divisor of n_mem x hidden (default: the largest up to "
        "n_mem x hidden / 8 and 256)",
    )
    parser.add_argument(
        "--rerank",
        type=positive_int,
        default=64,
        help="pq/ivfpq/opq: candidates re-scored exactly from the stored vectors per query (default 64)",
    )
    add_model_flags(parser)
    # --dtype once meant the storage dtype here: None tells check_dtype_flags it was not given.
    parser.set_defaults(dtype=None)
    parser.add_argument("--model_path", default=None, help="base model to use instead of the one the checkpoint names")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def check_dtype_flags(args: argparse.Namespace) -> None:
    """The index's --dtype once meant the storage dtype; read silently as the model's it would store float32."""
    if args.dtype is not None and args.storage_dtype is None:
        raise CorpusIndexError(
            f"--dtype {args.dtype}: the index's storage dtype is now --storage_dtype ({', '.join(STORAGE_DTYPES)}), "
            "and --dtype is the model's dtype as in every other command; pass --storage_dtype instead of --dtype "
            "(with --storage_dtype given, --dtype is accepted as the model's)"
        )
    args.dtype = args.dtype or "auto"
    args.storage_dtype = args.storage_dtype or "float32"


def run(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> dict:
    """Rank 0 holds --out for the whole build (another build or export there is refused); then every rank builds."""
    with contextlib.ExitStack() as held:
        busy = None
        if rank == 0:
            try:
                held.enter_context(holding(args.out, "python -m clara.index"))
            except FolderBusy as error:
                busy = str(error)
        busy = broadcast(busy, rank, world)
        if busy:
            raise FolderBusy(busy)
        return build(args, rank, world, device)


def corpus_passages(args: argparse.Namespace, source, model, log) -> tuple[list[str], list[str]]:
    """The ids and texts of --corpus cut into passages the compressor reads whole (DOC_MAX_LENGTH tokens)."""
    length = model.settings.doc_max_length
    if not 0 <= args.overlap < length:
        raise ConfigError("overlap", args.overlap, f"tokens in [0, {length}) (the checkpoint's DOC_MAX_LENGTH)")
    wanted = Cut(args.checkpoint, tokenizer_key(model.tokenizer), length, args.overlap)
    passages, corpus, cut = source_passages(source, model.tokenizer, wanted)
    ids, texts = [p.id for p in passages], [p.text for p in passages]
    for line in describe_skipped(corpus["skipped"]):
        log(line)
    log(describe_corpus(corpus, cut))
    log(longer_than_read(model.tokenizer, texts, length, "passages") or f"Every passage fits DOC_MAX_LENGTH={length}")
    return ids, texts


def build(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> dict:
    log = rank_zero_print(rank)
    source = read_source(args.corpus)
    model, _ = load_for_use(args.checkpoint, choose_runtime(device, args.dtype, args.flash_attn), args.model_path)
    ids, texts = corpus_passages(args, source, model, log)
    log(
        f"Indexing {len(ids)} passages of {args.corpus} with the compressor of {args.checkpoint} "
        f"| {world} process(es) | device {device.type}",
        flush=True,
    )
    search = SearchSettings(
        args.faiss, args.nlist, args.nprobe, args.hnsw_m, args.ef_search, pq_m=args.pq_m, rerank=args.rerank
    )
    meta = build_index(
        model,
        ids,
        texts,
        args.out,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        storage_dtype=args.storage_dtype,
        search=search,
        checkpoint=args.checkpoint,
        corpus=args.corpus,
        rank=rank,
        world=world,
        device=device,
        show_progress=not args.no_progress,
        log=log,
    )
    log(
        f"Index written to {args.out}: {meta['documents']} documents, {meta['bytes_per_document']} bytes of vectors "
        f"each ({meta['n_mem']} x {meta['hidden']} x {args.storage_dtype}), {meta['search']['kind']} search"
    )
    return meta


def run_build(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> dict:
    check_dtype_flags(args)
    return run(args, rank, world, device)


# -- add / remove / compact ----------------------------------------------------------------------------------
def add_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clara.index add",
        description="Compress only the documents of --corpus into new shards of the index and publish it as its "
        "next generation (a server answering from it swaps between batches). An id already in the index exits 2 "
        "unless --replace. A run killed part-way resumes when run again.",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint whose compressor built the index")
    parser.add_argument("--index", required=True, help="index folder of python -m clara.index")
    parser.add_argument("--corpus", required=True, help="the new documents, in the corpus format of the build")
    parser.add_argument("--replace", action="store_true", help="an id already stored gets the new text")
    parser.add_argument("--batch_size", type=positive_int, default=32, help="documents per forward (default 32)")
    parser.add_argument(
        "--overlap", type=int, default=0, help="tokens a passage repeats from the one before (as the build's)"
    )
    add_model_flags(parser)
    parser.add_argument("--model_path", default=None, help="base model to use instead of the one the checkpoint names")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def remove_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clara.index remove",
        description="Leave documents out of search from now on (tombstones; compact drops their rows). A document "
        "id removes every passage of it (ids ID#N), a passage id that passage.",
    )
    parser.add_argument("--index", required=True, help="index folder of python -m clara.index")
    parser.add_argument("--ids", required=True, help="text file: one document or passage id per line")
    return parser


def compact_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clara.index compact",
        description="Rewrite the shards and the search structure without the removed documents.",
    )
    parser.add_argument("--index", required=True, help="index folder of python -m clara.index")
    return parser


def run_add(args: argparse.Namespace, device: torch.device) -> dict:
    source = read_source(args.corpus)
    read_meta(args.index)  # a folder that is no index is refused before the model loads
    model, _ = load_for_use(args.checkpoint, choose_runtime(device, args.dtype, args.flash_attn), args.model_path)
    ids, texts = corpus_passages(args, source, model, print)
    meta = add_documents(
        model,
        args.index,
        ids,
        texts,
        replace=args.replace,
        batch_size=args.batch_size,
        checkpoint=args.checkpoint,
        device=device,
        show_progress=not args.no_progress,
    )
    print(f"Added {len(ids)} documents to {args.index}: {meta['documents']} documents, generation {meta['generation']}")
    return meta


def run_remove(args: argparse.Namespace) -> dict:
    meta = remove_documents(args.index, read_id_file(args.ids))
    print(f"{args.index}: {meta['documents']} documents, generation {meta['generation']}")
    return meta


def run_compact(args: argparse.Namespace) -> dict:
    meta = compact_index(args.index)
    shards = len(meta["shards"])
    print(f"{args.index}: {meta['documents']} documents in {shards} shard(s), generation {meta['generation']}")
    return meta


CHANGES = {"add": add_parser, "remove": remove_parser, "compact": compact_parser}


def change(command: str, args: argparse.Namespace, device: torch.device | None) -> None:
    """add, remove or compact, holding the index's lock (another build or change there is refused)."""
    read_meta(args.index)
    with holding(args.index, f"python -m clara.index {command}"):
        if command == "add":
            run_add(args, device)
        elif command == "remove":
            run_remove(args)
        else:
            run_compact(args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in CHANGES:
        command = argv[0]
        args = CHANGES[command]().parse_args(argv[1:])
        if command == "add":
            return run_command(lambda rank, world, device: change(command, args, device))
        return exit_status(lambda: change(command, args, None))
    args = build_parser().parse_args(argv)
    return run_command(lambda rank, world, device: run_build(args, rank, world, device))


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    sys.exit(record(main)())
