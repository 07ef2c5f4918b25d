"""The three training stages: which adapters each starts, loads and trains, and its prompts."""

from __future__ import annotations

from types import ModuleType

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from clara.stages import stage1, stage1_2, stage2

STAGE_MODULES: dict[str, ModuleType] = {"stage1": stage1, "stage1_2": stage1_2, "stage2": stage2}


def stage_module(stage: str) -> ModuleType:
    return STAGE_MODULES[stage]


def stage_tokenizer(cfg):
    """The tokenizer (with CLaRa's tokens added) that the stage's model will use, without loading the model:
    the data check measures every record's decoder input with it before the model loads."""
    from transformers import AutoTokenizer

    from clara.checkpoint import read_config, resolve_base_path
    from clara.prompts import add_special_tokens

    source = resolve_base_path(cfg.model_path)
    # A native checkpoint carries its tokenizer (build_model loads it from there); the official layout does not.
    if cfg.pretrain_checkpoint and "decoder_model_name" not in read_config(cfg.pretrain_checkpoint):
        source = cfg.pretrain_checkpoint
    tokenizer = AutoTokenizer.from_pretrained(source)
    return tokenizer, add_special_tokens(tokenizer, cfg.n_mem_tokens)


def build_stage_model(cfg, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", log=print):
    """The model a stage starts from: the previous stage's checkpoint, new adapters where the spec says.

    stage1: new compressor and generator. stage1_2: compressor from stage1, new generator.
    stage2: compressor and generator from stage1_2; the query reasoner from it when present, else a
    copy of the compressor.
    """
    from clara.checkpoint import CheckpointError, build_model, load_model, read_config
    from clara.model import ModelSettings, lora_config

    module = stage_module(cfg.stage)
    settings = ModelSettings(base_model=cfg.model_path, n_mem_tokens=cfg.n_mem_tokens, compress_rate=cfg.compress_rate,
                             doc_max_length=cfg.doc_max_length, generation_top_k=cfg.generation_top_k,
                             lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                             topk_temperature=cfg.topk_temperature, candidate_chunk_size=cfg.candidate_chunk_size)
    needed = ["encoder_adapter", "decoder_adapter"] + (["query_reasoner_adapter"] if cfg.stage == "stage2" else [])
    if not cfg.pretrain_checkpoint:
        log(f"{cfg.stage}: starting every adapter fresh from the base model {cfg.model_path}")
        model = build_model(settings, needed, dtype, attn_implementation)
    else:
        config = read_config(cfg.pretrain_checkpoint)
        saved_n = config.get("n_mem_tokens") or config["doc_max_length"] // config["compr_rate"]
        if saved_n != cfg.n_mem_tokens:
            raise CheckpointError(
                f"DOC_MAX_LENGTH / COMPRESS_RATE = {cfg.doc_max_length} / {cfg.compress_rate} gives "
                f"{cfg.n_mem_tokens} memory tokens, but {cfg.pretrain_checkpoint} was trained with {saved_n}")
        missing = [a for a in module.LOADED_ADAPTERS if a not in (config.get("adapters") or needed)]
        if missing:
            raise CheckpointError(f"{cfg.pretrain_checkpoint} has no {', '.join(missing)}, which {cfg.stage} "
                                  "loads; pass the checkpoint of the previous stage")
        model = load_model(cfg.pretrain_checkpoint, dtype, attn_implementation, base_model=cfg.model_path)
        model.settings = settings
        for name in needed:
            fresh = name in module.NEW_ADAPTERS
            if fresh and name in model.adapter_names:
                model.peft_model.delete_adapter(name)
            if name not in model.adapter_names:
                model.peft_model.add_adapter(name, lora_config(settings))
                if name == "query_reasoner_adapter" and not fresh:
                    state = get_peft_model_state_dict(model.peft_model, adapter_name="encoder_adapter", save_embedding_layers=False)
                    set_peft_model_state_dict(model.peft_model, state, adapter_name=name)
                    log(f"{cfg.stage}: query_reasoner_adapter initialised as a copy of encoder_adapter")
                else:
                    log(f"{cfg.stage}: new {name}")
            else:
                log(f"{cfg.stage}: {name} loaded from {cfg.pretrain_checkpoint}")
        model.refresh_lora_layers()
    model.set_trainable(module.TRAINED_ADAPTERS)
    return model
