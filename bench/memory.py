"""Peak GPU memory of a CLaRa training step, computed from the model shape (not measured).

`python -m bench.memory --model qwen3-14b --gpus 8` prints, per stage, the expected peak allocated
memory per GPU (what torch.cuda.max_memory_allocated reports) at the launchers' default settings, by
part, and what to change when it does not fit. The accounting, per GPU, in bf16 on CUDA:

- frozen base: 2 bytes per parameter, on every GPU (ZeRO 1 and 2 shard optimizer states and
  gradients, not parameters); with ZeRO 3 a 1/GPUs share of it (and of LoRA), plus what may be
  gathered at once: twice the largest of one layer and the embedding matrix, at most 1e9 parameters
  (clara.parallel.zero3.gathering_limits); with OFFLOAD=all the shares live in CPU memory and only the
  gathered part is on the GPU;
- OFFLOAD=optimizer (or all) keeps the fp32 master weights, Adam's moments and the fp32 gradient
  partition in CPU memory instead;
- LoRA: every adapter of the stage in bf16 (2 bytes per parameter); the trained ones (two roles) and
  the memory embeddings also have an fp32 master copy and Adam's two moments (12 bytes), sharded over
  the GPUs with ZeRO >= 1, and gradients (bf16 on every GPU, plus an fp32 partition);
- DeepSpeed's gradient-reduction bucket: reduce_bucket_size (5e8) elements allocated whatever the
  model's size, in bf16 with ZeRO 2 and fp32 with ZeRO 1;
- activations kept for backward, per token of each pass that needs gradients (the compressor's or query
  reasoner's documents, the generator's prompt): without gradient checkpointing every layer's saved
  tensors (see layer_activation_bytes); with it, each layer's input only, plus one layer's saved
  tensors while it is recomputed;
- the stage-2 candidates: compressed without gradient, candidate_chunk_size documents at a time, so
  one layer's transient tensors for one chunk;
- the vocabulary projection at the supervised positions only (README: "What a step costs"): bf16 logits, their fp32
  copy and the fp32 gradient of the cross-entropy.

Not included: the CUDA context (about 0.5 GiB outside torch's allocator) and the caching allocator's
fragmentation, so leave about 10% of the GPU free. The figures are checked against the 0.6B and 1.7B
shapes measured by scripts/gpu_check.sh (its report lists predicted next to measured peaks).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass

from bench.config import SHAPES
from bench.memory_parts import (
    Dims,
    dims_of,
    gathered_elements,
    layer_activation_bytes,
    nograd_layer_bytes,
    parameter_counts,
)
from clara.stages import STAGES, Stage

GiB = 2**30
# DeepSpeed's default ZeRO reduce_bucket_size, in elements: allocated in full at the first backward.
REDUCE_BUCKET_ELEMENTS = int(5e8)
OFFLOADS = ("none", "optimizer", "all")


@dataclass
class Workload:
    """What one micro-batch holds (per GPU)."""

    stage: Stage
    micro_batch_size: int = 1
    docs_per_sample: int = 1  # a stage with the query reasoner: candidates per question
    doc_max_length: int = 256
    compress_rate: int = 32
    top_k: int = 5  # with the query reasoner: documents the generator reads
    prompt_tokens: int = 96  # generator tokens besides the memory slots: template, question, answer
    supervised_tokens: int = 32  # generator positions with a target (the answer)
    question_tokens: int = 32  # the query reasoner's input besides its memory tokens
    candidate_chunk_size: int = 64

    @property
    def n_mem(self) -> int:
        return self.doc_max_length // self.compress_rate

    @property
    def doc_tokens(self) -> int:
        """One document as the compressor reads it: <ENC>, the text, BOS/EOS and the memory tokens."""
        return self.doc_max_length + self.n_mem + 3

    @property
    def decoder_tokens(self) -> int:
        slots = self.top_k if self.stage.uses_query else self.docs_per_sample
        return self.prompt_tokens + slots * self.n_mem


def default_micro_batch(gpus: int) -> int:
    """MICRO_BATCH_SIZE of train_single_gpu.sh (one GPU) and of train_8gpu.sh (more)."""
    return 1 if gpus == 1 else 2


def weight_parts(
    dims: Dims, work: Workload, gpus: int, zero_stage: int, offload: str, lora_r: int = 16
) -> dict[str, float]:
    """Bytes per GPU of the weights, the optimizer states, the gradients and the reduction bucket."""
    counts = parameter_counts(dims, lora_r)
    h = dims.hidden_size
    trained = len(work.stage.trained_adapters) * counts["lora_per_adapter"] + work.n_mem * h
    lora = 2.0 * len(work.stage.adapters) * counts["lora_per_adapter"] + 2.0 * work.n_mem * h
    shard = gpus if zero_stage >= 1 else 1
    on_gpu = offload == "none"  # the fp32 masters, moments and gradient partition; else in CPU memory
    parts = {
        "base_weights": 2.0 * counts["total"],
        "lora_weights": lora,
        "optimizer": 12.0 * trained / shard if on_gpu else 0.0,
        "gradients": 2.0 * trained + (4.0 * trained / (gpus if zero_stage >= 2 else 1) if on_gpu else 0.0),
        "reduce_bucket": {0: 0.0, 1: 4.0, 2: 2.0, 3: 2.0}[zero_stage] * REDUCE_BUCKET_ELEMENTS,
    }
    if zero_stage == 3:
        gathered = 2.0 * gathered_elements(dims, lora_r)
        share = 0.0 if offload == "all" else 1.0 / gpus
        parts["base_weights"] = 2.0 * counts["total"] * share + gathered
        parts["lora_weights"] = lora * share
        parts["gradients"] = 2.0 * trained / gpus + (4.0 * trained / gpus if on_gpu else 0.0)
    return parts


def step_memory(
    dims: Dims,
    work: Workload,
    gpus: int = 1,
    zero_stage: int = 2,
    gradient_checkpointing: bool = True,
    lora_r: int = 16,
    offload: str = "none",
) -> dict[str, float]:
    """Expected peak allocated bytes per GPU of one training micro-step, by part, with `peak` their sum."""
    h, layers = dims.hidden_size, dims.num_layers
    parts = weight_parts(dims, work, gpus, zero_stage, offload, lora_r)
    b = work.micro_batch_size
    if work.stage.uses_query:
        grad_passes = [b * (work.question_tokens + work.n_mem), b * work.decoder_tokens]
    else:
        grad_passes = [b * work.docs_per_sample * work.doc_tokens, b * work.decoder_tokens]
    # Under ZeRO-3 too: clara.parallel.zero3's linear keeps nothing behind a frozen weight, as PyTorch's does.
    per_layer = layer_activation_bytes(dims)
    # Each pass also keeps its embeddings, final norm and hidden states (about 10 bytes per hidden unit).
    edges = 10 * h * sum(grad_passes)
    if gradient_checkpointing:
        kept = 2 * h * layers * sum(grad_passes) + per_layer * max(grad_passes)
    else:
        kept = per_layer * layers * sum(grad_passes)
    # Backward's own working set: activation gradients of the widest pass (a few hidden-sized tensors).
    parts["activations"] = float(kept + edges + 8 * h * max(grad_passes))
    parts["lm_head"] = 10.0 * b * work.supervised_tokens * dims.vocab_size
    if work.stage.uses_query:
        chunk = min(work.candidate_chunk_size, b * work.docs_per_sample)
        compression = chunk * work.doc_tokens * (nograd_layer_bytes(dims) + 2 * h)
        # It runs after the query reasoner's forward, before the generator's: only that pass is kept then.
        query_kept = parts["activations"] * grad_passes[0] / sum(grad_passes)
        parts["candidate_compression"] = float(max(0.0, compression + query_kept - parts["activations"]))
    else:
        parts["candidate_compression"] = 0.0
    parts["peak"] = sum(parts.values())
    return parts


def default_workload(stage: Stage, gpus: int, **overrides) -> Workload:
    """The stage's typical sample (`Stage.typical_sample`) at the launcher's micro-batch, with `overrides`."""
    values = {**dataclasses.asdict(stage.typical_sample), "micro_batch_size": default_micro_batch(gpus), **overrides}
    return Workload(stage=stage, **values)


def fitting_change(
    dims: Dims,
    work: Workload,
    gpus: int,
    zero_stage: int,
    gradient_checkpointing: bool,
    budget: float,
    offload: str = "none",
) -> str:
    """The first of the usual changes (in the order to try them) that brings the peak under `budget` bytes."""
    tries = []  # (what to set, workload, ZeRO stage, gradient checkpointing, offload)
    if not gradient_checkpointing:
        tries.append(("GRADIENT_CHECKPOINTING=true", work, zero_stage, True, offload))
    small = dataclasses.replace(work, micro_batch_size=1)
    if work.micro_batch_size > 1:
        tries.append(("MICRO_BATCH_SIZE=1 (more gradient accumulation)", small, zero_stage, True, offload))
    if work.stage.uses_query:
        for chunk in (16, 4):
            if chunk < work.candidate_chunk_size:
                tries.append(
                    (
                        f"candidate_chunk_size={chunk}",
                        dataclasses.replace(small, candidate_chunk_size=chunk),
                        zero_stage,
                        True,
                        offload,
                    )
                )
    if zero_stage < 2 and gpus > 1:
        tries.append(("ZERO_STAGE=2", small, 2, True, offload))
    # Partitioning the base, then moving what is left to CPU memory: each costs step time.
    if zero_stage < 3 and gpus > 1:
        tries.append(("ZERO_STAGE=3", work, 3, gradient_checkpointing, offload))
    tries.append(("ZERO_STAGE=3 OFFLOAD=optimizer", work, 3, gradient_checkpointing, "optimizer"))
    tries.append(("ZERO_STAGE=3 OFFLOAD=all", work, 3, gradient_checkpointing, "all"))
    tries.append(("ZERO_STAGE=3 OFFLOAD=all MICRO_BATCH_SIZE=1", small, 3, True, "all"))
    for label, w, z, gc, off in tries:
        if step_memory(dims, w, gpus, z, gc, offload=off)["peak"] <= budget:
            return label
    return (
        "does not fit even with every change: with ZERO_STAGE=3 OFFLOAD=all a forward still gathers "
        f"{2 * gathered_elements(dims) / GiB:.1f} GiB of weights at a time on each GPU, besides the "
        "activations; use a larger GPU or a smaller model"
    )


MICRO_BATCH_SEARCH_LIMIT = 256


def largest_micro_batch(
    dims: Dims,
    work: Workload,
    gpus: int,
    zero_stage: int,
    gradient_checkpointing: bool,
    budget: float,
    limit: int = MICRO_BATCH_SEARCH_LIMIT,
    offload: str = "none",
) -> int:
    """The largest micro-batch (up to `limit`) whose peak stays under `budget` bytes; 0 if none does."""
    fitting = 0
    for size in range(1, limit + 1):
        if (
            step_memory(
                dims,
                dataclasses.replace(work, micro_batch_size=size),
                gpus,
                zero_stage,
                gradient_checkpointing,
                offload=offload,
            )["peak"]
            > budget
        ):
            break
        fitting = size
    return fitting


def plan_rows(
    model: str,
    gpus: int,
    gpu_gib: float = 80.0,
    zero_stage: int = 2,
    gradient_checkpointing: bool = True,
    offload: str = "none",
    **overrides,
) -> list[dict]:
    """One row per stage: the expected peak and whether it fits in 90% of the GPU (the rest: context, fragments)."""
    dims = dims_of(model)
    budget = 0.9 * gpu_gib * GiB
    rows = []
    for stage in STAGES.values():
        work = default_workload(stage, gpus, **overrides)
        parts = step_memory(dims, work, gpus, zero_stage, gradient_checkpointing, offload=offload)
        fits = parts["peak"] <= budget
        largest = {
            name: largest_micro_batch(dims, work, gpus, zero_stage, gc, budget, offload=offload)
            for name, gc in (("checkpointing", True), ("no_checkpointing", False))
        }
        rows.append(
            {
                "model": model,
                "gpus": gpus,
                "gpu_gib": gpu_gib,
                "stage": stage.name,
                "micro_batch_size": work.micro_batch_size,
                "zero_stage": zero_stage,
                "offload": offload,
                "gradient_checkpointing": gradient_checkpointing,
                "parts_gib": {k: v / GiB for k, v in parts.items()},
                "peak_gib": parts["peak"] / GiB,
                "fits": fits,
                "change": None
                if fits
                else fitting_change(dims, work, gpus, zero_stage, gradient_checkpointing, budget, offload),
                "largest_micro_batch": largest,
            }
        )
    return rows


PART_COLUMNS = (
    ("weights", ("base_weights", "lora_weights")),
    ("optim", ("optimizer", "gradients", "reduce_bucket")),
    ("activ", ("activations",)),
    ("logits", ("lm_head",)),
    ("cands", ("candidate_compression",)),
)


def _searched(size: int) -> str:
    return f"{size}+" if size == MICRO_BATCH_SEARCH_LIMIT else str(size)


def format_rows(rows: list[dict], gpu_gib: float = 80.0) -> str:
    lines = [
        "| model | GPUs | stage | micro-batch | "
        + " | ".join(name for name, _ in PART_COLUMNS)
        + f" | peak GiB/GPU | fits {gpu_gib:g} GiB | change if not | largest micro-batch (checkpointing on / off) "
        "| ZeRO, offload |",
        "|---" * (len(PART_COLUMNS) + 9) + "|",
    ]
    for row in rows:
        cells = [f"{sum(row['parts_gib'][k] for k in keys):.1f}" for _, keys in PART_COLUMNS]
        lines.append(
            f"| {row['model']} | {row['gpus']} | {row['stage']} | {row['micro_batch_size']} | "
            + " | ".join(cells)
            + f" | {row['peak_gib']:.1f} | {'yes' if row['fits'] else 'no'} | "
            f"{row['change'] or '-'} | {_searched(row['largest_micro_batch']['checkpointing'])} / "
            f"{_searched(row['largest_micro_batch']['no_checkpointing'])} | "
            f"{row['zero_stage']}, {row['offload']} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.memory",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        choices=sorted(SHAPES),
        action="append",
        help="base model shape (repeatable; default: mistral-7b and qwen3-14b)",
    )
    parser.add_argument(
        "--gpus",
        type=int,
        action="append",
        help="data-parallel GPUs, with the launcher's MICRO_BATCH_SIZE: 1 for one GPU, 2 for more "
        "(repeatable; default: 1 and 8)",
    )
    parser.add_argument("--gpu_gib", type=float, default=80.0, help="memory of one GPU")
    parser.add_argument("--zero_stage", type=int, choices=(0, 1, 2, 3), default=2, help="DeepSpeed ZeRO stage")
    parser.add_argument(
        "--offload",
        choices=OFFLOADS,
        default="none",
        help="OFFLOAD: optimizer states (optimizer) and also the parameters (all, ZeRO 3) in CPU memory",
    )
    parser.add_argument(
        "--gradient_checkpointing", choices=("true", "false"), default="true", help="gradient checkpointing"
    )
    parser.add_argument("--micro_batch_size", type=int, help="samples per GPU per forward (default: the launcher's)")
    parser.add_argument("--candidate_chunk_size", type=int, default=64, help="stage-2 candidates per no-grad chunk")
    parser.add_argument(
        "--docs_per_sample",
        type=int,
        help="documents per sample (with the query reasoner: candidates); default: each stage's typical sample",
    )
    parser.add_argument(
        "--prompt_tokens",
        type=int,
        help="generator tokens per sample besides the memory slots (at most MAX_LEN); default: each stage's "
        "typical sample",
    )
    parser.add_argument(
        "--supervised_tokens",
        type=int,
        help="generator tokens per sample with a target; default: each stage's typical sample",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {"candidate_chunk_size": args.candidate_chunk_size}
    for name in ("micro_batch_size", "docs_per_sample", "prompt_tokens", "supervised_tokens"):
        if getattr(args, name):
            overrides[name] = getattr(args, name)
    rows = [
        row
        for model in args.model or ["mistral-7b", "qwen3-14b"]
        for gpus in args.gpus or [1, 8]
        for row in plan_rows(
            model, gpus, args.gpu_gib, args.zero_stage, args.gradient_checkpointing == "true", args.offload, **overrides
        )
    ]
    print(format_rows(rows, args.gpu_gib))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(rows, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
