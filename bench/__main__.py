"""python -m bench: measure CLaRa training steps, one configuration or a sweep, each in its own process."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from bench.config import SHAPES, STAGES, BenchConfig
from clara.cli import parse_bool
from clara.ports import free_port

REPO = Path(__file__).resolve().parent.parent

# glibc keeps freed blocks of up to 32 MiB inside the process (its mmap threshold grows with use), so
# the resident set size would stay at an earlier step's high-water mark. A fixed threshold makes every
# block of 128 KiB or more its own mapping, returned to the system when freed, so RSS follows the
# memory in use and the peak of each stretch is exact. Other allocators ignore these variables.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024), "MALLOC_TRIM_THRESHOLD_": str(128 * 1024)}

# With --max_load, a configuration also waits for this share of idle CPU time over a few seconds.
MIN_IDLE = 0.75

# The scaling rows: (group, overrides of the base configuration for each row).
SWEEPS = {
    "candidates": [{"stage": "stage2", "candidates": n} for n in (5, 10, 20, 40)],
    # Chunked compression: its memory follows the chunk size, not the number of candidates.
    "chunk": [{"stage": "stage2", "candidates": n, "candidate_chunk_size": c} for n, c in ((20, 8), (40, 8), (40, 40))],
    "micro_batch": [{"micro_batch_size": m} for m in (1, 2, 4)],
    "compress_rate": [{"compress_rate": r} for r in (4, 16, 32, 128)],
    "docs": [{"docs": d} for d in (1, 2, 4, 8)],
    "doc_length": [{"doc_max_length": length} for length in (128, 256, 512)],
    "checkpointing": [{"gradient_checkpointing": on} for on in (False, True)],
    # ZeRO-3 partitions the base over the ranks: per-rank memory against ZeRO-2 (with --processes 2 or more).
    "zero": [{"zero_stage": z} for z in (2, 3)],
}


def describe_sweeps() -> str:
    """One line per group: `candidates (stage2): candidates 5 / 10 / 20 / 40`."""
    parts = []
    for name, rows in SWEEPS.items():
        keys = [k for k in rows[0] if k != "stage"]
        stage = " (stage2)" if all(row.get("stage") == "stage2" for row in rows) else ""
        values = " / ".join(",".join(str(row[k]) for k in keys) for row in rows)
        parts.append(f"{name}{stage}: {','.join(keys)} {values}")
    return "; ".join(parts)


def _auto_bool(text: str) -> bool | None:
    return None if text.strip().lower() == "auto" else parse_bool(text)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except where there is none to show."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    d = BenchConfig()
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        formatter_class=_Formatter,
        description="Measure what a CLaRa training step costs: median step time, samples/s, tokens/s, peak "
        "memory and, on a GPU, model FLOPs utilisation (MFU). The base model is a Qwen3 of the given "
        "shape with random weights and the built-in tiny model's tokenizer, loaded through clara's "
        "own build path; the steps run through the trainer's code (deepspeed.initialize with "
        "clara.training.setup.deepspeed_config, clara.training.step.optimizer_step on Batches from "
        "clara.model.collate.Collator) on synthetic records whose documents fill DOC_MAX_LENGTH tokens. "
        "Each configuration runs in its own process, so its peak memory is its own.",
        epilog="Peak memory: on CPU the process's peak resident set size over the timed steps (step MB: that "
        "peak minus the RSS before them, i.e. activations and other per-step memory; compr MB: the "
        "stage-2 candidate compression's part); on a GPU torch.cuda.max_memory_allocated. One step is "
        "one micro-batch (gradient accumulation 1) including the optimizer update. MFU counts a frozen "
        "base with LoRA: forward 2N per token, backward 2N (activation gradients) plus LoRA weight "
        "gradients; the stage-2 candidate compression is forward only; recomputation by gradient "
        "checkpointing is not counted. Sweep groups: " + describe_sweeps() + ".",
    )
    shape = parser.add_argument_group("model shape (random weights)")
    shape.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default=None,
        help="start from a real model's shape (the shape options given as well override it)",
    )
    shape.add_argument("--hidden_size", type=int, default=d.hidden_size, help="hidden size")
    shape.add_argument("--num_layers", type=int, default=d.num_layers, help="transformer layers")
    shape.add_argument("--num_heads", type=int, default=d.num_heads, help="attention heads")
    shape.add_argument(
        "--num_kv_heads", type=int, default=d.num_kv_heads, help="key/value heads (grouped-query attention)"
    )
    shape.add_argument("--intermediate_size", type=int, default=d.intermediate_size, help="MLP intermediate size")
    shape.add_argument(
        "--vocab_size",
        type=int,
        default=d.vocab_size,
        help="vocabulary rows of the embedding and LM head; at least the tiny tokenizer's size + "
        "DOC_MAX_LENGTH/COMPRESS_RATE + 3 (the tokenizer is padded with unused entries to fill it)",
    )
    shape.add_argument(
        "--head_dim", type=int, default=d.head_dim, help="attention head size (default: hidden_size / num_heads)"
    )
    shape.add_argument(
        "--tie_word_embeddings",
        type=parse_bool,
        default=d.tie_word_embeddings,
        metavar="BOOL",
        help="share the input embedding and the LM head (Qwen3 does up to 4B)",
    )
    train = parser.add_argument_group("training settings")
    train.add_argument("--stage", choices=STAGES, default=d.stage, help="training stage")
    train.add_argument(
        "--micro_batch_size", type=int, default=d.micro_batch_size, help="samples per step (MICRO_BATCH_SIZE)"
    )
    train.add_argument(
        "--doc_max_length",
        type=int,
        default=d.doc_max_length,
        help="document tokens (DOC_MAX_LENGTH); every synthetic document fills it",
    )
    train.add_argument(
        "--compress_rate",
        type=int,
        default=d.compress_rate,
        help="tokens per memory vector (COMPRESS_RATE); memory tokens per document = doc_max_length / compress_rate",
    )
    train.add_argument("--docs", type=int, default=d.docs, help="documents per sample (stage1, stage1_2)")
    train.add_argument("--candidates", type=int, default=d.candidates, help="candidate documents per question (stage2)")
    train.add_argument(
        "--top_k", type=int, default=d.top_k, help="documents the generator reads in stage2 (GENERATION_TOP_K)"
    )
    train.add_argument(
        "--candidate_chunk_size",
        type=int,
        default=d.candidate_chunk_size,
        help="stage-2 candidates compressed per no-grad chunk (bounds the compression's memory)",
    )
    train.add_argument(
        "--gradient_checkpointing",
        type=_auto_bool,
        default=None,
        metavar="{auto,true,false}",
        help="gradient checkpointing; auto: on with CUDA, off on CPU, as the trainer",
    )
    train.add_argument(
        "--zero_stage",
        type=int,
        choices=(0, 1, 2, 3),
        default=d.zero_stage,
        help="DeepSpeed ZeRO stage (3 partitions the base model over --processes ranks)",
    )
    train.add_argument(
        "--processes",
        type=int,
        default=d.processes,
        help="data-parallel ranks, started by torchrun (gloo on the CPU, one GPU each with CUDA); "
        "memory and step time are per rank, peak MB the largest rank's (all in the JSON)",
    )
    train.add_argument("--lora_r", type=int, default=d.lora_r, help="LoRA rank (alpha = 2 r)")
    train.add_argument("--mse_weight", type=float, default=d.mse_weight, help="MSE loss weight (stage1, stage1_2)")
    train.add_argument(
        "--question_tokens", type=int, default=d.question_tokens, help="about this many tokens per question"
    )
    train.add_argument("--answer_tokens", type=int, default=d.answer_tokens, help="about this many tokens per answer")
    train.add_argument(
        "--flash_attn",
        choices=("auto", "true", "false"),
        default=d.flash_attn,
        help="FlashAttention-2 on CUDA when installed (auto), else PyTorch SDPA",
    )
    run = parser.add_argument_group("measurement and output")
    run.add_argument("--warmup_steps", type=int, default=d.warmup_steps, help="untimed steps first")
    run.add_argument("--steps", type=int, default=d.steps, help="timed steps (the median is reported)")
    run.add_argument("--seed", type=int, default=d.seed, help="seed of the weights and the synthetic data")
    run.add_argument("--threads", type=int, default=d.threads, help="PyTorch CPU threads (default: PyTorch's choice)")
    run.add_argument(
        "--peak_tflops",
        type=float,
        default=d.peak_tflops,
        help="GPU peak (dense bf16 TFLOP/s) for MFU; default from a table: H100/H200/A100",
    )
    run.add_argument(
        "--sweep",
        nargs="?",
        const="all",
        default=None,
        metavar="GROUPS",
        help="run the scaling rows instead of one configuration: 'all' or a comma list of "
        + ", ".join(SWEEPS)
        + "; rows not named in a group keep the settings above "
        "(candidates and chunk rows are stage2; with --stage stage2 the docs rows run stage1_2)",
    )
    run.add_argument(
        "--profile",
        type=parse_bool,
        default=d.profile,
        metavar="BOOL",
        help="after the timed steps, one more under torch.profiler: kernel (CPU: operator) time by "
        "kind (matmul, attention, other) and the busiest operators, in the JSON",
    )
    run.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    run.add_argument(
        "--retrieval",
        action="store_true",
        help="measure answering from a compressed corpus instead (indexing, memory per document, "
        "search latency, answer time); its options: python -m bench --retrieval --help",
    )
    run.add_argument(
        "--index_choices",
        action="store_true",
        help="measure what each index storage and search choice costs in answers (EM, open-corpus recall@5, "
        "bytes per document) with a trained checkpoint; its options: python -m bench --index_choices --help",
    )
    run.add_argument(
        "--index_scale",
        action="store_true",
        help="measure the index on a synthetic corpus of N passages (build throughput, bytes per passage, "
        "p50/p99 search latency, recall@5 against exact); its options: python -m bench --index_scale --help",
    )
    run.add_argument(
        "--serve",
        action="store_true",
        help="measure python -m clara.serve instead (throughput and p50/p99 latency at 1, 8 and 32 "
        "concurrent clients, batched and one at a time); its options: python -m bench --serve --help",
    )
    run.add_argument(
        "--data",
        action="store_true",
        help="measure preparing the training data instead (records/s, launch to step 1 and to the end "
        "of step 2, empty and warm cache, one and two processes, peak memory); its options: "
        "python -m bench --data --help",
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


def sweep_configs(base: BenchConfig, groups: str) -> list[BenchConfig]:
    chosen = list(SWEEPS) if groups == "all" else [g.strip() for g in groups.split(",") if g.strip()]
    unknown = [g for g in chosen if g not in SWEEPS]
    if unknown:
        raise ValueError(
            f"--sweep={groups!r}: unknown group {unknown[0]!r}; expected 'all' or some of " + ", ".join(SWEEPS)
        )
    rows = []
    for group in chosen:
        for overrides in SWEEPS[group]:
            values = {**base.to_dict(), **overrides, "group": group}
            if group == "docs" and base.stage == "stage2":
                values["stage"] = "stage1_2"  # documents per sample is the stage-2 candidates row's job
            cfg = BenchConfig.from_dict(values)
            cfg.label = " ".join(f"{k}={v}" for k, v in overrides.items() if k != "stage")
            rows.append(cfg)
    return rows


def child_env(exact_memory: bool) -> dict:
    env = dict(os.environ)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # one process of its own, never part of an outer torchrun job
    if exact_memory:
        env.update(MALLOC_ENV)
    return env


def run_config(cfg: BenchConfig, timeout: float, exact_memory: bool) -> dict:
    """Measure one configuration in a fresh process; returns its result, or a row with the error."""
    with tempfile.TemporaryDirectory(prefix="clara-bench-run-") as tmp:
        out = os.path.join(tmp, "result.json")
        launcher = (
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                str(cfg.processes),
                "--master_port",
                str(free_port()),
            ]
            if cfg.processes > 1
            else [sys.executable]
        )
        command = [
            *launcher,
            "-m",
            "bench.child",
            "--config",
            json.dumps(cfg.to_dict()),
            "--out",
            out,
            "--work_dir",
            tmp,
        ]
        started = time.perf_counter()
        try:
            proc = subprocess.run(
                command, cwd=REPO, env=child_env(exact_memory), capture_output=True, text=True, timeout=timeout
            )
            failed = proc.returncode != 0 or not os.path.isfile(out)
            detail = (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired as expired:
            failed = True
            tail = "".join(
                part.decode(errors="replace") if isinstance(part, bytes) else part
                for part in (expired.stdout or "", expired.stderr or "")
            )
            detail = f"timed out after {timeout:.0f} s\n" + tail[-3000:]
        wall = time.perf_counter() - started
        if failed:
            return {
                "config": cfg.to_dict(),
                "group": cfg.group,
                "label": cfg.label,
                "stage": cfg.stage,
                "error": detail.strip().splitlines()[-1] if detail.strip() else "failed",
                "error_detail": detail,
                "wall_s": wall,
            }
        with open(out, encoding="utf-8") as handle:
            result = json.load(handle)
    result["wall_s"] = wall
    result["exact_memory"] = exact_memory
    return result


# -- output ------------------------------------------------------------------------------------------------
def machine_info() -> dict:
    from bench.child import cpu_model

    versions = {}
    for package in ("torch", "transformers", "peft", "deepspeed"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **versions,
    }


def _fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec)


COLUMNS = (  # header, width, how to read it from a result
    ("group", 13, lambda r: r["group"]),
    ("stage", 8, lambda r: r["stage"]),
    ("mb", 3, lambda r: str(r["config"]["micro_batch_size"])),
    ("docs", 4, lambda r: str(r["config"]["candidates"] if r["stage"] == "stage2" else r["config"]["docs"])),
    ("doc_len", 7, lambda r: str(r["config"]["doc_max_length"])),
    ("rate", 4, lambda r: str(r["config"]["compress_rate"])),
    ("mem", 3, lambda r: str(r["config"]["doc_max_length"] // r["config"]["compress_rate"])),
    ("chunk", 5, lambda r: str(r["config"]["candidate_chunk_size"]) if r["stage"] == "stage2" else "-"),
    ("gc", 3, lambda r: "on" if r.get("gradient_checkpointing") else "off"),
    ("zero", 4, lambda r: str(r["config"].get("zero_stage", 2))),
    ("ranks", 5, lambda r: str(r["config"].get("processes", 1))),
    ("step s", 7, lambda r: _fmt(r.get("step_time_s"), ".3f")),
    ("samples/s", 9, lambda r: _fmt(r.get("samples_per_s"), ".2f")),
    ("tokens/s", 8, lambda r: _fmt(r.get("tokens_per_s"), ".0f")),
    ("peak MB", 8, lambda r: _fmt(r.get("peak_memory_mb"), ".0f")),
    ("step MB", 7, lambda r: _fmt(r.get("step_memory_mb"), ".0f")),
    ("compr MB", 8, lambda r: _fmt(r.get("candidate_compression_memory_mb"), ".0f")),
    ("TFLOP/s", 7, lambda r: _fmt(r.get("achieved_tflops"), ".3f")),
    ("MFU", 6, lambda r: _fmt(100 * r["mfu"], ".1f") + "%" if r.get("mfu") is not None else "-"),
)


def format_table(results: list[dict]) -> str:
    lines = [" ".join(f"{h:>{w}}" if i > 1 else f"{h:<{w}}" for i, (h, w, _) in enumerate(COLUMNS))]
    lines.append("-" * len(lines[0]))
    for result in results:
        if "error" in result:
            cells = [
                f"{result['group']:<13}",
                f"{result['stage']:<8}",
                f"FAILED ({result['label'] or 'default'}): {result['error']}",
            ]
            lines.append(" ".join(cells))
            continue
        lines.append(
            " ".join(f"{get(result):>{w}}" if i > 1 else f"{get(result):<{w}}" for i, (_, w, get) in enumerate(COLUMNS))
        )
    return "\n".join(lines)


def describe(cfg: BenchConfig) -> str:
    head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_heads
    return (
        f"model: Qwen3 random weights, hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_heads} heads "
        f"({cfg.num_kv_heads} kv, head_dim {head_dim}), intermediate {cfg.intermediate_size}, vocab "
        f"{cfg.vocab_size}{', tied embeddings' if cfg.tie_word_embeddings else ''}; LoRA r {cfg.lora_r}; "
        f"{cfg.warmup_steps} warm-up + {cfg.steps} timed steps"
    )


def idle_share(seconds: float = 3.0) -> float | None:
    """The share of CPU time spent idle over the next few seconds (Linux), else None."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as handle:
            values = [int(v) for v in handle.readline().split()[1:9]]
        return values[3] + values[4], sum(values)  # idle + iowait, total

    try:
        idle_before, total_before = sample()
        time.sleep(seconds)
        idle_after, total_after = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (idle_after - idle_before) / max(1, total_after - total_before)


