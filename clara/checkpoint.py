"""Build models, save them, and load both the native and the official release layouts (spec section 4).

Native layout of a model directory:
  config.json                      format, base model, memory/compression settings, LoRA settings, adapters
  adapters.safetensors             "<adapter>.<peft key>" -> LoRA weights of every adapter
  special_tokens.safetensors       embedding rows (and untied LM-head rows) of every added token
  tokenizer files, training_args.json
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from clara.model import ClaraModel, ModelSettings, attach_adapters
from clara.prompts import add_special_tokens, added_token_strings
from clara.tiny import TINY_MODEL_NAME, TINY_VERSION, clara_home, tiny_model_dir

FORMAT_NAME = "clara"
FORMAT_VERSION = 1
OFFICIAL_FILES = ("adapters.pth", "decoder_first_last_layers.pth")


class CheckpointError(ValueError):
    """A directory is not a usable checkpoint; the message says which file or setting is wrong."""


def resolve_base_path(model_path: str) -> str:
    return tiny_model_dir() if model_path == TINY_MODEL_NAME else model_path


def build_model(settings: ModelSettings, adapters: list[str], dtype: torch.dtype = torch.float32,
                attn_implementation: str = "sdpa", tokenizer_dir: str | None = None) -> ClaraModel:
    """The base model with the CLaRa tokens added and fresh LoRA adapters of the given names."""
    base_path = resolve_base_path(settings.base_model)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or base_path)
    tokens = add_special_tokens(tokenizer, settings.n_mem_tokens)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, attn_implementation=attn_implementation)
    if base.get_input_embeddings().weight.shape[0] < len(tokenizer):
        base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    init_added_rows(base, tokenizer.convert_tokens_to_ids(added_token_strings(settings.n_mem_tokens)))
    base.config.use_cache = False
    peft_model = attach_adapters(base, adapters, settings)
    return ClaraModel(peft_model, tokenizer, tokens, settings)


@torch.no_grad()
def init_added_rows(base, ids: list[int]) -> None:
    """Start the added tokens' rows at the scale of the real ones: the per-dimension mean and spread.

    Rows drawn at the initializer's small scale (std 0.02) leave the memory tokens nearly silent
    next to real tokens, and the compressed states of every document then look alike.
    """
    matrices = [base.get_input_embeddings().weight]
    head = base.get_output_embeddings().weight
    if head.data_ptr() != matrices[0].data_ptr():
        matrices.append(head)
    for matrix in matrices:
        old = matrix[: min(ids)].float()
        rows = old.mean(0) + old.std(0) * torch.randn(len(ids), matrix.shape[1], device=matrix.device)
        matrix[ids] = rows.to(matrix.dtype)


def added_token_rows(model: ClaraModel) -> dict[str, torch.Tensor]:
    """Embedding (and untied LM-head) rows of every added token, memory rows from their own parameter."""
    ids = model.tokenizer.convert_tokens_to_ids(added_token_strings(model.tokens.n_mem))
    embed = model.causal_lm.get_input_embeddings().weight[ids].detach().clone().float()
    embed[: model.tokens.n_mem] = model.mem_embeddings.detach().float()
    rows = {"embed_tokens": embed}
    head = model.causal_lm.get_output_embeddings().weight
    if head.data_ptr() != model.causal_lm.get_input_embeddings().weight.data_ptr():
        rows["lm_head"] = head[ids].detach().clone().float()
    return rows


@torch.no_grad()
def set_added_token_rows(model: ClaraModel, rows: dict[str, torch.Tensor]) -> None:
    ids = torch.tensor(model.tokenizer.convert_tokens_to_ids(added_token_strings(model.tokens.n_mem)))
    embedding = model.causal_lm.get_input_embeddings().weight
    embedding[ids] = rows["embed_tokens"].to(embedding)
    if "lm_head" in rows:
        head = model.causal_lm.get_output_embeddings().weight
        head[ids] = rows["lm_head"].to(head)
    model.mem_embeddings.copy_(rows["embed_tokens"][: model.tokens.n_mem])


def fsync_path(path: str) -> None:
    """Flush a file's or a directory's contents to the disk, so that a rename publishing it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _durable_replace(tmp: str, path: str) -> None:
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


def _atomic_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        json.dump(obj, out, indent=2)
    _durable_replace(tmp, path)


def _atomic_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    tmp = path + ".tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    _durable_replace(tmp, path)


def save_model(model: ClaraModel, out_dir: str, stage: str) -> None:
    """Export in the native layout. Each file is replaced atomically."""
    os.makedirs(out_dir, exist_ok=True)
    adapters = {}
    for name in model.adapter_names:
        state = get_peft_model_state_dict(model.peft_model, adapter_name=name, save_embedding_layers=False)
        adapters.update({f"{name}.{key}": value for key, value in state.items()})
    _atomic_safetensors(os.path.join(out_dir, "adapters.safetensors"), adapters)
    _atomic_safetensors(os.path.join(out_dir, "special_tokens.safetensors"), added_token_rows(model))
    model.tokenizer.save_pretrained(out_dir)
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "stage": stage,
        "adapters": model.adapter_names,
        "special_tokens": added_token_strings(model.tokens.n_mem),
        **dataclasses.asdict(model.settings),
    }
    if model.settings.base_model == TINY_MODEL_NAME:
        config["tiny_version"] = TINY_VERSION
    _atomic_json(os.path.join(out_dir, "config.json"), config)


