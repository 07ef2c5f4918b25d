"""Measure one configuration in this process: `python -m bench.child --config JSON --out FILE`.

`python -m bench` starts one such process per configuration, so that peak memory belongs to that
configuration alone. The steps run through the trainer's own code: a random-weight Qwen3 base saved
with the tiny model's tokenizer, set up by clara.training.setup.setup_training (the stage model, its
Collator, AdamW and deepspeed.initialize, as a training run has them) and stepped by
clara.training.step.optimizer_step.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.config import BenchConfig
from bench.flops import ModelShape, peak_flops, step_flops

MB = 2**20
FILLER = "<|bench_filler_{}|>"


# -- memory ------------------------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory over a stretch of the run: CUDA allocations on a GPU, resident set size on a CPU.

    On Linux the kernel's resident high-water mark (VmHWM) is reset through /proc/self/clear_refs, so
    the peak is exact and covers only what follows the reset; elsewhere a thread samples the RSS.
    `mark()` starts a nested window (the stage-2 candidate compression) without losing the outer peak.
    """

    def __init__(self, device):
        self.device = device
        self.kind = "cuda_allocated" if device.type == "cuda" else "rss"
        self._outer = 0
        self._sampler = None
        self._sampled = 0
        self._use_proc = False
        if self.kind == "rss":
            try:
                with open("/proc/self/clear_refs", "w") as handle:
                    handle.write("5")
                self._use_proc = True
            except OSError:
                self._use_proc = False
        if self.kind == "rss" and not self._use_proc:
            self.kind = "rss_sampled"

    def current(self) -> int:
        import torch

        if self.kind == "cuda_allocated":
            return torch.cuda.memory_allocated(self.device)
        if self._use_proc:
            return self._status("VmRSS")
        import psutil

        return psutil.Process().memory_info().rss

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"/proc/self/status has no {field}")

    def _window_peak(self) -> int:
        import torch

        if self.kind == "cuda_allocated":
            return torch.cuda.max_memory_allocated(self.device)
        if self._use_proc:
            return self._status("VmHWM")
        return max(self._sampled, self.current())

    def _reset_window(self) -> None:
        import torch

        if self.kind == "cuda_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._use_proc:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        else:
            self._sampled = self.current()

    def _sample(self) -> None:
        while self._sampler is not None:
            self._sampled = max(self._sampled, self.current())
            time.sleep(0.001)

    def start(self) -> int:
        """Forget earlier peaks; returns the memory in use now."""
        self._outer = 0
        self._reset_window()
        if self.kind == "rss_sampled" and self._sampler is None:
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self.current()

    def mark(self) -> int:
        """Start a nested window: fold the peak so far into the outer peak; returns the memory in use now."""
        self._outer = max(self._outer, self._window_peak())
        self._reset_window()
        return self.current()

    def window_peak(self) -> int:
        return self._window_peak()

    def peak(self) -> int:
        return max(self._outer, self._window_peak())

    def stop(self) -> None:
        self._sampler = None


# -- model and tokenizer -----------------------------------------------------------------------------------
def write_tokenizer(out_dir: str, vocab_size: int, n_added: int):
    """The tiny model's tokenizer, its vocabulary padded with never-produced filler entries, so that the
    tokenizer plus CLaRa's added tokens fill exactly vocab_size rows (clara resizes the embedding matrix
    to the tokenizer's length; without the fillers the vocabulary asked for would shrink)."""
    from transformers import AutoTokenizer

    from clara.training.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    own = len(tokenizer)
    if vocab_size < own + n_added:
        raise SystemExit(
            f"--vocab_size={vocab_size}: expected at least {own + n_added} (the tiny tokenizer's "
            f"{own} tokens + {n_added} CLaRa tokens: the memory tokens, <AE>, <ENC>, <SEP>)"
        )
    tokenizer.save_pretrained(out_dir)
    path = Path(out_dir) / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    ids = set(vocab.values()) | {token["id"] for token in spec.get("added_tokens", [])}
    if ids != set(range(own)):
        raise SystemExit("bench: the tiny tokenizer's ids are not 0..len-1; cannot pad its vocabulary")
    for token_id in range(own, vocab_size - n_added):
        vocab[FILLER.format(token_id)] = token_id
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return AutoTokenizer.from_pretrained(out_dir)


