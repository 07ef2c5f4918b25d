"""Build models, save them, and load both the native and the official release layouts (README: "Outputs,
checkpoints and resuming").

A checkpoint is a local directory or a Hugging Face Hub id (clara.model.hub.resolve_checkpoint).

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
from transformers import AutoModelForCausalLM

from clara.config import TINY_MODEL_NAME, official_base_name
from clara.data.fingerprint import base_model_key
from clara.errors import CheckpointError
from clara.files import atomic_path, publish_files, write_json_atomic
from clara.locks import reading_export
from clara.model.hub import hub_errors
from clara.model.model import ClaraModel, ModelSettings, attach_adapters
from clara.model.tiny_base import clara_home, shipped_versions, tiny_model_dir, tiny_version
from clara.model.tokenizer import load_tokenizer
from clara.parallel.distributed import gathered, partitioned
from clara.parallel.zero3 import full_shape, resize_embeddings, use_frozen_weight_linear
from clara.stages.prompts import add_special_tokens, added_token_strings

FORMAT_NAME = "clara"
FORMAT_VERSION = 1
OFFICIAL_FILES = ("adapters.pth", "decoder_first_last_layers.pth")


def resolve_base_path(model_path: str) -> str:
    return tiny_model_dir() if model_path == TINY_MODEL_NAME else model_path


def build_model(
    settings: ModelSettings,
    adapters: list[str],
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    tokenizer_dir: str | None = None,
    vocab_rows: int | None = None,
) -> ClaraModel:
    """The base model with the CLaRa tokens added and fresh LoRA adapters of the given names.

    vocab_rows: rows of the embedding matrix (the official code shrinks it to the tokenizer's length,
    Qwen's has spare rows); None keeps the base's, grown where the added tokens need it.
    Under transformers' ZeRO-3 integration (a live HfDeepSpeedConfig of stage 3) the base is loaded
    partitioned over the ranks, and every rank must call this.
    """
    base_path = resolve_base_path(settings.base_model)
    with hub_errors(f"base model {base_path}", base_path):
        tokenizer = load_tokenizer(tokenizer_dir or base_path)
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, attn_implementation=attn_implementation)
    if partitioned(base.parameters()):
        use_frozen_weight_linear()
    tokens = add_special_tokens(tokenizer, settings.n_mem_tokens)
    base_rows = full_shape(base.get_input_embeddings().weight)[0]
    rows = vocab_rows or max(base_rows, len(tokenizer))
    if rows < len(tokenizer):
        raise CheckpointError(
            f"an embedding matrix of {rows} rows cannot hold the {len(tokenizer)} tokens of "
            f"{base_path}'s tokenizer with the CLaRa tokens: another base model or number of "
            "memory tokens?"
        )
    if rows != base_rows:
        resize_embeddings(base, rows)
    init_added_rows(base, tokenizer.convert_tokens_to_ids(added_token_strings(settings.n_mem_tokens)))
    base.config.use_cache = False
    peft_model = attach_adapters(base, adapters, settings)
    return ClaraModel(peft_model, tokenizer, tokens, settings)


def embedding_matrices(model) -> list[torch.Tensor]:
    """The input embedding matrix, and the LM head's when it is not tied to it."""
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return [embedding] if head is embedding else [embedding, head]


@torch.no_grad()
def init_added_rows(base, ids: list[int]) -> None:
    """Start the added tokens' rows at the scale of the real ones: the per-dimension mean and spread.

    Rows drawn at the initializer's small scale (std 0.02) leave the memory tokens nearly silent
    next to real tokens, and the compressed states of every document then look alike. Rank 0's
    draw is kept on every rank (the same draw everywhere without ZeRO-3, where each rank makes it).
    """
    matrices = embedding_matrices(base)
    with gathered(matrices, modifier_rank=0):
        for matrix in matrices:
            old = matrix[: min(ids)].float()
            rows = old.mean(0) + old.std(0) * torch.randn(len(ids), matrix.shape[1], device=matrix.device)
            matrix[ids] = rows.to(matrix.dtype)


def added_token_rows(model: ClaraModel) -> dict[str, torch.Tensor]:
    """Embedding (and untied LM-head) rows of every added token, memory rows from their own parameter.

    Reads whole parameters: under ZeRO-3, inside `gathered(export_parameters(model))`."""
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
    matrices = embedding_matrices(model.causal_lm)
    with gathered(matrices, modifier_rank=0):
        matrices[0][ids] = rows["embed_tokens"].to(matrices[0])
        if "lm_head" in rows:  # an untied head: the second matrix
            matrices[-1][ids] = rows["lm_head"].to(matrices[-1])
    model.mem_embeddings.copy_(rows["embed_tokens"][: model.tokens.n_mem])


def export_parameters(model: ClaraModel) -> list[torch.Tensor]:
    """Every parameter the export reads: all adapters, the memory embeddings, the embedding matrices."""
    lora = [p for name, p in model.peft_model.named_parameters() if any(f".{a}." in name for a in model.adapter_names)]
    return lora + [model.mem_embeddings] + embedding_matrices(model.causal_lm)


def _save_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)


def save_model(model: ClaraModel, out_dir: str, stage: str) -> None:
    """Export in the native layout: written aside, then published in one step (clara.files.publish_files).

    Under ZeRO-3 every rank enters `gathered(export_parameters(model))` and one rank calls this inside it."""
    publish_files(out_dir, lambda aside: _write_native(model, aside, stage))


