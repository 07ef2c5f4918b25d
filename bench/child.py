"""Measure one configuration in this process: `python -m bench.child --config JSON --out FILE`.

`python -m bench` starts one such process per configuration, so that peak memory belongs to that
configuration alone. The steps run through the trainer's own code: a random-weight Qwen3 base saved
with the tiny model's tokenizer, set up by clara.training.setup.setup_training (the stage model, its
Collator, AdamW and deepspeed.initialize, as a training run has them) and stepped by
clara.training.step.optimizer_step.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

from bench.config import BenchConfig
from bench.flops import ModelShape, peak_flops, step_flops
from bench.machine import cpu_model
from bench.peak_memory import PeakMemory
from bench.profile import profile_step
from bench.random_base import model_shape, write_random_base, write_tokenizer
from bench.synthetic import SyntheticRecords

MB = 2**20


def gather_numbers(value: int, world: int) -> list[int]:
    """Every rank's value, in rank order, on every rank."""
    if world == 1:
        return [value]
    import torch.distributed as dist

    values = [None] * world
    dist.all_gather_object(values, value)
    return values


def quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)


def train_config(cfg: BenchConfig, base_dir: str, work_dir: str, world: int, gradient_checkpointing: bool):
    """The TrainConfig of the measured steps: the row's settings on the random base, one micro-batch per step.
    The loss weights BenchConfig declares are the row's; the others keep the trainer's defaults."""
    import dataclasses

    from clara.config import TrainConfig
    from clara.model.losses import WEIGHT_SETTINGS

    weights = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name in WEIGHT_SETTINGS}
    return TrainConfig(
        stage=cfg.stage,
        model_path=base_dir,
        allow_no_checkpoint=True,
        save_path=os.path.join(work_dir, "out"),
        doc_max_length=cfg.doc_max_length,
        compress_rate=cfg.compress_rate,
        generation_top_k=cfg.top_k,
        learning_rate=1e-4,
        batch_size=cfg.micro_batch_size * world,
        micro_batch_size=cfg.micro_batch_size,
        max_steps=cfg.warmup_steps + cfg.steps + int(cfg.profile),
        max_len=1 << 20,
        debug_mode=False,
        seed=cfg.seed,
        zero_stage=cfg.zero_stage,
        gradient_checkpointing=gradient_checkpointing,
        flash_attn=cfg.flash_attn,
        lora_r=cfg.lora_r,
        lora_alpha=2 * cfg.lora_r,
        candidate_chunk_size=cfg.candidate_chunk_size,
        **weights,
    )


def write_base(cfg: BenchConfig, base_dir: str, rank: int, world: int, dtype, device) -> None:
    """Rank 0 writes the random base and its tokenizer into the folder the ranks share; the others wait."""
    import torch

    from clara.stages.prompts import added_token_strings

    if rank == 0:
        tokenizer = write_tokenizer(base_dir, cfg.vocab_size, len(added_token_strings(cfg.n_mem_tokens)))
        write_random_base(cfg, base_dir, tokenizer, dtype, device)
    if world > 1:
        torch.distributed.barrier()


def watch_candidate_compression(model, memory: PeakMemory) -> dict:
    """Wrap the model's candidate compression in a nested memory window; its peak over its start lands in the
    returned dict's "peak_over_start". The real method runs unchanged."""
    compression = {"peak_over_start": 0}
    original = model.compress_candidates

    def measured_compress_candidates(ids, mask):
        at_start = memory.mark()
        try:
            return original(ids, mask)
        finally:
            compression["peak_over_start"] = max(compression["peak_over_start"], memory.window_peak() - at_start)

    model.compress_candidates = measured_compress_candidates
    return compression


