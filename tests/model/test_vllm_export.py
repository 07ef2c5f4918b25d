"""clara.model.vllm_export: the generator written for vLLM computes what CLaRa's generator computes (the adapter
merged, the added rows in, the tiny model's heads padded from 16 to 32), and its fingerprint names it."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from clara.model.checkpoint import load_model
from clara.model.vllm_export import (
    EXPORT_INFO,
    export_fingerprint,
    generator_fingerprint,
    write_padded_base,
    write_vllm_export,
)
from clara.stages.stage import GENERATOR
from tests.helpers import ROLES, noisy_checkpoint, run_module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return noisy_checkpoint(tmp_path_factory.mktemp("vllm_export") / "ck", {r: i + 1 for i, r in enumerate(ROLES)})


@torch.no_grad()
def test_the_padded_export_gives_the_generators_logits_within_1e_4(checkpoint, tmp_path):
    model = load_model(str(checkpoint)).eval()
    write_vllm_export(model, str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["head_dim"] == 32 and config["vocab_size"] == len(model.tokenizer)
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    # A prompt with the memory tokens in it and vectors spliced at their positions, as serving sends it.
    mem = list(model.tokens.mem_ids)
    ids = torch.tensor([[5, 17, *mem, 33, *mem, 60, 99, 101, 7]])
    vectors = torch.randn(2 * len(mem), model.hidden_size, generator=torch.Generator().manual_seed(0))
    embeds = model.inject(ids, vectors)
    with model.adapter(GENERATOR):
        expected = model.causal_lm(inputs_embeds=embeds).logits
    got = exported(inputs_embeds=embeds).logits
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4
    # The merge mattered: the base alone is further off than the export.
    with model.peft_model.disable_adapter():
        base = model.causal_lm(inputs_embeds=embeds).logits
    assert (base - expected).abs().max().item() > 1e-2


def test_the_fingerprint_names_the_generator_not_the_compressor(checkpoint, tmp_path):
    model = load_model(str(checkpoint))
    first = generator_fingerprint(model, torch.float32, 32)
    assert generator_fingerprint(model, torch.float32, 32) == first
    assert generator_fingerprint(model, torch.bfloat16, 32) != first
    assert generator_fingerprint(model, torch.float32, 16) != first
    with torch.no_grad():
        next(p for n, p in model.peft_model.named_parameters() if f"lora_B.{GENERATOR}." in n).add_(1e-3)
    changed = generator_fingerprint(model, torch.float32, 32)
    assert changed != first
    with torch.no_grad():
        next(p for n, p in model.peft_model.named_parameters() if "lora_B.encoder_adapter." in n).add_(1e-3)
    assert generator_fingerprint(model, torch.float32, 32) == changed
    with torch.no_grad():
        model.mem_embeddings.add_(1e-3)
    assert generator_fingerprint(model, torch.float32, 32) != changed


@pytest.mark.slow
def test_clara_export_format_vllm_writes_a_model_folder_with_its_fingerprint(checkpoint, tmp_path):
    out = tmp_path / "vllm"
    done = run_module(["clara", "export", "--checkpoint", str(checkpoint), "--format", "vllm", "--out", str(out)])
    assert done.returncode == 0, done.stderr
    fingerprint = export_fingerprint(str(out))
    assert fingerprint == generator_fingerprint(load_model(str(checkpoint)), torch.float32, 32)
    assert fingerprint in done.stdout
    assert {"config.json", "model.safetensors", "tokenizer.json", EXPORT_INFO} <= {p.name for p in out.iterdir()}


@torch.no_grad()
def test_the_plain_base_for_text_rag_is_padded_exactly_too(tmp_path):
    from transformers import AutoTokenizer

    from clara.model.tiny_base import tiny_model_dir

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), dtype=torch.float32).eval()
    write_padded_base(base, AutoTokenizer.from_pretrained(tiny_model_dir()), str(tmp_path))
    padded = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert padded.config.head_dim == 32 and base.config.head_dim == 16
    ids = torch.tensor([[5, 17, 33, 60, 99, 101, 7, 250, 3]])
    assert (padded(ids).logits - base(ids).logits).abs().max().item() < 1e-4
