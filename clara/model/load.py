"""A trained model loaded for use, one way for the Python API and every command line that loads one
(`--dtype` and `--flash_attn`, clara.cli.add_model_flags): the checkpoint found (a directory or a Hub id), the
device, dtype and attention chosen, the model in evaluation mode on that device with no gradients."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clara.model.checkpoint import load_model
from clara.model.hub import resolve_checkpoint
from clara.model.model import ClaraModel, attention_implementation
from clara.parallel.distributed import default_device, resolve_dtype


@dataclass(frozen=True)
class Runtime:
    """Where and how a model runs: its device, the dtype of its weights and the attention implementation."""

    device: torch.device
    dtype: torch.dtype
    attn: str


def choose_runtime(
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    flash_attn: str = "auto",
    attn_implementation: str | None = None,
) -> Runtime:
    """The runtime that --dtype and --flash_attn ask for on `device`; a bad value is a ConfigError naming the flag.

    device None: CUDA when available, else CPU. dtype None or "auto": bf16 on a GPU that supports it, fp16 on
    older GPUs, fp32 on the CPU. attn_implementation None: as `flash_attn` says (auto: FlashAttention-2 on CUDA
    when installed, else SDPA; true; false)."""
    target = torch.device(device) if device is not None else default_device()
    attn = attn_implementation or attention_implementation(flash_attn, target.type == "cuda")
    return Runtime(target, resolve_dtype(dtype, target), attn)


def load_for_use(
    path: str, runtime: Runtime, base_model: str | None = None, subfolder: str | None = None
) -> tuple[ClaraModel, str]:
    """The model of checkpoint `path` on the runtime's device, and the checkpoint's local directory.

    base_model replaces the base model the checkpoint names (e.g. a local copy)."""
    path = resolve_checkpoint(path, subfolder)
    model = load_model(path, runtime.dtype, runtime.attn, base_model=base_model)
    model = model.to(runtime.device).eval()
    model.requires_grad_(False)
    return model, path
