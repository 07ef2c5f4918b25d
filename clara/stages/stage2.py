"""Stage 2: end-to-end retrieval and generation, trained only by the generator's LM loss."""

from __future__ import annotations

from clara.stages import prompts
from clara.stages.stage import COMPRESSOR, GENERATOR, QUERY_REASONER, Stage, TypicalSample
from clara.stages.stage1_2 import header


def example(record: dict, n_mem: int, top_k: int, seed: int) -> tuple[str, str, str]:
    slots = prompts.memory_slots(n_mem, top_k)
    return prompts.SYSTEM_ANSWER, prompts.answer_user_message(slots, record["question"]), record["answer"]


# Compressor and generator come from stage 1_2; the query reasoner is loaded when the checkpoint has
# one, else it starts as a copy of the compressor. The compressor, memory embeddings included, stays
# frozen, so that documents compressed before stage 2 keep their vectors.
STAGE = Stage(
    name="stage2",
    description="end-to-end retrieval and generation",
    new_adapters=(),
    loaded_adapters=(COMPRESSOR, GENERATOR),
    trained_adapters=(QUERY_REASONER, GENERATOR),
    trains_memory_embeddings=False,
    loss_terms=("retrieval",),
    uses_query=True,
    generates=True,
    previous="stage1_2",
    schema="answer",
    default_dataset="example/end_to_end_data.jsonl",
    learning_rate=5e-6,
    tiny_learning_rate=1e-3,
    max_len=1024,
    constant_schedule=True,
    example=example,
    header=header,
    typical_sample=TypicalSample(docs_per_sample=20, prompt_tokens=96, supervised_tokens=32),
    benchmark_sets="e2e_eval_ours_",
)
