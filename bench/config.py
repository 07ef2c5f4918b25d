"""One benchmark configuration: the model shape and the training settings of one measured row."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from clara.stages import STAGES, Stage, get_stage

# Shapes of real base models, from their config.json on the Hugging Face hub (a fact, not a download):
# hidden size, layers, attention and key/value heads, head size, MLP width, vocabulary, tied embeddings.
SHAPES = {
    "qwen3-0.6b": dict(
        hidden_size=1024,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=3072,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "qwen3-1.7b": dict(
        hidden_size=2048,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=6144,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "qwen3-14b": dict(
        hidden_size=5120,
        num_layers=40,
        num_heads=40,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=17408,
        vocab_size=151936,
        tie_word_embeddings=False,
    ),
    "qwen3-32b": dict(
        hidden_size=5120,
        num_layers=64,
        num_heads=64,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=25600,
        vocab_size=151936,
        tie_word_embeddings=False,
    ),
    # Llama-3.1-70B (a Llama, built here as a Qwen3 of its shape, as Mistral below).
    "llama-3-70b": dict(
        hidden_size=8192,
        num_layers=80,
        num_heads=64,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=28672,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
    # Mistral-7B-Instruct-v0.2, the official CLaRa release's base (a Mistral, built here as a Qwen3 of its
    # shape: the two differ only in Qwen3's per-head q/k norms, a few thousand parameters).
    "mistral-7b": dict(
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=14336,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
}


# What measures retrieval (the candidates sweeps, answering from an index) runs the first stage that selects
# documents with the query reasoner.
RETRIEVAL_STAGE = next(name for name, stage in STAGES.items() if stage.uses_query)

SHAPE, TRAINING, MEASUREMENT = "model shape (random weights)", "training settings", "measurement and output"


def option(default, group: str, help: str, **flag):
    """A BenchConfig field that is also a `python -m bench` option of the same name (bench.cli builds them):
    its group in --help, its help text, and argparse's choices / type / metavar where the annotation is not
    enough."""
    return field(default=default, metadata={"group": group, "help": help, **flag})


@dataclass
class BenchConfig:
    hidden_size: int = option(256, SHAPE, "hidden size")
    num_layers: int = option(4, SHAPE, "transformer layers")
    num_heads: int = option(4, SHAPE, "attention heads")
    num_kv_heads: int = option(2, SHAPE, "key/value heads (grouped-query attention)")
    intermediate_size: int = option(1024, SHAPE, "MLP intermediate size")
    vocab_size: int = option(
        8192,
        SHAPE,
        "vocabulary rows of the embedding and LM head; at least the tiny tokenizer's size + "
        "DOC_MAX_LENGTH/COMPRESS_RATE + 3 (the tokenizer is padded with unused entries to fill it)",
    )
    head_dim: int | None = option(None, SHAPE, "attention head size (default: hidden_size / num_heads)")
    tie_word_embeddings: bool = option(False, SHAPE, "share the input embedding and the LM head (Qwen3 does up to 4B)")
    stage: str = option("stage1", TRAINING, "training stage", choices=tuple(STAGES))
    micro_batch_size: int = option(1, TRAINING, "samples per step (MICRO_BATCH_SIZE)")
    doc_max_length: int = option(256, TRAINING, "document tokens (DOC_MAX_LENGTH); every synthetic document fills it")
    compress_rate: int = option(
        32,
        TRAINING,
        "tokens per memory vector (COMPRESS_RATE); memory tokens per document = doc_max_length / compress_rate",
    )
    docs: int = option(1, TRAINING, "documents per sample (a stage without the query reasoner)")
    candidates: int = option(10, TRAINING, "candidate documents per question (a stage with the query reasoner)")
    top_k: int = option(5, TRAINING, "documents the generator reads after retrieval (GENERATION_TOP_K)")
    candidate_chunk_size: int = option(
        64, TRAINING, "candidates compressed per no-grad chunk (bounds the compression's memory)"
    )
    gradient_checkpointing: bool | None = option(
        None, TRAINING, "gradient checkpointing; auto: on with CUDA, off on CPU, as the trainer"
    )
    zero_stage: int = option(
        2, TRAINING, "DeepSpeed ZeRO stage (3 partitions the base model over --processes ranks)", choices=(0, 1, 2, 3)
    )
    processes: int = option(
        1,
        TRAINING,
        "data-parallel ranks, started by torchrun (gloo on the CPU, one GPU each with CUDA); "
        "memory and step time are per rank, peak MB the largest rank's (all in the JSON)",
    )
    lora_r: int = option(16, TRAINING, "LoRA rank (alpha = 2 r)")
    mse_weight: float = option(0.1, TRAINING, "MSE loss weight (the stages whose loss terms include mse)")
    question_tokens: int = option(24, TRAINING, "about this many tokens per question")
    answer_tokens: int = option(16, TRAINING, "about this many tokens per answer")
    flash_attn: str = option(
        "auto",
        TRAINING,
        "FlashAttention-2 on CUDA when installed (auto), else PyTorch SDPA",
        choices=("auto", "true", "false"),
    )
    warmup_steps: int = option(2, MEASUREMENT, "untimed steps first")
    steps: int = option(8, MEASUREMENT, "timed steps (the median is reported)")
    seed: int = option(0, MEASUREMENT, "seed of the weights and the synthetic data")
    threads: int | None = option(None, MEASUREMENT, "PyTorch CPU threads (default: PyTorch's choice)")
    peak_tflops: float | None = option(
        None, MEASUREMENT, "GPU peak (dense bf16 TFLOP/s) for MFU; default from a table: H100/H200/A100"
    )
    profile: bool = option(
        False,
        MEASUREMENT,
        "after the timed steps, one more under torch.profiler: kernel (CPU: operator) time by "
        "kind (matmul, attention, other) and the busiest operators, in the JSON",
    )
    # Labels for the sweep table, set by bench.sweeps (not options).
    group: str = "single"
    label: str = ""

    @property
    def n_mem_tokens(self) -> int:
        return self.doc_max_length // self.compress_rate

    @property
    def stage_spec(self) -> Stage:
        """The `Stage` this row trains: bench/ looks a stage name up here only."""
        return get_stage(self.stage)

    @property
    def docs_per_sample(self) -> int:
        return self.candidates if self.stage_spec.uses_query else self.docs

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "BenchConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def problems(self) -> list[str]:
        """What is wrong with the settings, as `--option=value: expected ...` lines."""
        found = []

        def bad(name: str, expected: str) -> None:
            found.append(f"--{name}={getattr(self, name)!r}: expected {expected}")

        if self.stage not in STAGES:
            bad("stage", "one of " + ", ".join(STAGES))
        for name in (
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "intermediate_size",
            "vocab_size",
            "micro_batch_size",
            "doc_max_length",
            "compress_rate",
            "docs",
            "candidates",
            "top_k",
            "candidate_chunk_size",
            "lora_r",
            "question_tokens",
            "answer_tokens",
            "steps",
        ):
            if getattr(self, name) <= 0:
                bad(name, "a positive integer")
        if self.warmup_steps < 0:
            bad("warmup_steps", "an integer >= 0")
        if self.threads is not None and self.threads <= 0:
            bad("threads", "a positive integer")
        if self.head_dim is None and self.num_heads > 0 and self.hidden_size % self.num_heads:
            bad("hidden_size", f"a multiple of --num_heads ({self.num_heads}), or give --head_dim")
        if self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads:
            bad("num_heads", f"a multiple of --num_kv_heads ({self.num_kv_heads})")
        if self.compress_rate > 0 and self.doc_max_length % self.compress_rate:
            bad("doc_max_length", f"a multiple of --compress_rate ({self.compress_rate})")
        if self.stage in STAGES and self.stage_spec.uses_query and self.candidates < self.top_k:
            bad("candidates", f"at least --top_k ({self.top_k})")
        if self.zero_stage not in (0, 1, 2, 3):
            bad("zero_stage", "0, 1, 2 or 3")
        if self.processes <= 0:
            bad("processes", "a positive integer")
        if self.flash_attn not in ("auto", "true", "false"):
            bad("flash_attn", "auto, true or false")
        if self.mse_weight < 0:
            bad("mse_weight", "a number >= 0")
        return found