def write_random_base(cfg: BenchConfig, out_dir: str, tokenizer, dtype, device) -> None:
    """A Qwen3 causal LM of the asked shape with random weights, saved next to the tokenizer."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim or cfg.hidden_size // cfg.num_heads,
        max_position_embeddings=40960,
        tie_word_embeddings=cfg.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        use_cache=False,
    )
    torch.manual_seed(cfg.seed)
    with torch.device(device):  # random init on the GPU is much faster for large shapes
        model = Qwen3ForCausalLM(config)
    model.to(dtype).save_pretrained(out_dir)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def gather_numbers(value: int, world: int) -> list[int]:
    """Every rank's value, in rank order, on every rank."""
    if world == 1:
        return [value]
    import torch.distributed as dist

    values = [None] * world
    dist.all_gather_object(values, value)
    return values


def model_shape(model) -> ModelShape:
    """N (base linear parameters) and R (one adapter's LoRA parameters) counted on the built model."""
    from torch import nn

    from clara.parallel.zero3 import full_numel, full_shape

    config = model.causal_lm.config
    linear = 0
    for name, module in model.backbone.named_modules():
        if isinstance(module, nn.Linear) and ".lora_" not in name:
            linear += module.in_features * module.out_features
    lora = sum(
        full_numel(p)
        for name, p in model.peft_model.named_parameters()
        if ".lora_A.decoder_adapter." in name or ".lora_B.decoder_adapter." in name
    )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ModelShape(
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        vocab=full_shape(model.causal_lm.get_output_embeddings().weight)[0],
        attention_width=config.num_attention_heads * head_dim,
        linear_params=linear,
        lora_params=lora,
    )


