"""The machine a measurement runs on: its CPU, library versions and load (waiting for a quieter moment)."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from importlib import metadata

# With --max_load, a configuration also waits for this share of idle CPU time over a few seconds.
MIN_IDLE = 0.75


def machine_info() -> dict:
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


def add_threads_and_json(parser: argparse.ArgumentParser, threads: int) -> argparse.ArgumentParser:
    """The index tools' last options: --threads (PyTorch's and FAISS's, default `threads`) and --json."""
    parser.add_argument("--threads", type=int, default=threads, help=f"PyTorch and FAISS threads (default {threads})")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    return parser


def parse_with_threads(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The arguments, PyTorch and FAISS set to --threads threads."""
    import faiss
    import torch

    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    return args
