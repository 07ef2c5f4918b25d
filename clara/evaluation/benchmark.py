"""Answer quality on the paper's QA sets (EM, F1, recall@k; `python -m bench` measures step cost instead):
the paper's evaluation in one command, a checkpoint on four QA sets, in the normal and the oracle setting.

    python -m clara.benchmark --checkpoint CK [--data NAME] [--max_samples N] [--output_dir DIR]

A stage1_2 checkpoint is evaluated on the `inst_eval_{nq,hotpotqa,musique,2wiki}_*` configurations of the
official data set (apple/CLaRa_multi_stage), a stage2 checkpoint on the `e2e_eval_ours_*` ones. `no_pos`
is the paper's normal setting (retrieved documents), `with_pos` the oracle one (the positive document is
among them). NAME is a Hub id or a local directory: in the Hub layout (a README with `configs:`), or
holding one CONFIG.jsonl per set.

Each set is evaluated by clara.evaluation.evaluate.evaluate_stage (clara.evaluation.command's helpers load
it) and written as `python -m clara.evaluate --output` writes it:
DIR/CONFIG.jsonl (per sample) and DIR/CONFIG.summary.json. A set whose summary is already there, made with
the same checkpoint, data and settings, is not evaluated again, so an interrupted run resumes. The table
(rows: data sets; columns: normal and oracle; cells: EM, F1, cover-EM, and recall@k for stage2) is printed
and written to DIR/table.md. Runs on several processes under torchrun or accelerate launch, as
clara.evaluation.command does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from clara.cli import add_model_flags, positive_int
from clara.config import ConfigError
from clara.data.spec import DataSource, HubSource, JsonlFiles
from clara.evaluation.command import (
    eval_config,
    eval_length_check,
    load_eval_model,
    load_eval_records,
    summary_path,
    write_outputs,
)
from clara.evaluation.evaluate import RETRIEVAL_KS, evaluate_stage
from clara.files import write_text_atomic
from clara.model.load import choose_runtime
from clara.model.stage_model import checkpoint_stage
from clara.parallel.console import rank_zero_print
from clara.parallel.distributed import broadcast, run_command
from clara.stages import STAGES, Stage

DEFAULT_DATA = "apple/CLaRa_multi_stage"
# (configuration name part, row label), in the paper's order.
DATASETS = (("nq", "NQ"), ("hotpotqa", "HotpotQA"), ("musique", "MuSiQue"), ("2wiki", "2WikiMultihopQA"))
SETTINGS = (("no_pos", "Normal"), ("with_pos", "Oracle"))
# The stages that have evaluation sets (Stage.benchmark_sets), by name.
BENCHMARKED = {name: stage for name, stage in STAGES.items() if stage.benchmark_sets}
# clara.evaluation.command's summary keys shown in each cell, with their column labels.
ANSWER_METRICS = (("exact_match", "EM"), ("f1", "F1"), ("cover_exact_match", "CEM"))
# What makes a finished set's summary reusable: these must match.
RESUME_KEYS = ("checkpoint", "dataset", "stage", "max_samples", "max_new_tokens", "max_len", "seed")


def config_name(stage: Stage, dataset: str, setting: str) -> str:
    return f"{stage.benchmark_sets}{dataset}_{setting}"


def data_source(data: str, config: str) -> DataSource:
    """DATA/CONFIG.jsonl when there is one, else the configuration of the Hub data set (or Hub-layout directory)."""
    local = os.path.join(data, config + ".jsonl")
    return JsonlFiles((local,)) if os.path.isfile(local) else HubSource(data, config)


def metric_columns(stage: Stage) -> list[tuple[str, str]]:
    columns = list(ANSWER_METRICS)
    if stage.uses_query:
        columns += [(f"recall@{k}", f"R@{k}") for k in RETRIEVAL_KS]
    return columns


def _cell(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def format_benchmark(stage: Stage, metrics: dict[str, dict]) -> str:
    """The paper's table as Markdown: metrics[config] is a set's summary; percentages; an average row."""
    columns = metric_columns(stage)
    header = ["Data set"] + [f"{setting} {label}" for _, setting in SETTINGS for _, label in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    rows = []
    for dataset, label in DATASETS:
        values = [
            metrics[config_name(stage, dataset, setting)].get(key) for setting, _ in SETTINGS for key, _ in columns
        ]
        rows.append(values)
        lines.append("| " + " | ".join([label] + [_cell(v) for v in values]) + " |")
    averages = []
    for column in zip(*rows):
        known = [v for v in column if v is not None and not math.isnan(v)]
        averages.append(sum(known) / len(known) if len(known) == len(column) else None)
    lines.append("| " + " | ".join(["Average"] + [_cell(v) for v in averages]) + " |")
    return "\n".join(lines)


def finished_summary(output: str, meta: dict) -> dict | None:
    """The metrics of an earlier run of this set with the same settings, or None."""
    path = summary_path(output)
    if not (os.path.isfile(path) and os.path.isfile(output)):
        return None
    with open(path, encoding="utf-8") as handle:
        summary = json.load(handle)
    return summary["metrics"] if all(summary.get(key) == meta[key] for key in RESUME_KEYS) else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clara.benchmark",
        description="Answer quality on the paper's QA sets (python -m bench measures step cost instead). "
        "Evaluate a stage1_2 checkpoint on the four inst_eval_* sets, or a stage2 checkpoint on the "
        "four e2e_eval_ours_* sets, in the normal (no_pos) and oracle (with_pos) settings, and print "
        "the paper's table. Runs on several processes under torchrun or accelerate launch.",
    )
    parser.add_argument("--checkpoint", required=True, help="stage1_2 or stage2 checkpoint directory")
    parser.add_argument(
        "--data",
        default=DEFAULT_DATA,
        help=f"Hub id (default {DEFAULT_DATA}) or a local directory in the Hub layout, "
        "or one holding CONFIG.jsonl per set",
    )
    parser.add_argument(
        "--stage",
        choices=tuple(BENCHMARKED),
        default=None,
        help="default: the stage recorded in the checkpoint (official checkpoints: stage2 "
        "when they hold a query_reasoner_adapter)",
    )
    parser.add_argument(
        "--max_samples",
        type=positive_int,
        default=None,
        help="evaluate only the first N samples of each set, read without the rest (default: all)",
    )
    parser.add_argument(
        "--output_dir", default=None, help="where the per-set files and table.md go (default: CHECKPOINT/benchmark)"
    )
    parser.add_argument("--batch_size", type=positive_int, default=4, help="samples per forward, per process")
    parser.add_argument("--max_new_tokens", type=positive_int, default=64, help="max generated tokens per answer")
    parser.add_argument(
        "--max_len",
        type=positive_int,
        default=None,
        help="max decoder tokens (default 2048, stage2 1024, as in training)",
    )
    parser.add_argument("--seed", type=int, default=42, help="the training seed (default 42)")
    add_model_flags(parser)
    parser.add_argument("--model_path", default=None, help="base model to use instead of the one the checkpoint names")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    return parser


def run(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> str:
    """Evaluate the sets not finished yet and return the table (on every rank)."""
    log = rank_zero_print(rank)
    stage = checkpoint_stage(args.checkpoint, args.stage)
    if stage.name not in BENCHMARKED:
        sets = " or ".join(f"a {name} checkpoint (the {s.benchmark_sets}* sets)" for name, s in BENCHMARKED.items())
        raise ConfigError("checkpoint", args.checkpoint, f"{sets}, not {stage.name}")
    runtime = choose_runtime(device, args.dtype, args.flash_attn)
    output_dir = args.output_dir or os.path.join(args.checkpoint, "benchmark")
    configs = [config_name(stage, dataset, setting) for dataset, _ in DATASETS for setting, _ in SETTINGS]
    sources = {config: data_source(args.data, config) for config in configs}
    metas = {
        config: {
            "checkpoint": os.path.abspath(args.checkpoint),
            "dataset": str(sources[config]),
            "stage": stage.name,
            "max_samples": args.max_samples,
            "max_new_tokens": args.max_new_tokens,
            "max_len": args.max_len,
            "seed": args.seed,
            "world_size": world,
            "batch_size": args.batch_size,
        }
        for config in configs
    }
    outputs = {config: os.path.join(output_dir, config + ".jsonl") for config in configs}
    # Rank 0 decides what is left, so that every rank runs the same sets whatever its file system shows.
    done = broadcast(
        {config: finished_summary(outputs[config], metas[config]) for config in configs} if rank == 0 else None,
        rank,
        world,
    )
    todo = [config for config in configs if done[config] is None]
    log(
        f"Benchmark of {args.checkpoint} ({stage.name}) on {args.data}: {len(configs) - len(todo)} of {len(configs)} "
        f"sets already done in {output_dir}" + (f", {len(todo)} to evaluate" if todo else ""),
        flush=True,
    )
    if todo:
        model = load_eval_model(args.checkpoint, stage, runtime, args.model_path, log)
    check = eval_length_check(args.checkpoint, stage, args.max_len, args.seed, args.model_path)
    for config in todo:
        records = load_eval_records(
            stage, sources[config], model.settings.generation_top_k, args.max_samples, check, log
        )
        cfg = eval_config(
            model, stage, len(records), args.batch_size, None, args.max_new_tokens, args.max_len, args.seed
        )
        log(f"{config}: {len(records)} samples from {metas[config]['dataset']}", flush=True)
        results = evaluate_stage(model, records, stage, cfg, rank, world, device, show_progress=not args.no_progress)
        if rank == 0:
            write_outputs(outputs[config], results["samples"], results["summary"], metas[config])
        done[config] = results["summary"]
    table = format_benchmark(stage, done)
    if rank == 0:
        write_text_atomic(os.path.join(output_dir, "table.md"), table + "\n")
        log(
            f"\n{stage.name} checkpoint {args.checkpoint}, data {args.data}"
            + (f", first {args.max_samples} samples per set" if args.max_samples else "")
            + f" (percent):\n{table}\nPer-set results and table.md in {output_dir}"
        )
    return table


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda rank, world, device: run(args, rank, world, device))


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    sys.exit(record(main)())
