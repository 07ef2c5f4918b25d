"""Processes and devices: the torchrun process group, this process's device, and the few collectives
the trainer and the evaluation share (rank-0-first loading, gathering rows, broadcasting a result)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from clara.errors import ConfigError, exit_status
from clara.ports import free_port

T = TypeVar("T")


def _die_with_parent() -> None:
    """Under torchrun, end this worker when its agent dies (e.g. kill -9 of the launcher), on Linux."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def local_device() -> tuple[int, torch.device]:
    """This process's local rank and device: its own GPU under torchrun, else the CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.cuda.is_available():
        return local_rank, torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return local_rank, torch.device("cuda", local_rank)


DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None or "auto": bf16 on a GPU that supports it, fp16 on older GPUs (V100, T4), fp32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise ConfigError("dtype", dtype, "auto, bf16, fp16 or fp32")
    return DTYPES[dtype]


def default_device() -> torch.device:
    """The current CUDA device when there is one, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def init_distributed() -> tuple[int, int, int, torch.device]:
    """Join the torchrun process group (or make a one-process one); returns rank, world size, local rank, device."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )
    else:
        _die_with_parent()
    local_rank, device = local_device()
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
    return dist.get_rank(), dist.get_world_size(), local_rank, device


def join_process_group() -> tuple[int, int, torch.device]:
    """Rank, world size and device for a tool started by torchrun / accelerate launch, or alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    _, device = local_device()
    if world == 1:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def run_command(body: Callable[[int, int, torch.device], object]) -> int:
    """Run a command line's `body(rank, world, device)` alone or under torchrun / accelerate launch.

    A user error is one line on stderr (from rank 0) and exit 2, a RunFailure one line and exit 1
    (clara.errors.exit_status); the process group is left cleanly.
    """
    rank, world, device = join_process_group()

    def call() -> None:
        body(rank, world, device)

    try:
        return exit_status(call, quiet=rank != 0)
    finally:
        leave_process_group()


def leave_process_group() -> None:
    """Destroy the process group, if any, while the process is still whole: left to the interpreter's
    teardown, its threads are stopped in no set order (a two-rank ZeRO-3 run once aborted after its export)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_zero_first(load: Callable[[], T], rank: int, world: int) -> T:
    """Run `load` on rank 0 first (it builds caches such as the Arrow files), then on the other ranks.

    An error on rank 0 is raised only after the other ranks were released, so that they meet the
    same error instead of waiting forever.
    """
    error = None
    result = None
    if rank == 0:
        try:
            result = load()
        except Exception as caught:  # re-raised below, after the barrier
            error = caught
    if world > 1:
        dist.barrier()
    if rank != 0:
        result = load()
    if error is not None:
        raise error
    return result


def gather_rows(rows: list[dict], rank: int, world: int) -> list[dict] | None:
    """All ranks' rows on rank 0, sorted by their "index"; None on the other ranks."""
    if world == 1:
        return sorted(rows, key=lambda r: r["index"])
    parts = [None] * world if rank == 0 else None
    dist.gather_object(rows, parts, dst=0)
    if rank != 0:
        return None
    return sorted((r for part in parts for r in part), key=lambda r: r["index"])


def broadcast(obj: T, rank: int, world: int) -> T:
    """Rank 0's object on every rank."""
    if world == 1:
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# -- ZeRO-3: parameters partitioned over the ranks ----------------------------------------------------------
def partitioned(params) -> bool:
    """Whether any of these parameters is partitioned by DeepSpeed ZeRO-3 (deepspeed.zero.Init or a stage-3
    engine): each rank then holds a shard, and reading the whole tensor needs every rank (see gathered)."""
    return any(hasattr(p, "ds_id") for p in params)


def gathered(params, modifier_rank: int | None = None):
    """A context in which ZeRO-3 partitioned `params` are whole on every rank; a no-op for plain parameters.

    Collective: every rank must enter it with the same parameters. With `modifier_rank`, what that rank
    writes into them is kept (and spread to the others) when the context ends.
    """
    params = list(params)
    if not partitioned(params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def local_shard(param: torch.Tensor) -> torch.Tensor:
    """What this rank holds of a parameter: its ZeRO-3 partition, or the whole tensor."""
    return param.ds_tensor if hasattr(param, "ds_tensor") and param.ds_tensor is not None else param


def in_lockstep(module: torch.nn.Module) -> bool:
    """Whether the ranks must run the same forwards of `module`: under ZeRO-3 each forward gathers its
    parameters from every rank, so a rank that runs one forward more than the others waits forever."""
    return dist.is_initialized() and dist.get_world_size() > 1 and partitioned(module.parameters())


def most_over_ranks(count: int, device: torch.device) -> int:
    """The largest `count` of any rank (collective)."""
    total = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.MAX)
    return int(total.item())