def _write_native(model: ClaraModel, out_dir: str, stage: str) -> None:
    adapters = {}
    for name in model.adapter_names:
        state = get_peft_model_state_dict(model.peft_model, adapter_name=name, save_embedding_layers=False)
        adapters.update({f"{name}.{key}": value for key, value in state.items()})
    _save_safetensors(os.path.join(out_dir, "adapters.safetensors"), adapters)
    _save_safetensors(os.path.join(out_dir, "special_tokens.safetensors"), added_token_rows(model))
    model.tokenizer.save_pretrained(out_dir)
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "stage": stage,
        "adapters": model.adapter_names,
        "special_tokens": added_token_strings(model.tokens.n_mem),
        **dataclasses.asdict(model.settings),
        # What a later stage's MODEL_PATH is checked against (clara.data.fingerprint.check_base_model).
        "base_model_key": base_model_key(model.settings.base_model),
    }
    if model.settings.base_model == TINY_MODEL_NAME:
        config["tiny_version"] = tiny_version()
    write_json_atomic(os.path.join(out_dir, "config.json"), config)


def tiny_base_for(version: str | None, path: str) -> str:
    """The base of a checkpoint trained on the built-in tiny model: the build it was trained on,
    kept in $CLARA_HOME/<version> when it differs from the shipped one (another recipe gives
    other weights)."""
    if version is None or version in shipped_versions():
        return TINY_MODEL_NAME
    kept = clara_home() / version
    if kept.is_dir():
        return str(kept)
    raise CheckpointError(
        f"{path}: trained on the built-in tiny model {version}, but this version of clara ships "
        f"{tiny_version()} (a different recipe, so different weights) and {kept} does not exist; "
        "retrain the checkpoint, or build the old model there with the clara version it was trained "
        f"with (`python -m clara.tiny --out {kept}`)"
    )


def read_config(path: str) -> dict:
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{path}: not a checkpoint (no config.json)")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    if config.get("format") != FORMAT_NAME and "decoder_model_name" not in config:
        raise CheckpointError(
            f"{config_path}: neither a native CLaRa checkpoint (format: clara) nor the "
            "official release layout (decoder_model_name)"
        )
    return config


def load_model(
    path: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", base_model: str | None = None
) -> ClaraModel:
    """Load a native or official-release checkpoint directory. base_model overrides the recorded base.

    An export published meanwhile waits for the read to finish: the files read belong to one export."""
    with reading_export(path):
        return _load_model(path, dtype, attn_implementation, base_model)


def _load_model(path: str, dtype: torch.dtype, attn_implementation: str, base_model: str | None) -> ClaraModel:
    config = read_config(path)
    if "decoder_model_name" in config:
        return _load_official(path, config, dtype, attn_implementation, base_model)
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {config['format_version']} is newer than this "
            f"toolkit reads ({FORMAT_VERSION}); update clara"
        )
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
        state = {k[len(prefix) :]: v for k, v in adapters.items() if k.startswith(prefix)}
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
        problem = (
            f"unexpected keys such as {result.unexpected_keys[0]!r}"
            if result.unexpected_keys
            else f"no weights for {missing[0]!r}"
            if missing
            else "no weights at all"
        )
        raise CheckpointError(
            f"{source}: adapter '{name}' does not fit the model ({problem}); "
            "was it trained with another base model or LoRA setting?"
        )


def _load_official(
    path: str, config: dict, dtype: torch.dtype, attn_implementation: str, base_model: str | None
) -> ClaraModel:
    for name in OFFICIAL_FILES:
        if not os.path.isfile(os.path.join(path, name)):
            raise CheckpointError(f"{path}: official-layout checkpoint without {name}")
    rate, doc_len = int(config["compr_rate"]), int(config["doc_max_length"])
    settings = ModelSettings(
        base_model=base_model or official_base_name(config["decoder_model_name"], path),
        n_mem_tokens=doc_len // rate,
        compress_rate=rate,
        doc_max_length=doc_len,
        generation_top_k=int(config.get("generation_top_k", 5)),
        lora_r=int(config.get("lora_r", 16)),
        # The release trained with alpha = 2 r and does not record alpha.
        lora_alpha=int(config.get("lora_alpha", 2 * int(config.get("lora_r", 16)))),
    )
    adapters = torch.load(os.path.join(path, "adapters.pth"), map_location="cpu", weights_only=True)
    layers = torch.load(os.path.join(path, "decoder_first_last_layers.pth"), map_location="cpu", weights_only=True)
    embed = _full_matrix(layers, "embed_tokens.weight", path)
    model = build_model(settings, list(adapters), dtype, attn_implementation, vocab_rows=embed.shape[0])
    for name, state in adapters.items():
        load_adapter_state(model, name, state, os.path.join(path, "adapters.pth"))
    matrices = embedding_matrices(model.causal_lm)
    with gathered(matrices, modifier_rank=0):
        _copy_full_matrix(embed, matrices[0], "embed_tokens.weight", path)
        # With tied embeddings the release's save (named_parameters) holds no separate lm_head entry.
        if len(matrices) > 1 or any(k.endswith("lm_head.weight") for k in layers):
            _copy_full_matrix(_full_matrix(layers, "lm_head.weight", path), matrices[-1], "lm_head.weight", path)
        with torch.no_grad():
            model.mem_embeddings.copy_(matrices[0][list(model.tokens.mem_ids)])
    return model


def _full_matrix(layers: dict, suffix: str, path: str) -> torch.Tensor:
    matches = [value for key, value in layers.items() if key.endswith(suffix)]
    if not matches:
        raise CheckpointError(f"{path}/decoder_first_last_layers.pth: no '{suffix}' entry")
    return matches[0]


@torch.no_grad()
def _copy_full_matrix(source: torch.Tensor, target: torch.Tensor, name: str, path: str) -> None:
    if source.shape != target.shape:
        raise CheckpointError(
            f"{path}/decoder_first_last_layers.pth: '{name}' has shape "
            f"{tuple(source.shape)}, the model expects {tuple(target.shape)}"
        )
    target.copy_(source.to(target))
