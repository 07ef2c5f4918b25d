"""What a base model of a given shape holds, counted rather than measured: its parameters and LoRA's, the
bytes per token one layer keeps for backward or passes through without gradient, and what ZeRO-3 may keep
gathered at once (bench.memory adds these up into a step's peak)."""

from __future__ import annotations

from dataclasses import dataclass

from bench.config import SHAPES
from clara.stages import STAGES

# DeepSpeed's default stage3_max_live_parameters: the most parameters it keeps gathered at once.
MAX_LIVE_ELEMENTS = int(1e9)


# The linear layers LoRA adapts ("all-linear"), per transformer layer.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Dims:
    """A base model's shape (the fields of a bench.config.SHAPES entry)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    qk_norm: bool = True  # Qwen3 normalises queries and keys per head; Mistral does not

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one transformer layer."""
        h, q, kv, i = self.hidden_size, self.q_width, self.kv_width, self.intermediate_size
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


def dims_of(model: str) -> Dims:
    return Dims(**SHAPES[model], qk_norm=not model.startswith(("mistral", "llama")))


def parameter_counts(dims: Dims, lora_r: int = 16) -> dict[str, int]:
    """Base parameters by part, `linear` (N of bench.flops) and one adapter's LoRA parameters."""
    linear_per_layer = sum(a * b for a, b in dims.linear_shapes().values())
    norms_per_layer = 2 * dims.hidden_size + (2 * dims.head_dim if dims.qk_norm else 0)
    embedding = dims.vocab_size * dims.hidden_size
    head = 0 if dims.tie_word_embeddings else embedding
    layers = dims.num_layers * (linear_per_layer + norms_per_layer)
    lora = dims.num_layers * sum(lora_r * (a + b) for a, b in dims.linear_shapes().values())
    return {
        "embedding": embedding,
        "lm_head": head,
        "layers": layers,
        "total": embedding + head + layers + dims.hidden_size,  # + the final norm
        "linear": dims.num_layers * linear_per_layer,
        "lora_per_adapter": lora,
    }


def lora_input_elements(dims: Dims) -> int:
    """Elements per token of the inputs of one layer's adapted linear layers."""
    return sum(a for a, _ in dims.linear_shapes().values())


def layer_activation_bytes(dims: Dims) -> int:
    """Bytes one transformer layer keeps for backward per token, in bf16, frozen base, LoRA with dropout.


    A frozen linear keeps nothing (its input gradient needs only its weight), nor does a norm's frozen
    weight. Kept: each RMSNorm's input in fp32 (4 bytes per element); each LoRA input after dropout
    (bf16) and CUDA's boolean dropout mask (3 bytes per element of the adapted layer's input); the
    attention's query, keys and values (keys and values repeated to every head: a padding mask rules
    out grouped-query SDPA) and its output; the MLP's gate and up projections and the activation (2
    bytes each). Left out as small: LoRA's rank-r intermediates, the softmax statistics.
    """
    h, q, kv, i = dims.hidden_size, dims.q_width, dims.kv_width, dims.intermediate_size
    norms = 4 * h * 2 + (4 * (q + kv) if dims.qk_norm else 0)
    lora_inputs = 3 * lora_input_elements(dims)
    attention = 2 * (q + 2 * q + q)
    mlp = 2 * 3 * i
    return norms + lora_inputs + attention + mlp


def nograd_layer_bytes(dims: Dims) -> int:
    """Transient bytes per token of one layer's forward without gradient (the live tensors at its widest)."""
    h, q, kv, i = dims.hidden_size, dims.q_width, dims.kv_width, dims.intermediate_size
    return 2 * (3 * h + 2 * q + 2 * kv + 3 * i)


def gathered_elements(dims: Dims, lora_r: int = 16) -> int:
    """ZeRO-3: the most parameters held gathered at once, as clara.parallel.zero3.gathering_limits allows: two of
    the largest unit (a layer with its adapters, or the embedding matrix), at most DeepSpeed's 1e9."""
    counts = parameter_counts(dims, lora_r)
    most_adapters = max(len(stage.adapters) for stage in STAGES.values())
    layer = (counts["layers"] + most_adapters * counts["lora_per_adapter"]) // dims.num_layers
    return min(2 * max(layer, counts["embedding"]), MAX_LIVE_ELEMENTS)
