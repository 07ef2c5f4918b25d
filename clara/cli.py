"""`python -m clara.train` arguments -> TrainConfig. Every TrainConfig field is a flag of the same name."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from clara.config import STAGES, TrainConfig

HELP = {
    "stage": "training stage: " + ", ".join(STAGES),
    "model_path": "base model: hub id, local directory, or 'tiny' for the built-in model "
                  "(default: tiny without CUDA, Qwen/Qwen3-14B with it)",
    "pretrain_checkpoint": "checkpoint of the previous stage (stage1_2 needs stage1's, stage2 needs stage1_2's)",
    "allow_no_checkpoint": "let stage1_2/stage2 start from the base model",
    "dataset": "training JSONL file(s), joined by commas (default: the stage's example file)",
    "eval_dataset": "held-out JSONL file(s) evaluated every --eval_steps and at the end",
    "save_path": "output directory (default: checkpoints/clara_<stage>)",
    "doc_max_length": "max document tokens",
    "compress_rate": "document tokens per memory vector; memory tokens = doc_max_length / compress_rate",
    "generation_top_k": "stage2: documents selected per question",
    "learning_rate": "peak learning rate (default 1e-4, stage2 5e-6; tiny model 2e-3, stage2 1e-3)",
    "batch_size": "global batch size: samples per optimizer step (default 4; tiny model: micro_batch_size x processes)",
    "micro_batch_size": "samples per process per forward (default 1; tiny model: 8)",
    "max_epochs": "epochs over the data",
    "max_steps": "stop after this many optimizer steps (default: the epochs decide)",
    "max_samples": "use at most this many training samples",
    "max_len": "max decoder tokens (default 2048, stage2 1024)",
    "debug_mode": "colour-coded per-token confidence print",
    "debug_every_steps": "debug print every N optimizer steps",
    "debug_max_print_tokens": "answer tokens shown per debug print",
    "logging_steps": "write metrics.jsonl every N optimizer steps",
    "eval_steps": "evaluate every N optimizer steps (with --eval_dataset)",
    "save_steps": "save a resumable checkpoint every N optimizer steps",
    "eval_max_samples": "samples generated from per evaluation (stage1_2/stage2)",
    "max_new_tokens": "max generated tokens per answer in evaluation",
    "seed": "random seed: same seed, data and world size give the same run",
    "zero_stage": "DeepSpeed ZeRO stage",
    "gradient_checkpointing": "recompute activations in backward (default: on with CUDA)",
    "flash_attn": "auto: FlashAttention-2 when installed and on CUDA, else SDPA; true; false",
    "mse_weight": "weight of the MSE alignment loss, 0 turns it off; stage1/stage1_2 (default 0.1; tiny model 0)",
    "max_ckpt_num": "resumable checkpoints kept",
    "resume": "auto: continue from the newest checkpoint in save_path; false: start over; or a checkpoint dir",
    "use_tensorboard": "log to save_path/tensorboard",
    "use_wandb": "log to Weights & Biases",
    "wandb_project": "W&B project",
    "bad_samples": "error: stop on bad records; skip: train on the good ones, write the rest to rejected.jsonl",
    "lora_r": "LoRA rank",
    "lora_alpha": "LoRA alpha",
    "lora_dropout": "LoRA dropout",
    "topk_temperature": "stage2: softmax temperature of the differentiable top-k",
    "candidate_chunk_size": "stage2: candidates compressed per no-grad chunk (bounds peak memory)",
    "warmup_ratio": "share of steps warming the learning rate up",
    "min_lr_ratio": "floor of the cosine schedule, as a share of the peak",
}


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _base_type(annotation) -> type:
    hint = typing.get_type_hints(TrainConfig)[annotation]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def build_parser(prog: str = "python -m clara.train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Train a CLaRa model (one stage).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for field in dataclasses.fields(TrainConfig):
        kind = _base_type(field.name)
        parse = parse_bool if kind is bool else kind
        parser.add_argument(f"--{field.name}", type=parse, default=field.default, metavar=kind.__name__.upper(),
                            help=HELP[field.name], choices=STAGES if field.name == "stage" else None)
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    return TrainConfig(**vars(args))
