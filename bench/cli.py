"""The `python -m bench` command line: one option per BenchConfig field (its help, group and choices written
beside the field), plus the options of the run itself (sweeps, output, the other measurements)."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from bench.config import MEASUREMENT, SHAPE, SHAPES, TRAINING, BenchConfig
from bench.machine import MIN_IDLE
from bench.sweeps import SWEEPS, describe_sweeps
from clara.cli import parse_bool

DESCRIPTION = (
    "Measure what a CLaRa training step costs: median step time, samples/s, tokens/s, peak "
    "memory and, on a GPU, model FLOPs utilisation (MFU). The base model is a Qwen3 of the given "
    "shape with random weights and the built-in tiny model's tokenizer, loaded through clara's "
    "own build path; the steps run through the trainer's code (deepspeed.initialize with "
    "clara.training.setup.deepspeed_config, clara.training.step.optimizer_step on Batches from "
    "clara.model.collate.Collator) on synthetic records whose documents fill DOC_MAX_LENGTH tokens. "
    "Each configuration runs in its own process, so its peak memory is its own."
)
EPILOG = (
    "Peak memory: on CPU the process's peak resident set size over the timed steps (step MB: that "
    "peak minus the RSS before them, i.e. activations and other per-step memory; compr MB: the "
    "candidate compression's part, with the query reasoner); on a GPU torch.cuda.max_memory_allocated. One step is "
    "one micro-batch (gradient accumulation 1) including the optimizer update. MFU counts a frozen "
    "base with LoRA: forward 2N per token, backward 2N (activation gradients) plus LoRA weight "
    "gradients; the candidate compression is forward only; recomputation by gradient "
    "checkpointing is not counted. Sweep groups: "
)


def auto_bool(text: str) -> bool | None:
    return None if text.strip().lower() == "auto" else parse_bool(text)


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except where there is none to show."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def flag_options(field: dataclasses.Field) -> dict:
    """argparse's type, metavar and choices of a BenchConfig field: from its annotation, unless the field
    names them. A yes/no field reads true/false; one that may be None also reads auto."""
    hint = typing.get_type_hints(BenchConfig)[field.name]
    kinds = [kind for kind in typing.get_args(hint) if kind is not type(None)] or [hint]
    optional = type(None) in typing.get_args(hint)
    options = {"type": kinds[0], "choices": field.metadata.get("choices")}
    if kinds[0] is bool:
        options["type"] = auto_bool if optional else parse_bool
        options["metavar"] = "{auto,true,false}" if optional else "BOOL"
    return options


def add_config_options(parser: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    """One option per BenchConfig field that has a help text, in its group; returns the groups by title."""
    groups = {title: parser.add_argument_group(title) for title in (SHAPE, TRAINING, MEASUREMENT)}
    groups[SHAPE].add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default=None,
        help="start from a real model's shape (the shape options given as well override it)",
    )
    for field in dataclasses.fields(BenchConfig):
        if "help" in field.metadata:
            groups[field.metadata["group"]].add_argument(
                f"--{field.name}", default=field.default, help=field.metadata["help"], **flag_options(field)
            )
    return groups


# The other things bench measures, each instead of a step's cost: (flag, what it measures).
MEASUREMENTS = (
    (
        "--retrieval",
        "answering from a compressed corpus (indexing, memory per document, search latency, answer time)",
    ),
    (
        "--serve",
        "python -m clara.serve (throughput and p50/p99 latency at 1, 8 and 32 concurrent clients, "
        "batched and one at a time)",
    ),
    (
        "--index_choices",
        "what each index storage and search choice costs in answers (EM, open-corpus recall@5, bytes per "
        "document) with a trained checkpoint",
    ),
    (
        "--index_scale",
        "the index on a synthetic corpus of N passages (build throughput, bytes per passage, p50/p99 search "
        "latency, recall@5 against exact)",
    ),
    (
        "--data",
        "preparing the training data (records/s, launch to step 1 and to the end of step 2, empty "
        "and warm cache, one and two processes, peak memory)",
    ),
)


def add_run_options(run: argparse._ArgumentGroup) -> None:
    """The options of the run itself, not of one configuration."""
    run.add_argument(
        "--sweep",
        nargs="?",
        const="all",
        default=None,
        metavar="GROUPS",
        help="run the scaling rows instead of one configuration: 'all' or a comma list of "
        + ", ".join(SWEEPS)
        + "; rows not named in a group keep the settings above "
        "(the candidates and chunk rows use the query reasoner; with --stage set to a stage that does, the docs "
        "rows run the stage before it)",
    )
    run.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    for flag, what in MEASUREMENTS:
        run.add_argument(
            flag, action="store_true", help=f"measure {what} instead; its options: python -m bench {flag} --help"
        )
    run.add_argument("--timeout", type=float, default=1800, help="seconds allowed per configuration")
    run.add_argument(
        "--max_load",
        type=float,
        default=None,
        help="on a shared machine: before each configuration, wait (at most --timeout seconds) until "
        f"the 1-minute load average is below this and the CPUs are {MIN_IDLE * 100:.0f}%% idle over 3 s; "
        "default: start at once, and warn above 0.75 x the CPU count",
    )
    run.add_argument(
        "--exact_memory",
        type=parse_bool,
        default=True,
        metavar="BOOL",
        help="give each measuring process fixed glibc malloc thresholds, so RSS follows the memory "
        "in use (false: the allocator's defaults, as a training run has them)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        formatter_class=Formatter,
        description=DESCRIPTION,
        epilog=EPILOG + describe_sweeps() + ".",
    )
    groups = add_config_options(parser)
    add_run_options(groups[MEASUREMENT])
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; with --shape, that model's shape replaces the default shape options."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.shape:
        parser.set_defaults(**SHAPES[args.shape])
        args = parser.parse_args(argv)
    return args


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    names = {f.name for f in dataclasses.fields(BenchConfig)}
    return BenchConfig(**{k: v for k, v in vars(args).items() if k in names})
