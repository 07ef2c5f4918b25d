"""One training step under torch.profiler: where its time goes, by kind of operator."""

from __future__ import annotations

import time

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
