"""python -m clara.synthesize --corpus FOLDER|docs.jsonl --out data/ --llm SPEC: training data for all three stages
from your own documents (docs/guides/synthesis.md). With a server (`--llm openai:`) nothing loads torch, so the
command starts at once (unless `--tokenizer` loads one to cut the documents into passages, clara.index.passages);
with `--llm vllm:MODEL` the run starts its own vLLM server from another environment (`--vllm_python`,
clara.vllm_server) and stops it when it ends, however it ends; a local model (`--llm hf:`) runs alone or under
torchrun through clara.parallel.distributed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import shlex
import sys
import time
from typing import TYPE_CHECKING

from clara.cli import add_model_flags
from clara.errors import ConfigError, RunFailure, exit_status
from clara.files import write_json_atomic
from clara.index.corpus import corpus_hash, load_corpus
from clara.index.folder import describe_skipped
from clara.index.passages import (
    PASSAGES_FILE,
    Cut,
    Passage,
    cut_corpus,
    describe_corpus,
    load_tokenizer,
    tokenizer_key,
    write_passages,
)
from clara.parallel.console import rank_zero_print
from clara.synthesis.documents import Asking
from clara.synthesis.llm import LLM, GenerationSettings, OpenAIChat, parse_llm_spec
from clara.synthesis.pipeline import (
    MANIFEST,
    read_manifest,
    read_shards,
    sharded_job,
    start_or_resume,
    synthesize_shards,
)
from clara.synthesis.recipe import load_recipe
from clara.synthesis.records import Layout, build_records, summarize, write_records
from clara.vllm_server import VLLMServer, VLLMStartError

if TYPE_CHECKING:
    import torch


def _int_at_least(text: str, least: int) -> int:
    value = int(text) if text.strip().lstrip("-").isdigit() else least - 1
    if value < least:
        raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clara.synthesize",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Write stage1, stage1_2 and stage2 training files (and held-out ones) from a corpus: an LLM "
        "writes simple and complex QA pairs and a paraphrase of every document, coverage rounds add "
        "pairs for the facts still uncovered, BM25 finds the distractor documents. A stopped run "
        "continues with the same command.",
    )
    parser.add_argument(
        "--corpus",
        required=True,
        help="a folder of .txt, .md, .html and .pdf files (read recursively; a file's path in it is its id), or "
        'JSONL: {"id": ..., "text": ...} per line, or records with a \'docs\' list (the clara.index corpus format)',
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="the compressor's tokenizer: the base model you will train (Hub id or folder), a checkpoint folder or "
        "`tiny`; documents are cut into passages of at most --doc_max_length of its tokens, questions are asked per "
        f"passage and OUT/{PASSAGES_FILE} lists them (without it documents are used whole, however long)",
    )
    parser.add_argument(
        "--doc_max_length",
        type=positive_int,
        default=256,
        help="tokens per passage at most: the DOC_MAX_LENGTH you will train with (the compressor reads no more)",
    )
    parser.add_argument(
        "--overlap",
        type=non_negative_int,
        default=0,
        help="tokens of a passage's last paragraphs or sentences that start the next passage of the same document, "
        "at most",
    )
    parser.add_argument("--out", required=True, help="output folder (an unfinished run there continues)")
    parser.add_argument(
        "--llm",
        required=True,
        help="openai:http://HOST:PORT/v1 (an OpenAI-compatible server; key from OPENAI_API_KEY), "
        "vllm:MODEL (a vLLM server this run starts with --vllm_python and stops) or hf:MODEL_OR_PATH (local; hf:tiny)",
    )
    parser.add_argument("--model", default=None, help="model name sent to the server (required with openai:)")
    parser.add_argument(
        "--vllm_python",
        default=None,
        help="vllm: the python of an environment with vLLM installed (e.g. ~/vllm-env/bin/python); "
        "it serves on a free loopback port with a random key, its log in OUT/vllm.log",
    )
    parser.add_argument(
        "--vllm_args",
        default="",
        help="vllm: more arguments for vLLM's server, as one string "
        "(e.g. '--tensor-parallel-size 8 --max-model-len 8192')",
    )
    parser.add_argument(
        "--vllm_timeout", type=positive_float, default=1800.0, help="vllm: seconds to wait for the server to be ready"
    )
    parser.add_argument("--prompts", default=None, help="prompts file: an edited copy of clara's default_prompts.json")
    parser.add_argument("--rounds", type=non_negative_int, default=2, help="coverage rounds per document (at most)")
    parser.add_argument(
        "--judge",
        action="store_true",
        help="also ask the LLM whether the document supports each kept pair (one more request per document)",
    )
    parser.add_argument("--concurrency", type=positive_int, default=32, help="openai: requests in flight")
    parser.add_argument("--batch_size", type=positive_int, default=16, help="hf: requests generated per batch")
    parser.add_argument("--timeout", type=positive_float, default=300.0, help="openai: seconds per request")
    parser.add_argument(
        "--max_retries",
        type=non_negative_int,
        default=8,
        help="openai: retries of a request on 429, 5xx, a timeout or a lost connection",
    )
    parser.add_argument(
        "--backoff",
        type=positive_float,
        default=1.0,
        help="openai: first retry delay in seconds, doubled per retry (with jitter)",
    )
    parser.add_argument(
        "--parse_retries",
        type=non_negative_int,
        default=2,
        help="times a malformed answer is asked for again before it is skipped",
    )
    parser.add_argument("--max_tokens", type=positive_int, default=1024, help="tokens per answer")
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature (0: greedy, when a malformed answer asked for again tends to come "
        "back the same; each try has its own seed)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds of the requests, the split and the placing")
    parser.add_argument(
        "--shard_size", type=positive_int, default=256, help="documents per shard, the unit of writing and resuming"
    )
    parser.add_argument("--eval_fraction", type=float, default=0.05, help="share of documents held out")
    parser.add_argument(
        "--stage1_2_docs",
        type=positive_int,
        default=2,
        help="documents per stage1_2 record (its own and retrieved distractors)",
    )
    parser.add_argument(
        "--candidates",
        type=positive_int,
        default=20,
        help="documents per stage2 record (the positive among retrieved ones)",
    )
    add_model_flags(parser, note="hf: ")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def check_settings(args: argparse.Namespace, kind: str) -> None:
    if kind == "openai" and not args.model:
        raise ConfigError("model", args.model, "the model name the server serves (required with --llm openai:)")
    if kind == "vllm":
        if args.model:
            raise ConfigError("model", args.model, "no --model with --llm vllm:MODEL (vLLM serves MODEL by that name)")
        python = args.vllm_python
        if not python or not os.path.isfile(python) or not os.access(python, os.X_OK):
            raise ConfigError(
                "vllm_python",
                python,
                "the python executable of an environment with vLLM installed (required with --llm vllm:)",
            )
    if not 0 <= args.eval_fraction < 1:
        raise ConfigError("eval_fraction", args.eval_fraction, "a share in [0, 1)")
    if not 0 <= args.temperature <= 2:
        raise ConfigError("temperature", args.temperature, "a number in [0, 2]")
    if args.candidates < 2:
        raise ConfigError("candidates", args.candidates, "at least 2 (the positive and a distractor)")
    if args.overlap >= args.doc_max_length:
        raise ConfigError("overlap", args.overlap, f"fewer tokens than --doc_max_length ({args.doc_max_length})")


def run_settings(
    args: argparse.Namespace, kind: str, target: str, ids: list[str], texts: list[str], prompts_text: str
) -> dict:
    """What the shards depend on: a rerun into the same folder must have the same (a server may move)."""
    return {
        "corpus_sha256": corpus_hash(ids, texts),
        "documents": len(ids),
        # vllm: is an OpenAI-compatible server too: a run may go on with one started by hand, or the other way.
        "llm": "openai" if kind == "vllm" else kind,
        "model": args.model if kind == "openai" else target,
        "prompts_sha256": hashlib.sha256(prompts_text.encode()).hexdigest(),
        **{name: getattr(args, name) for name in ("rounds", "judge", "parse_retries", "max_tokens", "temperature")},
        "seed": args.seed,
        "shard_size": args.shard_size,
        # How documents were cut (None: whole), named when a rerun would cut them otherwise.
        "tokenizer": args.tokenizer,
        "doc_max_length": args.doc_max_length if args.tokenizer else None,
        "overlap": args.overlap if args.tokenizer else None,
    }


@contextlib.contextmanager
def llm_server(args: argparse.Namespace, kind: str, target: str, log):
    """vllm: a vLLM server for the run, stopped when the block ends (yields it); other kinds: None."""
    if kind != "vllm":
        yield None
        return
    server = VLLMServer(
        args.vllm_python,
        target,
        shlex.split(args.vllm_args),
        log_path=os.path.join(args.out, "vllm.log"),
        timeout=args.vllm_timeout,
    )
    started = time.monotonic()
    log(f"Starting vLLM ({target}) with {args.vllm_python}; its log: {server.log_path}", flush=True)
    try:
        server.start()
        log(f"vLLM ready at {server.url} after {time.monotonic() - started:.0f}s", flush=True)
        yield server
    except VLLMStartError as error:
        raise RunFailure(str(error)) from None
    finally:
        server.stop()  # and every process it started; the keeper does it too if this process dies first
    log("vLLM stopped", flush=True)


def read_passages(args: argparse.Namespace, log) -> tuple[list[Passage], dict, Cut | None]:
    """The corpus's passages (with --tokenizer) or whole documents (without), what the corpus held, and the cut."""
    ids, texts, corpus = load_corpus(args.corpus)
    for line in describe_skipped(corpus["skipped"]):
        log(line, flush=True)
    if args.tokenizer is None:
        log(
            "Documents are used whole, however long (the compressor reads the first DOC_MAX_LENGTH tokens of each): "
            "pass --tokenizer to cut them into passages it reads whole",
            flush=True,
        )
        return [Passage(i, i, 1, t) for i, t in zip(ids, texts)], corpus, None
    tokenizer = load_tokenizer(args.tokenizer)
    cut = Cut(args.tokenizer, tokenizer_key(tokenizer), args.doc_max_length, args.overlap)
    passages, corpus = cut_corpus(ids, texts, corpus, tokenizer, cut)
    log(describe_corpus(corpus, cut), flush=True)
    return passages, corpus, cut


