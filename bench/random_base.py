"""The measured model's base: a random-weight Qwen3 of the asked shape saved with the tiny model's tokenizer
(padded to the asked vocabulary), and the shape FLOPs are counted from, read off the built model."""

from __future__ import annotations

import gc
import json
from pathlib import Path

from bench.config import BenchConfig
from bench.flops import ModelShape

FILLER = "<|bench_filler_{}|>"


def write_tokenizer(out_dir: str, vocab_size: int, n_added: int):
    """The tiny model's tokenizer, its vocabulary padded with never-produced filler entries, so that the
    tokenizer plus CLaRa's added tokens fill exactly vocab_size rows (clara resizes the embedding matrix
    to the tokenizer's length; without the fillers the vocabulary asked for would shrink)."""
    from clara.model.tokenizer import load_tokenizer
    from clara.training.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    own = len(tokenizer)
    if vocab_size < own + n_added:
        raise SystemExit(
            f"--vocab_size={vocab_size}: expected at least {own + n_added} (the tiny tokenizer's "
            f"{own} tokens + {n_added} CLaRa tokens: the memory tokens, <AE>, <ENC>, <SEP>)"
        )
    tokenizer.save_pretrained(out_dir)
    path = Path(out_dir) / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    ids = set(vocab.values()) | {token["id"] for token in spec.get("added_tokens", [])}
    if ids != set(range(own)):
        raise SystemExit("bench: the tiny tokenizer's ids are not 0..len-1; cannot pad its vocabulary")
    for token_id in range(own, vocab_size - n_added):
        vocab[FILLER.format(token_id)] = token_id
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return load_tokenizer(out_dir)


def write_random_base(cfg: BenchConfig, out_dir: str, tokenizer, dtype, device) -> None:
    """A Qwen3 causal LM of the asked shape with random weights, saved next to the tokenizer."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim or cfg.hidden_size // cfg.num_heads,
        max_position_embeddings=40960,
        tie_word_embeddings=cfg.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        use_cache=False,
    )
    torch.manual_seed(cfg.seed)
    with torch.device(device):  # random init on the GPU is much faster for large shapes
        model = Qwen3ForCausalLM(config)
    model.to(dtype).save_pretrained(out_dir)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def model_shape(model) -> ModelShape:
    """N (base linear parameters) and R (one adapter's LoRA parameters) counted on the built model."""
    from torch import nn

    from clara.parallel.zero3 import full_numel, full_shape

    config = model.causal_lm.config
    linear = 0
    for name, module in model.backbone.named_modules():
        if isinstance(module, nn.Linear) and ".lora_" not in name:
            linear += module.in_features * module.out_features
    lora = sum(
        full_numel(p)
        for name, p in model.peft_model.named_parameters()
        if ".lora_A.decoder_adapter." in name or ".lora_B.decoder_adapter." in name
    )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ModelShape(
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        vocab=full_shape(model.causal_lm.get_output_embeddings().weight)[0],
        attention_width=config.num_attention_heads * head_dim,
        linear_params=linear,
        lora_params=lora,
    )
