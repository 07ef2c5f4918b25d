"""Stage 1_2: compression instruction tuning, answering a question from compressed documents."""

from __future__ import annotations

from clara.stages import prompts
from clara.stages.stage import COMPRESSOR, GENERATOR, Stage, TypicalSample


def example(record: dict, n_mem: int, top_k: int, seed: int) -> tuple[str, str, str]:
    slots = prompts.memory_slots(n_mem, len(record["docs"]))
    return prompts.SYSTEM_ANSWER, prompts.answer_user_message(slots, record["question"]), record["answer"]


def header(record: dict) -> tuple[str, str]:
    return record["question"], record["answer"]


# The compressor comes from stage 1 and keeps training; the generator starts fresh.
STAGE = Stage(
    name="stage1_2",
    description="compression instruction tuning",
    new_adapters=(GENERATOR,),
    loaded_adapters=(COMPRESSOR,),
    trained_adapters=(COMPRESSOR, GENERATOR),
    trains_memory_embeddings=True,
    loss_terms=("mse",),
    uses_query=False,
    generates=True,
    previous="stage1",
    schema="answer",
    default_dataset="example/instruction_tuning_data.jsonl",
    learning_rate=1e-4,
    tiny_learning_rate=2e-3,
    max_len=2048,
    constant_schedule=False,
    example=example,
    header=header,
    typical_sample=TypicalSample(docs_per_sample=5, prompt_tokens=96, supervised_tokens=32),
    benchmark_sets="inst_eval_",
)
