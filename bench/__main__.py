"""python -m bench: measure CLaRa training steps, one configuration or a sweep, each in its own process."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.cli import config_from_args, parse_args
from bench.config import BenchConfig
from bench.machine import machine_info, wait_for_load
from bench.report import describe, format_table
from bench.sweeps import sweep_configs
from clara.ports import free_port

REPO = Path(__file__).resolve().parent.parent

# glibc keeps freed blocks of up to 32 MiB inside the process (its mmap threshold grows with use), so
# the resident set size would stay at an earlier step's high-water mark. A fixed threshold makes every
# block of 128 KiB or more its own mapping, returned to the system when freed, so RSS follows the
# memory in use and the peak of each stretch is exact. Other allocators ignore these variables.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024), "MALLOC_TRIM_THRESHOLD_": str(128 * 1024)}


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
    results = [measure_row(cfg, f"[{i}/{len(configs)}]", args) for i, cfg in enumerate(configs, 1)]
    report = {
        "bench_version": 1,
        "command": ["python", "-m", "bench"] + (list(argv) if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "load_average_start": list(started_load) if started_load else None,
        "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "results": results,
    }
    print_report(base, report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(report, out, indent=2)
        print(f"wrote {args.json}")
    return 1 if any("error" in r for r in results) else 0


def measure_row(cfg: BenchConfig, count: str, args) -> dict:
    """One configuration, after waiting for the load the options ask for; progress goes to stderr."""
    what = f"{cfg.stage} {cfg.label}".strip() if args.sweep else cfg.stage
    load = wait_for_load(args.max_load, args.timeout)
    if load is not None and load > (args.max_load or 0.75 * (os.cpu_count() or 1)):
        print(
            f"warning: 1-minute load average {load:.2f} on {os.cpu_count()} CPUs: other processes compete "
            "for the cores, so step times will be slower and noisier than on an idle machine",
            file=sys.stderr,
        )
    print(f"{count} {cfg.group}: {what} ...", end=" ", file=sys.stderr, flush=True)
    result = run_config(cfg, args.timeout, args.exact_memory)
    result["load_average_before"] = load
    if "error" in result:
        print(f"FAILED after {result['wall_s']:.0f} s\n{result['error_detail']}", file=sys.stderr)
    else:
        print(
            f"{result['step_time_s']:.3f} s/step, peak {result['peak_memory_mb']:.0f} MB ({result['wall_s']:.0f} s)",
            file=sys.stderr,
        )
    return result


def print_report(base: BenchConfig, report: dict) -> None:
    print(describe(base))
    print(format_table(report["results"]))
    machine = report["machine"]
    loads = [
        f"{label} {values[0]:.2f}"
        for label, values in (("start", report["load_average_start"]), ("end", report["load_average_end"]))
        if values
    ]
    print(
        f"machine: {machine['cpu_model']}, {machine['cpu_count']} CPUs; torch {machine['torch']}; "
        f"1-minute load average: {', '.join(loads) or 'unknown'}"
    )


if __name__ == "__main__":
    sys.exit(main())
