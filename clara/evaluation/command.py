"""`python -m clara.evaluate` (README: "Evaluation and inference"): a checkpoint evaluated on a data set of
its stage, by clara.evaluation.evaluate (what the trainer also runs), on one or several processes (torchrun,
accelerate launch); the table printed, per-sample rows and the summary written with --output. The
checkpoint-side helpers here (its records, length check, model and settings) are shared with clara.evaluation.benchmark.

    python -m clara.evaluate --checkpoint DIR --dataset FILE|hf:NAME:CONFIG[:SPLIT] [--stage S] [--max_samples N]
        [--batch_size B] [--max_new_tokens T] [--output FILE]
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import datasets
import torch

from clara.cli import add_model_flags, positive_int
from clara.config import official_base_name
from clara.data.load import load_records
from clara.data.spec import DataSource, checked_source
from clara.errors import ConfigError
from clara.evaluation.evaluate import RETRIEVAL_KS, EvalSettings, evaluate_stage
from clara.evaluation.metrics import ANSWER_SCORE_NAMES
from clara.files import json_safe, write_json_atomic, write_jsonl_atomic
from clara.index.passages import describe_longer, longer_than_read
from clara.model.checkpoint import read_config, resolve_base_path
from clara.model.collate import LengthCheck
from clara.model.hub import resolve_checkpoint
from clara.model.load import Runtime, choose_runtime, load_for_use
from clara.model.stage_model import checkpoint_stage, ensure_query_reasoner
from clara.parallel.console import rank_zero_print, silent
from clara.parallel.distributed import rank_zero_first, run_command
from clara.stages import STAGES, Stage

# -- presentation -----------------------------------------------------------------------------------------
PERCENT_KEYS = ("token_accuracy", *ANSWER_SCORE_NAMES)


def format_table(summary: dict, title: str = "") -> str:
    """A small two-column table; shares are shown as percentages."""
    lines = [title] if title else []
    width = max(len(k) for k in summary)
    lines.append(f"{'metric'.ljust(width)}  value")
    lines.append(f"{'-' * width}  {'-' * 10}")
    for key, value in summary.items():
        if isinstance(value, float) and math.isnan(value):
            shown = "n/a"
        elif key in PERCENT_KEYS or key.startswith(("recall@", "precision@")):
            shown = f"{100 * value:.2f}%"
        elif isinstance(value, float):
            shown = f"{value:.4f}"
        else:
            shown = str(value)
        lines.append(f"{key.ljust(width)}  {shown}")
    return "\n".join(lines)


def summary_path(output: str) -> str:
    """out.jsonl -> out.summary.json (next to the per-sample file)."""
    root, ext = os.path.splitext(output)
    return (root if ext in (".jsonl", ".json") else output) + ".summary.json"


def write_outputs(output: str, rows: list[dict], summary: dict, meta: dict) -> str:
    """Per-sample JSON lines at `output`, the summary beside it; both replaced atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    write_jsonl_atomic(output, (json_safe(row) for row in rows))
    path = summary_path(output)
    write_json_atomic(path, {**meta, "metrics": json_safe(summary)})
    return path


