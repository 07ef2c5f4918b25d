"""Model FLOPs of one CLaRa training step, and the peak FLOP rates that model FLOPs utilisation divides by.

CLaRa trains LoRA adapters on a frozen base, so the usual 6 * N * tokens overcounts. Per token and
per pass, with N the base's matrix-multiply parameters (its linear layers, embeddings excluded)
and R the LoRA matrix parameters of one adapter (sum of r * (in + out) over the adapted layers):

- forward: 2 N + 2 R, plus causal attention;
- backward of a pass that needs gradients: activation gradients through every layer (2 N + 2 R),
  weight gradients only for a trained adapter (another 2 R), the frozen base gets none;
  attention backward is twice its forward;
- a pass without gradient (stage-2 candidate compression) is forward only.

Causal attention over a sequence of s attended tokens costs, per layer, 2 * width * s * (s + 1) in the
forward (Q K^T and the weighted sum of V, each over the s (s + 1) / 2 query-key pairs; width =
heads * head_dim). The LM head projects only the supervised positions (README: "What a step costs"): 2 V H per
supervised token forward and, being frozen, 2 V H backward for the activation gradient.

Gradient-checkpointing recomputation is not counted: model FLOPs utilisation counts the work the
model needs, not the work a memory-saving schedule adds.
"""

from __future__ import annotations

from dataclasses import dataclass

from clara.stages import Stage

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, in FLOP/s. Matched in order
# against torch.cuda.get_device_name(): the more specific names come first.
PEAK_BF16_DENSE = (
    ("H200", 989.4e12),
    ("H100 NVL", 835.0e12),
    ("H100 PCIe", 756.0e12),
    ("H100", 989.4e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0e12),
)


def peak_flops(device_name: str) -> float | None:
    """The bf16 dense peak of a GPU by name, or None when the table does not know it."""
    for key, value in PEAK_BF16_DENSE:
        if key.lower() in device_name.lower():
            return value
    return None


@dataclass
class ModelShape:
    """What the FLOP count needs to know about the base model and its adapters."""

    layers: int
    hidden: int
    vocab: int
    attention_width: int  # heads * head_dim
    linear_params: int  # N: in * out summed over the transformer's linear layers (LM head excluded)
    lora_params: int  # R: r * (in + out) summed over the layers one adapter adapts


def causal_attention_forward(shape: ModelShape, lengths: list[int]) -> float:
    return float(sum(2 * shape.layers * shape.attention_width * s * (s + 1) for s in lengths))


def pass_flops(shape: ModelShape, lengths: list[int], grad: bool, adapter_trained: bool) -> float:
    """One transformer pass over sequences of the given attended lengths, with one adapter active."""
    tokens = sum(lengths)
    forward = 2.0 * (shape.linear_params + shape.lora_params) * tokens + causal_attention_forward(shape, lengths)
    if not grad:
        return forward
    backward = 2.0 * (shape.linear_params + shape.lora_params) * tokens + 2 * causal_attention_forward(shape, lengths)
    if adapter_trained:
        backward += 2.0 * shape.lora_params * tokens
    return forward + backward


def lm_head_flops(shape: ModelShape, supervised: int) -> float:
    """Forward and (activation-gradient only) backward of the frozen LM head at the supervised positions."""
    return 4.0 * shape.vocab * shape.hidden * supervised


def step_flops(
    shape: ModelShape,
    stage: Stage,
    doc_lengths: list[int],
    dec_lengths: list[int],
    supervised: int,
    query_lengths: list[int] | None = None,
) -> dict[str, float]:
    """Model FLOPs of one micro-batch's forward and backward, by part.

    A stage without the query reasoner: documents through the trained compressor, then the generator.
    With it (`Stage.uses_query`): the question through the trained query reasoner, the candidates through the
    compressor without gradient, then the generator.
    """
    parts = {}
    if stage.uses_query:
        parts["query"] = pass_flops(shape, query_lengths or [], grad=True, adapter_trained=True)
        parts["candidates"] = pass_flops(shape, doc_lengths, grad=False, adapter_trained=False)
    else:
        parts["documents"] = pass_flops(shape, doc_lengths, grad=True, adapter_trained=True)
    parts["decoder"] = pass_flops(shape, dec_lengths, grad=True, adapter_trained=True)
    parts["lm_head"] = lm_head_flops(shape, supervised)
    parts["total"] = sum(parts.values())
    return parts
