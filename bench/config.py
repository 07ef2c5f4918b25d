"""One benchmark configuration: the model shape and the training settings of one measured row."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

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


@dataclass
class BenchConfig:
    # Model shape (random weights).
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 1024
    vocab_size: int = 8192
    head_dim: int | None = None  # None: hidden_size / num_heads
    tie_word_embeddings: bool = False
    # Training settings.
    stage: str = "stage1"
    micro_batch_size: int = 1
    doc_max_length: int = 256
    compress_rate: int = 32
    docs: int = 1  # documents per sample (stage1, stage1_2)
    candidates: int = 10  # candidate documents per question (stage2)
    top_k: int = 5  # documents the stage-2 generator reads
    candidate_chunk_size: int = 64
    gradient_checkpointing: bool | None = None  # None: on with CUDA, off on CPU (as the trainer)
    zero_stage: int = 2
    processes: int = 1  # data-parallel ranks (torchrun); memory and time are per rank
    lora_r: int = 16
    mse_weight: float = 0.1
    question_tokens: int = 24
    answer_tokens: int = 16
    flash_attn: str = "auto"
    # Measurement.
    warmup_steps: int = 2
    steps: int = 8
    seed: int = 0
    threads: int | None = None  # None: PyTorch's default
    peak_tflops: float | None = None  # None: from the table of known GPUs
    profile: bool = False  # one more step under torch.profiler: where the step's time goes
    # Labels for the sweep table.
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