# -- command line -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clara.evaluate",
        description="Evaluate a CLaRa checkpoint on a JSONL file of its stage: eval loss and token accuracy; "
        "stage1_2/stage2 also EM, F1 and cover-EM of greedy answers; stage2 also recall@k. "
        "Runs on several processes under torchrun or accelerate launch.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint directory (native or official release layout) or Hugging Face Hub id "
        "(e.g. apple/CLaRa-7B-E2E/compression-16)",
    )
    parser.add_argument(
        "--dataset",
        required=True,
        help="JSONL file(s) of the stage, joined by commas, or a Hub data set hf:NAME:CONFIG[:SPLIT] "
        "(NAME: a Hub id or a local directory in the Hub layout)",
    )
    parser.add_argument(
        "--stage",
        choices=list(STAGES),
        default=None,
        help="data format and metrics (default: the stage recorded in the checkpoint; official "
        "checkpoints: stage2 when they hold a query_reasoner_adapter, else required)",
    )
    parser.add_argument(
        "--max_samples",
        type=positive_int,
        default=None,
        help="answer only the first N samples by generation (default: all; the eval loss covers every sample)",
    )
    parser.add_argument(
        "--limit", type=positive_int, default=None, help="use only the first N samples of the dataset for everything"
    )
    parser.add_argument(
        "--batch_size", type=positive_int, default=4, help="samples per forward, per process (default 4)"
    )
    parser.add_argument(
        "--max_new_tokens", type=positive_int, default=64, help="max generated tokens per answer (default 64)"
    )
    parser.add_argument(
        "--output",
        default=None,
        help="write per-sample JSON lines here, and the summary to the same name with .summary.json "
        "(out.jsonl -> out.summary.json); default: print the table only",
    )
    parser.add_argument(
        "--max_len",
        type=positive_int,
        default=None,
        help="max decoder tokens (default 2048, stage2 1024, as in training)",
    )
    parser.add_argument(
        "--seed", type=int, default=42, help="the training seed, which picks the stage1 paraphrase prompts (default 42)"
    )
    add_model_flags(parser)
    parser.add_argument("--model_path", default=None, help="base model to use instead of the one the checkpoint names")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--index",
        default=None,
        help="stage2: also answer from this corpus index (python -m clara.index): recall@1/3/5 of "
        "the records' gold_ids over the whole corpus, and EM / F1 / cover-EM (on rank 0)",
    )
    return parser


def load_eval_records(
    stage: Stage, source: DataSource, top_k: int, limit: int | None, check: LengthCheck | None, log
) -> datasets.Dataset:
    """Validated records of `source` (JSONL files or a Hub configuration); the first `limit` when given.

    Local rank 0 prepares them (once: cached, with the MAX_LEN check); the node's other ranks wait for it."""
    datasets.disable_progress_bars()
    preparer = int(os.environ.get("LOCAL_RANK", "0")) == 0
    return load_records(
        stage,
        source,
        min_docs=stage.min_docs(top_k),
        max_samples=limit,
        make_check=check,
        log=log if preparer else silent,
        preparer=preparer,
    )


def eval_length_check(
    checkpoint: str, stage: Stage, max_len: int | None, seed: int, model_path: str | None
) -> LengthCheck:
    """The MAX_LEN check of the records with the checkpoint's tokenizer and memory-token settings."""
    config = read_config(checkpoint)
    if "decoder_model_name" in config:  # the official layout: the tokenizer is the base model's
        source = resolve_base_path(model_path or official_base_name(config["decoder_model_name"], checkpoint))
        doc_len = int(config["doc_max_length"])
        n_mem = doc_len // int(config["compr_rate"])
    else:
        source, doc_len, n_mem = checkpoint, int(config["doc_max_length"]), int(config["n_mem_tokens"])
    return LengthCheck(
        stage, source, n_mem, doc_len, max_len or stage.max_len, int(config.get("generation_top_k", 5)), seed
    )


def load_eval_model(checkpoint: str, stage: Stage, runtime: Runtime, model_path: str | None, log):
    """The checkpoint's ClaraModel on the runtime's device, with a query reasoner where the stage uses one."""
    model, _ = load_for_use(checkpoint, runtime, model_path)
    if stage.uses_query:
        ensure_query_reasoner(model, log=log)
    return model


def eval_config(
    model,
    stage: Stage,
    num_records: int,
    batch_size: int,
    max_samples: int | None,
    max_new_tokens: int,
    max_len: int | None,
    seed: int,
) -> EvalSettings:
    """What evaluate_stage reads, from the command line's options and the stage's defaults."""
    return EvalSettings(
        batch_size=batch_size,
        generate_limit=max_samples or num_records,
        max_new_tokens=max_new_tokens,
        max_len=max_len or stage.max_len,
        seed=seed,
    )


