"""python -m clara.index --checkpoint CK --corpus FILE.jsonl --out DIR: build a corpus index (see clara.index)."""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch

from clara.cli import add_model_flags, positive_int
from clara.errors import ConfigError, FolderBusy
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
from clara.index.store import STORAGE_DTYPES
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
        "its own shards (every GPU of every node); an interrupted build resumes with the missing shards.",
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
        default="float32",
        choices=tuple(STORAGE_DTYPES),
        help="dtype the memory vectors are stored in (default float32)",
    )
    parser.add_argument(
        "--faiss",
        default="flat",
        choices=SEARCH_KINDS,
        help="flat (default): exact search; ivf or hnsw: approximate, for large corpora "
        "(recall@5 against exact search is measured at build time)",
    )
    parser.add_argument("--nlist", type=positive_int, default=None, help="ivf cells (default 4 sqrt(N), at most N/39)")
    parser.add_argument("--nprobe", type=positive_int, default=16, help="ivf cells searched per query (default 16)")
    parser.add_argument("--hnsw_m", type=positive_int, default=32, help="hnsw links per node (default 32)")
    parser.add_argument("--ef_search", type=positive_int, default=128, help="hnsw search breadth (default 128)")
    add_model_flags(parser)
    parser.add_argument("--model_path", default=None, help="base model to use instead of the one the checkpoint names")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


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


def build(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> dict:
    log = rank_zero_print(rank)
    source = read_source(args.corpus)
    model, _ = load_for_use(args.checkpoint, choose_runtime(device, args.dtype, args.flash_attn), args.model_path)
    # The compressor reads DOC_MAX_LENGTH tokens: documents are cut into passages it reads whole.
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
    log(
        f"Indexing {len(ids)} passages of {args.corpus} with the compressor of {args.checkpoint} "
        f"| {world} process(es) | device {device.type}",
        flush=True,
    )
    search = SearchSettings(args.faiss, args.nlist, args.nprobe, args.hnsw_m, args.ef_search)
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda rank, world, device: run(args, rank, world, device))


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    sys.exit(record(main)())