@dataclass
class Run:
    """What the measurement holds between its parts."""

    cfg: BenchConfig
    setup: object  # clara.training.setup.TrainingSetup
    data: SyntheticRecords
    memory: PeakMemory
    shape: ModelShape
    device: object
    rank: int
    seed: int
    compression: dict = field(default_factory=lambda: {"peak_over_start": 0})

    def sync(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    def step(self, batch, step: int):
        from clara.training.step import optimizer_step, step_seed

        seeds = [step_seed(self.seed, step, 0, self.rank)]
        return optimizer_step(self.setup.engine, self.setup.optimizer, [batch], seeds, **self.setup.weights)


@dataclass
class Timed:
    """The timed steps' figures, one entry per step."""

    step_times: list = field(default_factory=list)
    collate_times: list = field(default_factory=list)
    tokens: list = field(default_factory=list)
    flops: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    base_memory: int = 0
    shapes: dict = field(default_factory=dict)


def timed_steps(run: Run) -> Timed:
    """The warm-up steps, then the timed ones: each collated and stepped as the trainer does."""
    cfg, timed = run.cfg, Timed()
    for step in range(cfg.warmup_steps + cfg.steps):
        if step == cfg.warmup_steps:
            gc.collect()
            run.sync()
            timed.base_memory = run.memory.start()
            run.compression["peak_over_start"] = 0
        records = run.data.records(cfg.micro_batch_size)
        t0 = time.perf_counter()
        batch = run.setup.collator(records).to(run.device)
        run.sync()
        t1 = time.perf_counter()
        result = run.step(batch, step)
        run.sync()
        t2 = time.perf_counter()
        if step < cfg.warmup_steps:
            continue
        timed.step_times.append(t2 - t1)
        timed.collate_times.append(t1 - t0)
        timed.tokens.append(batch.num_tokens)
        timed.losses.append(result.sums["lm_loss"] if not result.skipped else float("nan"))
        supervised = int((batch.labels[:, 1:] != -100).sum())
        query = batch.query_mask.sum(1).tolist() if batch.query_mask is not None else None
        lengths = batch.enc_mask.sum(1).tolist(), batch.dec_mask.sum(1).tolist()
        timed.flops.append(step_flops(run.shape, cfg.stage_spec, *lengths, supervised, query))
        timed.shapes = {
            "enc": list(batch.enc_ids.shape),
            "dec": list(batch.dec_ids.shape),
            "query": list(batch.query_ids.shape) if batch.query_ids is not None else None,
            "supervised": supervised,
        }
    run.sync()
    return timed


def profiled_step(run: Run) -> dict:
    """One more step under torch.profiler, after the timed ones."""
    extra = run.setup.collator(run.data.records(run.cfg.micro_batch_size)).to(run.device)

    def one_step() -> None:
        run.step(extra, run.cfg.warmup_steps + run.cfg.steps)
        run.sync()

    return profile_step(one_step, run.device.type == "cuda")


def measure(cfg: BenchConfig, work_dir: str) -> dict:
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    from clara.model.model import attention_implementation
    from clara.model.stage_model import build_stage_model
    from clara.parallel.distributed import init_distributed, resolve_dtype
    from clara.training.setup import model_settings, setup_training, training_settings

    quiet_libraries()
    started = time.perf_counter()
    rank, world, _, device = init_distributed()
    if world != cfg.processes:
        raise SystemExit(f"bench: {world} processes for --processes {cfg.processes}; run it through python -m bench")
    on_cuda = device.type == "cuda"
    dtype = resolve_dtype("auto", device)
    gradient_checkpointing = on_cuda if cfg.gradient_checkpointing is None else cfg.gradient_checkpointing
    base_dir = os.path.join(work_dir, "base")
    write_base(cfg, base_dir, rank, world, dtype, device)
    train_cfg = train_config(cfg, base_dir, work_dir, world, gradient_checkpointing)
    attn = attention_implementation(train_cfg.flash_attn, on_cuda)
    total_steps = cfg.warmup_steps + cfg.steps
    stage = cfg.stage_spec
    build_model = functools.partial(
        build_stage_model,
        model_settings(train_cfg),
        train_cfg.pretrain_checkpoint,
        stage,
        dtype,
        attn,
        log=lambda *a: None,
    )
    setup = setup_training(training_settings(train_cfg), build_model, stage, total_steps, world, device, dtype)
    memory = PeakMemory(device)
    run = Run(cfg, setup, None, memory, model_shape(setup.model), device, rank, train_cfg.seed)
    if stage.uses_query:
        run.compression = watch_candidate_compression(setup.model, memory)
    run.data = SyntheticRecords(cfg, setup.model.tokenizer)
    setup_s = time.perf_counter() - started
    timed = timed_steps(run)
    peak = memory.peak()
    memory.stop()
    peaks, bases = gather_numbers(peak, world), gather_numbers(timed.base_memory, world)
    resolved = {
        "dtype": str(dtype).replace("torch.", ""),
        "attn_implementation": attn,
        "gradient_checkpointing": bool(gradient_checkpointing),
    }
    profiled = profiled_step(run) if cfg.profile else None
    return {
        **result_row(run, timed, peaks, bases, resolved, profiled),
        "setup_s": setup_s,
        "load_average_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def result_row(run: Run, timed: Timed, peaks: list[int], bases: list[int], resolved: dict, profiled) -> dict:
    """The row's figures; `resolved`: the settings the run resolved (dtype, attention, checkpointing)."""
    import torch

    from clara.parallel.zero3 import full_numel

    cfg, device, on_cuda = run.cfg, run.device, run.device.type == "cuda"
    step_time = statistics.median(timed.step_times)
    step_tokens = statistics.median(timed.tokens)
    model_flops = statistics.median(f["total"] for f in timed.flops)
    device_name = torch.cuda.get_device_name(device) if on_cuda else cpu_model()
    peak_rate = (cfg.peak_tflops * 1e12 if cfg.peak_tflops else peak_flops(device_name)) if on_cuda else None
    achieved = model_flops / step_time
    top = peaks.index(max(peaks))
    return {
        "config": cfg.to_dict(),
        "group": cfg.group,
        "label": cfg.label,
        "stage": cfg.stage,
        "device": device.type,
        "device_name": device_name,
        **resolved,
        "threads": torch.get_num_threads(),
        "n_mem_tokens": cfg.n_mem_tokens,
        "docs_per_sample": cfg.docs_per_sample,
        "params_total": sum(full_numel(p) for p in run.setup.model.parameters()),
        "params_trainable": sum(full_numel(p) for p in run.setup.trainable),
        "vocab_size": run.shape.vocab,
        "steps_timed": len(timed.step_times),
        "step_time_s": step_time,
        "step_time_min_s": min(timed.step_times),
        "step_time_max_s": max(timed.step_times),
        "step_times_s": timed.step_times,
        "collate_time_s": statistics.median(timed.collate_times),
        "samples_per_s": cfg.micro_batch_size / step_time,
        "tokens_per_step": step_tokens,
        "tokens_per_s": step_tokens / step_time,
        "memory_kind": run.memory.kind,
        "peak_memory_mb": max(peaks) / MB,
        "base_memory_mb": bases[top] / MB,
        "step_memory_mb": (max(peaks) - bases[top]) / MB,
        "peak_memory_mb_per_rank": [p / MB for p in peaks],
        "base_memory_mb_per_rank": [b / MB for b in bases],
        "candidate_compression_memory_mb": (
            run.compression["peak_over_start"] / MB if cfg.stage_spec.uses_query else None
        ),
        "model_flops_per_step": model_flops,
        "model_flops_parts": {k: statistics.median(f[k] for f in timed.flops) for k in timed.flops[0]},
        "achieved_tflops": achieved / 1e12,
        "peak_tflops": peak_rate / 1e12 if peak_rate else None,
        "mfu": achieved / peak_rate if peak_rate else None,
        "batch_shapes": timed.shapes,
        "profile": profiled,
        "loss": timed.losses[-1],
        "losses_finite": all(math.isfinite(x) for x in timed.losses),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.child", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the BenchConfig as JSON")
    parser.add_argument("--out", required=True, help="where to write the result JSON (rank 0)")
    parser.add_argument(
        "--work_dir", default=None, help="directory for the random base, shared by the ranks (default: a temporary one)"
    )
    args = parser.parse_args(argv)
    cfg = BenchConfig.from_dict(json.loads(args.config))
    if args.work_dir:
        result = measure(cfg, args.work_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="clara-bench-") as work_dir:
            result = measure(cfg, work_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(args.out, "w", encoding="utf-8") as out:
            json.dump(result, out, indent=2)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