def make_llm(
    args: argparse.Namespace, kind: str, target: str, device: torch.device | None, server: VLLMServer | None = None
) -> LLM:
    settings = GenerationSettings(args.max_tokens, args.temperature)
    if kind in ("openai", "vllm"):
        return OpenAIChat(
            server.url if server else target,
            target if server else args.model,
            server.api_key if server else os.environ.get("OPENAI_API_KEY"),
            settings,
            args.concurrency,
            args.timeout,
            args.max_retries,
            args.backoff,
        )
    from clara.model.load import choose_runtime
    from clara.synthesis.local import LocalChat

    return LocalChat(target, settings, args.batch_size, choose_runtime(device, args.dtype, args.flash_attn))


def run(args: argparse.Namespace, rank: int, world: int, device: torch.device | None) -> dict | None:
    log = rank_zero_print(rank)
    started = time.monotonic()
    kind, target = parse_llm_spec(args.llm)
    check_settings(args, kind)
    recipe = load_recipe(args.prompts)
    passages, corpus, cut = read_passages(args, log)
    ids, texts = [p.id for p in passages], [p.text for p in passages]
    job = sharded_job(args.out, len(ids), args.shard_size)
    shards = job.ranges()
    start_or_resume(args.out, run_settings(args, kind, target, ids, texts, recipe.text), shards, rank)
    if rank == 0 and cut is not None:
        write_passages(os.path.join(args.out, PASSAGES_FILE), cut, passages, corpus)
    todo = job.pending(rank, world)
    todo_everywhere = job.pending()
    done_before = len(shards) - len(todo_everywhere)
    log(
        f"Synthesizing {len(ids)} {'passages' if cut else 'documents'} of {args.corpus} with {args.llm}"
        f"{f' ({args.model})' if args.model else ''} into {args.out}: {len(shards)} shard(s), {done_before} done "
        f"before | {world} process(es)",
        flush=True,
    )
    if todo:
        with llm_server(args, kind, target, log) as server:
            llm = make_llm(args, kind, target, device, server)
            asking = Asking(llm, recipe, args.rounds, args.parse_retries, args.judge, args.seed)
            asyncio.run(synthesize_shards(asking, ids, texts, args.out, shards, todo, not args.no_progress))
    if rank != 0:
        return None
    job.wait(log)
    worked = job.items_in(todo_everywhere)
    return write_outputs(args, ids, texts, corpus, len(shards), worked, time.monotonic() - started, log)