def wait_for_load(max_load: float | None, timeout: float) -> float | None:
    """The 1-minute load average, after waiting (when max_load is given, at most timeout seconds) until it
    is below max_load and the CPUs were at least MIN_IDLE idle over a few seconds: the load average
    trails by minutes, and a job that started a moment ago would still share the cores."""
    if not hasattr(os, "getloadavg"):
        return None
    if max_load is None:
        return os.getloadavg()[0]
    deadline = time.monotonic() + timeout
    told = False
    while True:
        load = os.getloadavg()[0]
        idle = idle_share() if load < max_load else None
        if (load < max_load and (idle is None or idle >= MIN_IDLE)) or time.monotonic() >= deadline:
            return load
        if not told:
            print(
                f"waiting for the 1-minute load average ({load:.2f}) to fall below {max_load} and the CPUs to "
                f"be {MIN_IDLE:.0%} idle ...",
                file=sys.stderr,
            )
            told = True
        time.sleep(5)


# Modes other than the step measurement: the flag, and the module with its own rows and options.
MODES = {
    "--retrieval": "bench.retrieval",
    "--serve": "bench.serve",
    "--data": "bench.data_prep",
    "--index_choices": "bench.index_choices",
    "--index_scale": "bench.index_scale",
}


def main(argv: list[str] | None = None) -> int:
    given = list(argv) if argv is not None else sys.argv[1:]
    mode = next((flag for flag in MODES if flag in given), None)
    if mode is not None:
        return importlib.import_module(MODES[mode]).main([a for a in given if a != mode])
    args = parse_args(argv)
    base = config_from_args(args)
    try:
        configs = sweep_configs(base, args.sweep) if args.sweep else [base]
    except ValueError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 2
    problems = sorted({p for cfg in configs for p in cfg.problems()})
    if problems:
        for problem in problems:
            print(f"bench: {problem}", file=sys.stderr)
        return 2
    print(describe(base), file=sys.stderr)
    started_load = os.getloadavg() if hasattr(os, "getloadavg") else None
    results = []
    for index, cfg in enumerate(configs, 1):
        what = f"{cfg.stage} {cfg.label}".strip() if args.sweep else cfg.stage
        load = wait_for_load(args.max_load, args.timeout)
        if load is not None and load > (args.max_load or 0.75 * (os.cpu_count() or 1)):
            print(
                f"warning: 1-minute load average {load:.2f} on {os.cpu_count()} CPUs: other processes compete "
                "for the cores, so step times will be slower and noisier than on an idle machine",
                file=sys.stderr,
            )
        print(f"[{index}/{len(configs)}] {cfg.group}: {what} ...", end=" ", file=sys.stderr, flush=True)
        result = run_config(cfg, args.timeout, args.exact_memory)
        result["load_average_before"] = load
        results.append(result)
        if "error" in result:
            print(f"FAILED after {result['wall_s']:.0f} s\n{result['error_detail']}", file=sys.stderr)
        else:
            print(
                f"{result['step_time_s']:.3f} s/step, peak {result['peak_memory_mb']:.0f} MB "
                f"({result['wall_s']:.0f} s)",
                file=sys.stderr,
            )
    report = {
        "bench_version": 1,
        "command": ["python", "-m", "bench"] + (list(argv) if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "load_average_start": list(started_load) if started_load else None,
        "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "results": results,
    }
    print(describe(base))
    print(format_table(results))
    machine = report["machine"]
    loads = [
        f"{label} {values[0]:.2f}"
        for label, values in (("start", started_load), ("end", report["load_average_end"]))
        if values
    ]
    print(
        f"machine: {machine['cpu_model']}, {machine['cpu_count']} CPUs; torch {machine['torch']}; "
        f"1-minute load average: {', '.join(loads) or 'unknown'}"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(report, out, indent=2)
        print(f"wrote {args.json}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
