"""The model a stage starts from: the previous stage's checkpoint, with new adapters where the stage says;
and the stage a saved checkpoint was trained for.

Each adapter of the stage (clara.stages.Stage) starts fresh or is loaded from the previous stage's checkpoint; a
query reasoner the checkpoint lacks starts as a copy of the compressor.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from transformers import PreTrainedTokenizerBase

from clara.model.checkpoint import (
    CheckpointError,
    build_model,
    load_model,
    read_config,
    resolve_base_path,
)
from clara.model.collate import LengthCheck
from clara.model.hub import resolve_checkpoint
from clara.model.model import ClaraModel, ModelSettings
from clara.model.tokenizer import load_tokenizer
from clara.stages import COMPRESSOR, QUERY_REASONER, STAGES, Stage, get_stage
from clara.stages.prompts import SpecialTokens, add_special_tokens


def tokenizer_source(base_model: str, pretrain_checkpoint: str | None) -> str:
    """Where the tokenizer of the stage's model is: the base model, or a native previous-stage checkpoint."""
    source = resolve_base_path(base_model)
    if pretrain_checkpoint:
        checkpoint = resolve_checkpoint(pretrain_checkpoint)
        # A native checkpoint carries its tokenizer (build_model loads it from there); the official layout does not.
        if "decoder_model_name" not in read_config(checkpoint):
            source = checkpoint
    return source


def stage_tokenizer(
    settings: ModelSettings, pretrain_checkpoint: str | None
) -> tuple[PreTrainedTokenizerBase, SpecialTokens]:
    """The tokenizer (with CLaRa's tokens added) that the stage's model will use, without loading the model."""
    tokenizer = load_tokenizer(tokenizer_source(settings.base_model, pretrain_checkpoint))
    return tokenizer, add_special_tokens(tokenizer, settings.n_mem_tokens)


def length_check(
    settings: ModelSettings, pretrain_checkpoint: str | None, stage: Stage, max_len: int, seed: int
) -> LengthCheck:
    """The data check of every record's decoder input against MAX_LEN, with the stage's tokenizer."""
    return LengthCheck(
        stage,
        tokenizer_source(settings.base_model, pretrain_checkpoint),
        settings.n_mem_tokens,
        settings.doc_max_length,
        max_len,
        settings.generation_top_k,
        seed,
    )


def build_stage_model(
    settings: ModelSettings,
    pretrain_checkpoint: str | None,
    stage: Stage,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    log: Callable[[str], None] = print,
) -> ClaraModel:
    """The model `stage` trains, with exactly the stage's adapters and trainable parameters: from the base model
    `settings.base_model`, or continuing from `pretrain_checkpoint` (the previous stage's)."""
    if not pretrain_checkpoint:
        log(f"{stage.name}: starting every adapter fresh from the base model {settings.base_model}")
        model = build_model(settings, list(stage.adapters), dtype, attn_implementation)
    else:
        model = _continue_from(settings, pretrain_checkpoint, stage, dtype, attn_implementation, log)
    model.set_trainable(stage.trained_adapters, memory_embeddings=stage.trains_memory_embeddings)
    return model


def _continue_from(
    settings: ModelSettings,
    pretrain_checkpoint: str,
    stage: Stage,
    dtype: torch.dtype,
    attn_implementation: str,
    log: Callable[[str], None],
) -> ClaraModel:
    source = resolve_checkpoint(pretrain_checkpoint)
    config = read_config(source)
    saved_n = config.get("n_mem_tokens") or config["doc_max_length"] // config["compr_rate"]
    if saved_n != settings.n_mem_tokens:
        raise CheckpointError(
            f"DOC_MAX_LENGTH / COMPRESS_RATE = {settings.doc_max_length} / {settings.compress_rate} gives "
            f"{settings.n_mem_tokens} memory tokens, but {source} was trained with {saved_n}"
        )
    saved_adapters = config.get("adapters") or list(stage.adapters)
    missing = [name for name in stage.loaded_adapters if name not in saved_adapters]
    if missing:
        raise CheckpointError(
            f"{source} has no {', '.join(missing)}, which {stage.name} loads; pass the checkpoint of the previous stage"
        )
    model = load_model(source, dtype, attn_implementation, base_model=settings.base_model)
    model.settings = settings
    for name in stage.adapters:
        if name in stage.new_adapters:
            model.add_fresh_adapter(name)
            log(f"{stage.name}: new {name}")
        elif name in model.adapter_names:
            log(f"{stage.name}: {name} loaded from {source}")
        else:
            model.copy_adapter(COMPRESSOR, name)
            log(f"{stage.name}: {name} initialised as a copy of {COMPRESSOR}")
    return model


# -- the stage of a saved checkpoint ------------------------------------------------------------------------
def official_adapter_names(path: str) -> list[str]:
    """Adapter names of an official-layout checkpoint, read without loading the whole file where possible."""
    file = os.path.join(path, "adapters.pth")
    if not os.path.isfile(file):
        raise CheckpointError(f"{path}: official-layout checkpoint without adapters.pth")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # files in the legacy (non-zip) format cannot be memory-mapped
        state = torch.load(file, map_location="cpu", weights_only=True)
    return list(state)


def with_query_reasoner(holds: bool) -> list[str]:
    """The stages whose model holds a query reasoner (`holds`), or those whose model does not."""
    return [name for name, stage in STAGES.items() if (QUERY_REASONER in stage.adapters) == holds]


def infer_stage(path: str) -> str | None:
    """The stage of a checkpoint: recorded in native checkpoints.

    The official release layout records none. There, a query_reasoner_adapter means the (first) stage whose
    model holds one; without one, the stages before it look alike and None is returned (the caller asks).
    """
    config = read_config(path)
    if config.get("stage"):
        return config["stage"]
    if "decoder_model_name" in config and QUERY_REASONER in official_adapter_names(path):
        return with_query_reasoner(True)[0]
    return None


def checkpoint_stage(checkpoint: str, given: str | None) -> Stage:
    """The stage a command line evaluates: `given` (--stage) or the one the checkpoint records."""
    found = given or infer_stage(checkpoint)
    if found is None:
        raise CheckpointError(
            f"{checkpoint}: the official release layout records no stage and it has no "
            f"query_reasoner_adapter (which would mean {with_query_reasoner(True)[0]}); "
            "pass --stage " + " or --stage ".join(with_query_reasoner(False))
        )
    if not given and found not in STAGES:
        raise CheckpointError(f"{checkpoint}/config.json: unknown stage {found!r}; pass --stage")
    return get_stage(found)


def ensure_query_reasoner(model: ClaraModel, log: Callable[[str], None] = print) -> bool:
    """Give a model without a query reasoner one copied from the compressor, as the first stage with one starts.

    Returns True when one was added.
    """
    if QUERY_REASONER in model.adapter_names:
        return False
    model.copy_adapter(COMPRESSOR, QUERY_REASONER)
    first = with_query_reasoner(True)[0]
    log(f"{QUERY_REASONER} not in the checkpoint: initialised as a copy of {COMPRESSOR} (as {first} starts)")
    return True