def tiny_base_for(version: str | None, path: str) -> str:
    """The base of a checkpoint trained on the built-in tiny model: the cached build it was trained
    on when that differs from the one this code builds (another recipe gives other weights)."""
    if version is None or version == TINY_VERSION:
        return TINY_MODEL_NAME
    cached = clara_home() / version
    if cached.is_dir():
        return str(cached)
    raise CheckpointError(
        f"{path}: trained on the built-in tiny model {version}, but this version of clara builds "
        f"{TINY_VERSION} (a different recipe, so different weights) and {cached} does not exist; "
        "retrain the checkpoint")


def read_config(path: str) -> dict:
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{path}: not a checkpoint (no config.json)")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    if config.get("format") != FORMAT_NAME and "decoder_model_name" not in config:
        raise CheckpointError(f"{config_path}: neither a native CLaRa checkpoint (format: clara) nor the "
                              "official release layout (decoder_model_name)")
    return config


def checkpoint_stage(path: str) -> str | None:
    config = read_config(path)
    return config.get("stage")


def load_model(path: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
               base_model: str | None = None) -> ClaraModel:
    """Load a native or official-release checkpoint directory. base_model overrides the recorded base."""
    config = read_config(path)
    if "decoder_model_name" in config:
        return _load_official(path, config, dtype, attn_implementation, base_model)
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {config['format_version']} is newer than this "
                              f"toolkit reads ({FORMAT_VERSION}); update clara")
    fields = {f.name for f in dataclasses.fields(ModelSettings)}
    settings = ModelSettings(**{k: v for k, v in config.items() if k in fields})
    if base_model:
        settings.base_model = base_model
    elif settings.base_model == TINY_MODEL_NAME:
        settings.base_model = tiny_base_for(config.get("tiny_version"), path)
    model = build_model(settings, config["adapters"], dtype, attn_implementation, tokenizer_dir=path)
    adapters = load_file(os.path.join(path, "adapters.safetensors"))
    for name in config["adapters"]:
        prefix = name + "."
        state = {k[len(prefix):]: v for k, v in adapters.items() if k.startswith(prefix)}
        load_adapter_state(model, name, state, os.path.join(path, "adapters.safetensors"))
    set_added_token_rows(model, load_file(os.path.join(path, "special_tokens.safetensors")))
    return model


PEFT_PREFIX = "base_model.model."


def load_adapter_state(model: ClaraModel, name: str, state: dict[str, torch.Tensor], source: str) -> None:
    """Load one adapter's LoRA weights, refusing a state dict that does not fit instead of loading nothing.

    Keys are relative to the PeftModel (peft's get_peft_model_state_dict) or, as in the official
    release (saved through transformers' get_adapter_state_dict), to the bare transformers model.
    """
    state = {key if key.startswith(PEFT_PREFIX) else PEFT_PREFIX + key: value for key, value in state.items()}
    result = set_peft_model_state_dict(model.peft_model, state, adapter_name=name)
    missing = [key for key in result.missing_keys if f".{name}." in key]
    if result.unexpected_keys or missing or not state:
        problem = (f"unexpected keys such as {result.unexpected_keys[0]!r}" if result.unexpected_keys
                   else f"no weights for {missing[0]!r}" if missing else "no weights at all")
        raise CheckpointError(f"{source}: adapter '{name}' does not fit the model ({problem}); "
                              "was it trained with another base model or LoRA setting?")


def _load_official(path: str, config: dict, dtype: torch.dtype, attn_implementation: str,
                   base_model: str | None) -> ClaraModel:
    for name in OFFICIAL_FILES:
        if not os.path.isfile(os.path.join(path, name)):
            raise CheckpointError(f"{path}: official-layout checkpoint without {name}")
    rate, doc_len = int(config["compr_rate"]), int(config["doc_max_length"])
    settings = ModelSettings(base_model=base_model or config["decoder_model_name"], n_mem_tokens=doc_len // rate,
                             compress_rate=rate, doc_max_length=doc_len,
                             generation_top_k=int(config.get("generation_top_k", 5)),
                             lora_r=int(config.get("lora_r", 16)),
                             # The release trained with alpha = 2 r and does not record alpha.
                             lora_alpha=int(config.get("lora_alpha", 2 * int(config.get("lora_r", 16)))))
    adapters = torch.load(os.path.join(path, "adapters.pth"), map_location="cpu", weights_only=True)
    model = build_model(settings, list(adapters), dtype, attn_implementation)
    for name, state in adapters.items():
        load_adapter_state(model, name, state, os.path.join(path, "adapters.pth"))
    layers = torch.load(os.path.join(path, "decoder_first_last_layers.pth"), map_location="cpu", weights_only=True)
    _copy_full_matrix(model, layers, "embed_tokens.weight", model.causal_lm.get_input_embeddings().weight, path)
    head = model.causal_lm.get_output_embeddings().weight
    # With tied embeddings the release's save (named_parameters) holds no separate lm_head entry.
    if head is not model.causal_lm.get_input_embeddings().weight or any(k.endswith("lm_head.weight") for k in layers):
        _copy_full_matrix(model, layers, "lm_head.weight", head, path)
    with torch.no_grad():
        model.mem_embeddings.copy_(model.causal_lm.get_input_embeddings().weight[list(model.tokens.mem_ids)])
    return model


@torch.no_grad()
def _copy_full_matrix(model: ClaraModel, layers: dict, suffix: str, target: torch.Tensor, path: str) -> None:
    matches = [value for key, value in layers.items() if key.endswith(suffix)]
    if not matches:
        raise CheckpointError(f"{path}/decoder_first_last_layers.pth: no '{suffix}' entry")
    if matches[0].shape != target.shape:
        raise CheckpointError(f"{path}/decoder_first_last_layers.pth: '{suffix}' has shape "
                              f"{tuple(matches[0].shape)}, the model expects {tuple(target.shape)}")
    target.copy_(matches[0].to(target))
