"""The `Stage` description every stage module fills in, and the names of the adapter roles."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# The README's compressor and generator; the adapter names are part of the checkpoint formats.
COMPRESSOR = "encoder_adapter"
GENERATOR = "decoder_adapter"
QUERY_REASONER = "query_reasoner_adapter"

# (system, user, assistant target) for one normalised record: (record, n_mem, top_k, seed) -> texts.
ExampleFn = Callable[[dict, int, int, int], tuple[str, str, str]]


@dataclass(frozen=True)
class TypicalSample:
    """One training sample at the launchers' defaults, as bench/'s memory plan counts it."""

    docs_per_sample: int  # documents the compressor reads (with uses_query: the candidates)
    prompt_tokens: int  # generator tokens besides the memory slots: template, question, answer
    supervised_tokens: int  # generator positions with a target


@dataclass(frozen=True)
class Stage:
    name: str
    description: str
    # Adapters: started fresh, loaded from the previous stage's checkpoint, trained. A loaded adapter
    # missing from the checkpoint is an error, except a query reasoner, which starts as a compressor copy.
    new_adapters: tuple[str, ...]
    loaded_adapters: tuple[str, ...]
    trained_adapters: tuple[str, ...]
    # The memory-token embeddings belong to the compressor: they train exactly when it does.
    trains_memory_embeddings: bool
    # The loss terms (clara.model.losses, by name) added to the generator's LM loss; the others weigh 0.
    loss_terms: tuple[str, ...]
    uses_query: bool  # the query reasoner selects top-k of the candidates (stage 2)
    generates: bool  # evaluation answers by greedy generation and scores the answers
    previous: str | None  # the stage whose checkpoint PRETRAIN_CHECKPOINT names
    schema: str  # record schema in clara.data: "stage1" or "answer"
    default_dataset: str  # example file, relative to the repository root
    learning_rate: float
    tiny_learning_rate: float  # the built-in tiny model learns in minutes only with a large LoRA rate
    max_len: int
    constant_schedule: bool  # no warmup or cosine decay
    example: ExampleFn
    header: Callable[[dict], tuple[str, str]]  # (question, answer) shown by the debug print and eval rows
    typical_sample: TypicalSample  # what bench/ plans memory for when not told otherwise
    # The paper's evaluation sets of the stage in apple/CLaRa_multi_stage: their configurations' name prefix
    # (python -m clara.benchmark); None: the stage has none.
    benchmark_sets: str | None = None

    @property
    def adapters(self) -> tuple[str, ...]:
        """Every adapter the stage's model holds."""
        return tuple(dict.fromkeys(self.loaded_adapters + self.new_adapters + self.trained_adapters))

    def min_docs(self, top_k: int) -> int:
        """Documents a record needs: the top-k selected from its candidates, else one."""
        return top_k if self.uses_query else 1

    @property
    def default_eval_dataset(self) -> str:
        return self.default_dataset.replace(".jsonl", "_eval.jsonl")
