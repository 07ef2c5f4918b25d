"""`python -m clara.train` arguments -> TrainConfig. Every TrainConfig field is a flag of the same name,
with the help text written beside the field; the launchers' environment variables are the same names in
upper case (clara.training.launch)."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from clara.config import STAGES, TrainConfig


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def value_type(field: dataclasses.Field) -> type:
    """The type a setting's text converts to: the annotation without its `| None`."""
    hint = typing.get_type_hints(TrainConfig)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def parse_value(field: dataclasses.Field, text: str):
    """A setting's text -> its value; ValueError / ArgumentTypeError when it is not one."""
    kind = value_type(field)
    return parse_bool(text) if kind is bool else kind(text.strip())


def build_parser(prog: str = "python -m clara.train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train a CLaRa model (one stage).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for field in dataclasses.fields(TrainConfig):
        kind = value_type(field)
        parser.add_argument(
            f"--{field.name}",
            type=parse_bool if kind is bool else kind,
            default=field.default,
            metavar=kind.__name__.upper(),
            help=field.metadata["help"],
            choices=STAGES if field.name == "stage" else None,
        )
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    return TrainConfig(**vars(args))


def positive_int(text: str) -> int:
    """argparse type of the command lines' counts (--batch_size, --max_new_tokens, ...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


# The model flags of every command line that loads a model, declared once (python -m clara.train has the same
# two settings from TrainConfig). A bad --dtype is refused where it is resolved (clara.parallel.distributed).
DTYPE_HELP = (
    "dtype the model runs in: auto (default): bf16 on a GPU that supports it, fp16 on older GPUs, fp32 on the CPU; "
    "bf16, fp16, fp32 (or bfloat16, float16, float32)"
)
FLASH_ATTN_HELP = "auto (default): FlashAttention-2 when installed and on CUDA, else SDPA; true; false"


def add_model_flags(parser: argparse.ArgumentParser, note: str = "") -> None:
    """--dtype and --flash_attn, with one meaning and one help text in every command line that loads a model
    (clara.model.load.choose_runtime reads them). note: what comes before each help text ("hf: " where only one
    kind of model reads them)."""
    parser.add_argument("--dtype", default="auto", help=note + DTYPE_HELP)
    parser.add_argument("--flash_attn", default="auto", choices=("auto", "true", "false"), help=note + FLASH_ATTN_HELP)