# -- synthetic data ----------------------------------------------------------------------------------------
class SyntheticRecords:
    """Records of the stage's input format with texts of the asked token lengths, from the example words."""

    def __init__(self, cfg: BenchConfig, tokenizer):
        from clara.training.tiny import EXAMPLE_DIR

        self.cfg = cfg
        self.stage = cfg.stage_spec
        self.tokenizer = tokenizer
        self.rng = random.Random(cfg.seed)
        words = set()
        for path in sorted(EXAMPLE_DIR.glob("*.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    for text in json.loads(line).get("docs", []):
                        words.update(text.split())
        self.words = sorted(words) or ["lorem", "ipsum", "dolor", "sit", "amet"]

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def text(self, tokens: int) -> str:
        """A text of at least `tokens` tokens (a document: more, and collate cuts it to DOC_MAX_LENGTH)."""
        words = []
        while True:
            words += [self.rng.choice(self.words) for _ in range(max(4, (tokens - self.count(" ".join(words))) // 2))]
            text = " ".join(words)
            if self.count(text) >= tokens:
                return text

    def short_text(self, tokens: int) -> str:
        """About `tokens` tokens: words are added until the count is reached."""
        words = []
        while not words or self.count(" ".join(words)) < tokens:
            words.append(self.rng.choice(self.words))
        return " ".join(words)

    def record(self) -> dict:
        from clara.data import normalise

        cfg, stage = self.cfg, self.stage
        docs = [self.text(cfg.doc_max_length + 3) for _ in range(cfg.docs_per_sample)]
        question, answer = self.short_text(cfg.question_tokens) + "?", self.short_text(cfg.answer_tokens)
        if stage.schema == "stage1":
            raw = {"data_type": "qa", "question": [question], "answers": [answer], "docs": docs}
        else:
            raw = {"question": question, "answer": answer, "docs": docs}
            if stage.uses_query:
                raw["pos_index"] = [0]
        return normalise(stage, raw, min_docs=stage.min_docs(cfg.top_k))

    def records(self, count: int) -> list[dict]:
        return [self.record() for _ in range(count)]


# -- the measurement ---------------------------------------------------------------------------------------
# Operator names by kind, for the profile: matrix multiplies, attention, collectives; the rest is
# elementwise work, norms, copies and the optimizer.
KINDS = (
    ("matmul", ("mm", "matmul", "linear", "addmm", "bmm", "baddbmm", "gemm")),
    ("attention", ("attention", "flash", "fmha", "sdpa")),
    ("communication", ("nccl", "c10d", "all_reduce", "allreduce", "all_gather", "reduce_scatter", "broadcast")),
)


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, words in KINDS:
        if any(word in lowered for word in words):
            return kind
    return "other"


def profile_step(run_step, on_cuda: bool) -> dict:
    """One step under torch.profiler: busy time by kind of operator (kernel time on a GPU, CPU time on a CPU)
    next to the step's wall time, whose remainder is time the GPU waited for the host."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        run_step()
        wall = time.perf_counter() - started
    by_op = {}
    for event in prof.key_averages():
        if event.device_type != DeviceType.CPU:
            continue  # kernels are counted through the operators that launched them
        micros = event.self_device_time_total if on_cuda else event.self_cpu_time_total
        if micros > 0:
            by_op[event.key] = by_op.get(event.key, 0.0) + micros / 1e6
    by_kind = {}
    for name, seconds in by_op.items():
        by_kind[kind_of(name)] = by_kind.get(kind_of(name), 0.0) + seconds
    busy = sum(by_op.values())
    top = sorted(by_op.items(), key=lambda item: -item[1])[:12]
    return {
        "clock": "cuda_kernels" if on_cuda else "cpu",
        "step_s": wall,
        "busy_s": busy,
        "waiting_s": max(0.0, wall - busy) if on_cuda else None,
        "by_kind_s": dict(sorted(by_kind.items(), key=lambda item: -item[1])),
        "top_operators_s": [[name, seconds] for name, seconds in top],
    }


def quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)


def measure(cfg: BenchConfig, work_dir: str) -> dict:
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    from clara.config import TrainConfig
    from clara.model.model import attention_implementation
    from clara.parallel.distributed import init_distributed, resolve_dtype
    from clara.parallel.zero3 import full_numel
    from clara.stages.prompts import added_token_strings
    from clara.training.setup import setup_training
    from clara.training.step import optimizer_step, step_seed

    quiet_libraries()
    started = time.perf_counter()
    rank, world, _, device = init_distributed()
    if world != cfg.processes:
        raise SystemExit(f"bench: {world} processes for --processes {cfg.processes}; run it through python -m bench")
    on_cuda = device.type == "cuda"
    dtype = resolve_dtype("auto", device)
    gradient_checkpointing = on_cuda if cfg.gradient_checkpointing is None else cfg.gradient_checkpointing

    base_dir = os.path.join(work_dir, "base")
    if rank == 0:  # the ranks share work_dir
        tokenizer = write_tokenizer(base_dir, cfg.vocab_size, len(added_token_strings(cfg.n_mem_tokens)))
        write_random_base(cfg, base_dir, tokenizer, dtype, device)
    if world > 1:
        torch.distributed.barrier()

    train_cfg = TrainConfig(
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
        mse_weight=cfg.mse_weight,
        lora_r=cfg.lora_r,
        lora_alpha=2 * cfg.lora_r,
        candidate_chunk_size=cfg.candidate_chunk_size,
    )
    attn = attention_implementation(train_cfg.flash_attn, on_cuda)

    total_steps = cfg.warmup_steps + cfg.steps
    stage = cfg.stage_spec
    setup = setup_training(train_cfg, total_steps, world, device, dtype, attn, log=lambda *args: None, stage=stage)
    model, collator, engine, optimizer = setup.model, setup.collator, setup.engine, setup.optimizer

    shape = model_shape(model)
    memory = PeakMemory(device)
    compression = {"peak_over_start": 0}
    uses_query = stage.uses_query
    if uses_query:
        original = model.compress_candidates

        def measured_compress_candidates(ids, mask):
            # Only watches: the real method runs unchanged; the nested window isolates its peak.
            at_start = memory.mark()
            try:
                return original(ids, mask)
            finally:
                compression["peak_over_start"] = max(compression["peak_over_start"], memory.window_peak() - at_start)

        model.compress_candidates = measured_compress_candidates

    data = SyntheticRecords(cfg, model.tokenizer)
    setup_s = time.perf_counter() - started

    def sync() -> None:
        if on_cuda:
            torch.cuda.synchronize(device)

    step_times, collate_times, tokens, flops, losses = [], [], [], [], []
    base_memory = None
    for step in range(total_steps):
        if step == cfg.warmup_steps:
            gc.collect()
            sync()
            base_memory = memory.start()
            compression["peak_over_start"] = 0
        records = data.records(cfg.micro_batch_size)
        t0 = time.perf_counter()
        batch = collator(records).to(device)
        sync()
        t1 = time.perf_counter()
        result = optimizer_step(engine, optimizer, [batch], [step_seed(train_cfg.seed, step, 0, rank)], **setup.weights)
        sync()
        t2 = time.perf_counter()
        if step < cfg.warmup_steps:
            continue
        step_times.append(t2 - t1)
        collate_times.append(t1 - t0)
        tokens.append(batch.num_tokens)
        losses.append(result.sums.lm_loss if not result.skipped else float("nan"))
        supervised = int((batch.labels[:, 1:] != -100).sum())
        query = batch.query_mask.sum(1).tolist() if batch.query_mask is not None else None
        flops.append(
            step_flops(shape, stage, batch.enc_mask.sum(1).tolist(), batch.dec_mask.sum(1).tolist(), supervised, query)
        )
    sync()
    peak = memory.peak()
    memory.stop()
    peaks = gather_numbers(peak, world)
    bases = gather_numbers(base_memory, world)
    shapes = {
        "enc": list(batch.enc_ids.shape),
        "dec": list(batch.dec_ids.shape),
        "query": list(batch.query_ids.shape) if batch.query_ids is not None else None,
        "supervised": supervised,
    }
    profiled = None
    if cfg.profile:
        extra = collator(data.records(cfg.micro_batch_size)).to(device)

        def run_step() -> None:
            optimizer_step(
                engine, optimizer, [extra], [step_seed(train_cfg.seed, total_steps, 0, rank)], **setup.weights
            )
            sync()

        profiled = profile_step(run_step, on_cuda)

    step_time = statistics.median(step_times)
    step_tokens = statistics.median(tokens)
    model_flops = statistics.median(f["total"] for f in flops)
    device_name = torch.cuda.get_device_name(device) if on_cuda else cpu_model()
    peak_rate = (cfg.peak_tflops * 1e12 if cfg.peak_tflops else peak_flops(device_name)) if on_cuda else None
    achieved = model_flops / step_time
    return {
        "config": cfg.to_dict(),
        "group": cfg.group,
        "label": cfg.label,
        "stage": cfg.stage,
        "device": device.type,
        "device_name": device_name,
        "dtype": str(dtype).replace("torch.", ""),
        "attn_implementation": attn,
        "gradient_checkpointing": bool(gradient_checkpointing),
        "threads": torch.get_num_threads(),
        "n_mem_tokens": cfg.n_mem_tokens,
        "docs_per_sample": cfg.docs_per_sample,
        "params_total": sum(full_numel(p) for p in model.parameters()),
        "params_trainable": sum(full_numel(p) for p in setup.trainable),
        "vocab_size": shape.vocab,
        "steps_timed": len(step_times),
        "step_time_s": step_time,
        "step_time_min_s": min(step_times),
        "step_time_max_s": max(step_times),
        "step_times_s": step_times,
        "collate_time_s": statistics.median(collate_times),
        "samples_per_s": cfg.micro_batch_size / step_time,
        "tokens_per_step": step_tokens,
        "tokens_per_s": step_tokens / step_time,
        "memory_kind": memory.kind,
        "peak_memory_mb": max(peaks) / MB,
        "base_memory_mb": bases[peaks.index(max(peaks))] / MB,
        "step_memory_mb": (max(peaks) - bases[peaks.index(max(peaks))]) / MB,
        "peak_memory_mb_per_rank": [p / MB for p in peaks],
        "base_memory_mb_per_rank": [b / MB for b in bases],
        "candidate_compression_memory_mb": compression["peak_over_start"] / MB if uses_query else None,
        "model_flops_per_step": model_flops,
        "model_flops_parts": {k: statistics.median(f[k] for f in flops) for k in flops[0]},
        "achieved_tflops": achieved / 1e12,
        "peak_tflops": peak_rate / 1e12 if peak_rate else None,
        "mfu": achieved / peak_rate if peak_rate else None,
        "batch_shapes": shapes,
        "profile": profiled,
        "loss": losses[-1],
        "losses_finite": all(math.isfinite(x) for x in losses),
        "setup_s": setup_s,
        "load_average_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


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
