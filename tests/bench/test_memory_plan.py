"""The memory plan's accounting (bench/memory.py) against what can be counted on a CPU: parameter counts of
the real models' shapes (built on the meta device, no weights, no download), LoRA parameter counts as peft
makes them, and the bytes a transformer layer keeps for backward, counted through autograd's saved-tensor
hooks on a small Qwen3 in bf16. The GPU check compares the peaks with measured ones."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, Qwen3Config

from bench.config import SHAPES
from bench.memory import GiB, Workload, plan_rows, step_memory
from bench.memory_parts import (
    Dims,
    dims_of,
    gathered_elements,
    layer_activation_bytes,
    lora_input_elements,
    parameter_counts,
)
from clara.model.model import ModelSettings, attach_adapters
from clara.stages import get_stage
from tests.helpers import REPO


def transformers_config(dims: Dims, layers: int | None = None):
    """The Hugging Face config of a shape: Qwen3, or Mistral for the shape without q/k norms."""
    common = dict(
        vocab_size=dims.vocab_size,
        hidden_size=dims.hidden_size,
        intermediate_size=dims.intermediate_size,
        num_hidden_layers=layers or dims.num_layers,
        num_attention_heads=dims.num_heads,
        num_key_value_heads=dims.num_kv_heads,
        head_dim=dims.head_dim,
        tie_word_embeddings=dims.tie_word_embeddings,
    )
    return Qwen3Config(**common) if dims.qk_norm else MistralConfig(**common)


@pytest.mark.parametrize("model", sorted(SHAPES))
def test_parameter_counts_match_the_transformers_model(model):
    dims = dims_of(model)
    with torch.device("meta"):
        built = AutoModelForCausalLM.from_config(transformers_config(dims))
    counts = parameter_counts(dims)
    assert counts["total"] == sum(p.numel() for p in built.parameters())
    linear = sum(m.in_features * m.out_features for m in built.model.modules() if isinstance(m, torch.nn.Linear))
    assert counts["linear"] == linear


def test_lora_parameter_count_matches_peft():
    dims = dims_of("qwen3-0.6b")
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(transformers_config(dims, layers=2))
    settings = ModelSettings(base_model="unused", n_mem_tokens=8, compress_rate=32, doc_max_length=256, lora_r=16)
    peft_model = attach_adapters(base, ["encoder_adapter", "decoder_adapter"], settings)
    per_adapter = sum(p.numel() for name, p in peft_model.named_parameters() if ".encoder_adapter." in name)
    assert per_adapter * dims.num_layers // 2 == parameter_counts(dims, lora_r=16)["lora_per_adapter"]


def saved_bytes_per_token(config, tokens_per_row: int, rows: int) -> float:
    """Bytes of the tensors autograd keeps for backward in one training forward of the transformer body
    (LoRA trained, base frozen, dropout on, a padding mask), per token; parameters excluded."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    settings = ModelSettings(
        base_model="unused",
        n_mem_tokens=4,
        compress_rate=8,
        doc_max_length=32,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.1,
    )
    # DeepSpeed's bf16 mode casts every parameter, the adapters' too, to bf16.
    model = attach_adapters(base, ["decoder_adapter"], settings).to(torch.bfloat16)
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)
    model.train()
    params = {p.data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def keep(tensor):
        if tensor.data_ptr() not in params and tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    embeds = torch.randn(rows, tokens_per_row, config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    mask = torch.ones(rows, tokens_per_row, dtype=torch.long)
    mask[0, :3] = 0  # left padding: the masked attention path a real batch takes
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model.base_model.model.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
    return sum(seen.values()) / (rows * tokens_per_row)


@pytest.mark.parametrize("qk_norm", [True, False], ids=["qwen3", "mistral"])
def test_layer_activation_bytes_match_autograds_saved_tensors(qk_norm):
    dims = Dims(
        hidden_size=256,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        intermediate_size=768,
        vocab_size=64,
        tie_word_embeddings=False,
        qk_norm=qk_norm,
    )
    one, three = (saved_bytes_per_token(transformers_config(dims, layers=n), tokens_per_row=64, rows=2) for n in (1, 3))
    measured = (three - one) / 2  # per layer, free of what the embeddings and the final norm keep
    # On CUDA dropout keeps a boolean mask (1 byte an element); on the CPU its noise in bf16 (2 bytes).
    predicted = layer_activation_bytes(dims) + lora_input_elements(dims)
    assert predicted == pytest.approx(measured, rel=0.1), (predicted, measured)


def test_checkpointing_micro_batch_and_chunk_lower_the_peak():
    dims = dims_of("qwen3-14b")
    stage1 = Workload(stage=get_stage("stage1"), micro_batch_size=4)
    with_gc, without = (step_memory(dims, stage1, gradient_checkpointing=gc)["peak"] for gc in (True, False))
    assert with_gc < without
    assert step_memory(dims, Workload(stage=get_stage("stage1"), micro_batch_size=1))["peak"] < with_gc
    stage2 = Workload(stage=get_stage("stage2"), micro_batch_size=4, docs_per_sample=40)
    chunked = step_memory(
        dims, Workload(stage=get_stage("stage2"), micro_batch_size=4, docs_per_sample=40, candidate_chunk_size=8)
    )
    assert chunked["candidate_compression"] < step_memory(dims, stage2)["candidate_compression"]
    # ZeRO shards the optimizer states over the GPUs, not the frozen weights.
    one, eight = step_memory(dims, stage1, gpus=1), step_memory(dims, stage1, gpus=8)
    assert eight["optimizer"] == pytest.approx(one["optimizer"] / 8)
    assert eight["base_weights"] == one["base_weights"]


def test_plan_names_a_change_when_it_does_not_fit():
    rows = plan_rows("qwen3-14b", gpus=1, gpu_gib=40.0, gradient_checkpointing=False, micro_batch_size=4)
    by_stage = {row["stage"]: row for row in rows}
    assert not by_stage["stage1_2"]["fits"]
    assert by_stage["stage1_2"]["change"] == "GRADIENT_CHECKPOINTING=true"
    # One 24 GB card holds Qwen3-14B's frozen weights only partitioned and offloaded.
    small = plan_rows("qwen3-14b", gpus=1, gpu_gib=24.0)
    assert all(row["change"].startswith("ZERO_STAGE=3 OFFLOAD=") for row in small)
    assert all(row["peak_gib"] > 2 * parameter_counts(dims_of("qwen3-14b"))["total"] / GiB for row in small)
    assert all("ZERO_STAGE=3" == row["change"] for row in plan_rows("qwen3-14b", gpus=8, gpu_gib=24.0))
    hopeless = plan_rows("qwen3-14b", gpus=1, gpu_gib=2.0)
    assert all("does not fit" in row["change"] for row in hopeless)


def test_zero3_partitions_the_base_and_offload_moves_it_to_the_cpu():
    dims = dims_of("qwen3-14b")
    work = Workload(stage=get_stage("stage1"), micro_batch_size=2)
    zero2, zero3 = step_memory(dims, work, gpus=8), step_memory(dims, work, gpus=8, zero_stage=3)
    gathered = 2 * gathered_elements(dims)
    assert zero3["base_weights"] == pytest.approx(zero2["base_weights"] / 8 + gathered)
    # clara.parallel.zero3's linear keeps no input behind a frozen weight: the activations are ZeRO-2's.
    assert zero3["activations"] == zero2["activations"]
    optimizer = step_memory(dims, work, gpus=8, zero_stage=3, offload="optimizer")
    assert optimizer["optimizer"] == 0 and optimizer["gradients"] < zero3["gradients"]
    everything = step_memory(dims, work, gpus=8, zero_stage=3, offload="all")
    assert everything["base_weights"] == pytest.approx(gathered) and everything["lora_weights"] == 0


def test_command_line_prints_the_table(tmp_path):
    out = tmp_path / "plan.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.memory", "--model", "mistral-7b", "--gpus", "8", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    table = [line for line in proc.stdout.splitlines() if line.startswith("| mistral-7b | 8 |")]
    assert [line.split(" | ")[2] for line in table] == ["stage1", "stage1_2", "stage2"]
    assert out.read_text().count('"peak_gib"') == 3