def write_outputs(
    args: argparse.Namespace,
    ids: list[str],
    texts: list[str],
    corpus: dict,
    shards: int,
    worked: int,
    seconds: float,
    log,
) -> dict:
    """Rank 0, every shard done: the stages' files, summary.json and the manifest's list of outputs."""
    results = read_shards(args.out, shards)
    records, duplicates = build_records(
        ids, texts, results, Layout(args.eval_fraction, args.stage1_2_docs, args.candidates, args.seed)
    )
    written = write_records(args.out, records)
    summary = {"corpus": corpus, **summarize(results, duplicates, written)}
    summary["this_run"] = {
        "documents": worked,
        "seconds": round(seconds, 2),
        "documents_per_second": round(worked / seconds, 3),
    }
    write_json_atomic(os.path.join(args.out, "summary.json"), summary)
    write_json_atomic(os.path.join(args.out, MANIFEST), {**read_manifest(args.out), "outputs": written})
    log(
        f"{summary['documents_with_pairs']} of {summary['documents']} documents gave {summary['pairs']} pairs "
        f"(rejected documents: {summary['documents_rejected'] or 'none'}; rejected outputs: "
        f"{summary['rejected'] or 'none'}); {summary['requests']['answered']} requests, "
        f"{summary['tokens']['prompt'] + summary['tokens']['completion']} tokens; this run: {worked} documents "
        f"in {seconds:.1f}s"
    )
    listed = ", ".join(f"{name} ({count} records)" for name, count in written.items()) or "no training file"
    log(f"Wrote {listed} and summary.json to {args.out}")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return exit_status(lambda: synthesize(args))
    except KeyboardInterrupt:
        print(f"Stopped; the finished shards are kept in {args.out}: run the same command to continue", file=sys.stderr)
        return 130


def synthesize(args: argparse.Namespace) -> int | None:
    """A local model (hf:) runs on one process or under torchrun (status from run_command); a server's client here."""
    kind, _ = parse_llm_spec(args.llm)
    if kind == "hf":
        from clara.parallel.distributed import run_command

        return run_command(lambda rank, world, device: run(args, rank, world, device))
    run(args, 0, 1, None)
    return None


if __name__ == "__main__":
    sys.exit(main())
