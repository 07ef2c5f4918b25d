"""A trained model loaded for use, one way for the Python API and the command lines that answer questions:
the checkpoint found (a directory or a Hub id), the device, dtype and attention chosen, the model in
evaluation mode on that device with no gradients."""

from __future__ import annotations

import torch

from clara.model.checkpoint import load_model
from clara.model.hub import resolve_checkpoint
from clara.model.model import ClaraModel, attention_implementation
from clara.parallel.distributed import default_device, resolve_dtype


def load_for_use(
    path: str,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    base_model: str | None = None,
    subfolder: str | None = None,
    flash_attn: str = "auto",
) -> tuple[ClaraModel, torch.device, str]:
    """The model of checkpoint `path`, the device it is on and the checkpoint's local directory.

    device None: CUDA when available, else CPU. dtype None: bfloat16 on CUDA, float32 on CPU.
    attn_implementation None: as `flash_attn` says (--flash_attn: auto, FlashAttention-2 on CUDA when installed,
    else SDPA; true; false).
    base_model replaces the base model the checkpoint names (e.g. a local copy).
    """
    target = torch.device(device) if device is not None else default_device()
    if attn_implementation is None:
        attn_implementation = attention_implementation(flash_attn, target.type == "cuda")
    path = resolve_checkpoint(path, subfolder)
    model = load_model(path, resolve_dtype(dtype, target), attn_implementation, base_model=base_model)
    model = model.to(target).eval()
    model.requires_grad_(False)
    return model, target, path