def run(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> dict:
    log = rank_zero_print(rank)
    # A Hub id is downloaded once, by rank 0; the other ranks then find it in the cache.
    checkpoint = rank_zero_first(lambda: resolve_checkpoint(args.checkpoint), rank, world)
    stage = checkpoint_stage(checkpoint, args.stage)
    stage_source = "--stage" if args.stage else "from the checkpoint"
    if args.index and not stage.uses_query:
        raise ConfigError(
            "index",
            args.index,
            f"a stage2 checkpoint and records (open-corpus retrieval uses the query reasoner), not {stage.name}",
        )
    source = checked_source(args.dataset, "dataset")
    runtime = choose_runtime(device, args.dtype, args.flash_attn)
    top_k = int(read_config(checkpoint).get("generation_top_k", 5))
    check = eval_length_check(checkpoint, stage, args.max_len, args.seed, args.model_path)
    records = load_eval_records(stage, source, top_k, args.limit, check, log)
    model = load_eval_model(checkpoint, stage, runtime, args.model_path, log)
    cfg = eval_config(
        model, stage, len(records), args.batch_size, args.max_samples, args.max_new_tokens, args.max_len, args.seed
    )
    log(
        f"Evaluating {args.checkpoint} ({stage.name}, {stage_source}) on {args.dataset}: {len(records)} samples"
        + (f", generation on {min(cfg.generate_limit, len(records))}" if stage.generates else "")
        + f" | {world} process(es) | device {device.type} | dtype {str(runtime.dtype).replace('torch.', '')}",
        flush=True,
    )
    truncated = longer_than_read(
        model.tokenizer,
        [d for r in records for d in r["docs"]],
        model.settings.doc_max_length,
        "documents of the records",
    )
    if truncated:
        log(truncated, flush=True)
    results = evaluate_stage(
        model, records, stage, cfg, rank, world, device, show_progress=not args.no_progress, leave_progress=True
    )
    if rank == 0:
        log(format_table(results["summary"], title=f"{stage.name} evaluation of {args.checkpoint}"))
        if args.index:
            results["summary"].update(open_corpus(args, model, records, cfg, device, log))
        if args.output:
            meta = {
                "checkpoint": args.checkpoint,
                "dataset": args.dataset,
                "stage": stage.name,
                "world_size": world,
                "batch_size": args.batch_size,
                "max_new_tokens": args.max_new_tokens,
                "index": args.index,
            }
            written = write_outputs(args.output, results["samples"], results["summary"], meta)
            log(f"Per-sample results: {args.output}\nSummary: {written}")
    return results


def open_corpus(args: argparse.Namespace, model, records, cfg: EvalSettings, device: torch.device, log) -> dict:
    """The open-corpus table (answers from the index's stored vectors); its numbers prefixed open_."""
    from clara.evaluation.open_corpus import open_corpus_summary
    from clara.index.store import check_index_matches, load_index

    index = load_index(args.index)
    check_index_matches(index, model, args.checkpoint)
    truncated = describe_longer(
        index.meta.get("longer_than_read", 0),
        len(index.ids),
        model.settings.doc_max_length,
        f"documents of {args.index}",
    )
    if truncated:
        log(truncated, flush=True)
    gold = [list(r["gold_ids"]) if r["has_gold_ids"] else None for r in records]
    summary, _ = open_corpus_summary(
        model,
        index,
        [r["question"] for r in records],
        [r["answer"] for r in records],
        gold,
        min(cfg.generate_limit, len(records)),
        RETRIEVAL_KS,
        batch_size=cfg.batch_size,
        max_new_tokens=cfg.max_new_tokens,
        max_len=cfg.max_len,
        seed=cfg.seed,
        device=device,
    )
    log(
        format_table(
            summary,
            title=f"open-corpus evaluation: retrieval over all {index.documents} documents of "
            f"{args.index}, answers from their stored vectors",
        )
    )
    return {f"open_{key}": value for key, value in summary.items()}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda rank, world, device: run(args, rank, world, device))


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    sys.exit(record(main)())
