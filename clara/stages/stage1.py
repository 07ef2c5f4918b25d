"""Stage 1: compression pretraining on QA pairs and paraphrases of each document."""

from __future__ import annotations

from clara.stages import prompts
from clara.stages.stage import COMPRESSOR, GENERATOR, Stage, TypicalSample


def example(record: dict, n_mem: int, top_k: int, seed: int) -> tuple[str, str, str]:
    """(system, user, assistant target) for one normalised stage1 record."""
    slots = prompts.memory_slots(n_mem, len(record["docs"]))
    if record["data_type"] == "paraphrase":
        instruction = prompts.paraphrase_instruction(record["docs"][0], seed)
        return prompts.SYSTEM_PARAPHRASE, instruction.format(slots=slots), record["answers"][0]
    target = prompts.qa_target(record["questions"], record["answers"])
    return prompts.SYSTEM_QA, f"Background:\n{slots}", target


def header(record: dict) -> tuple[str, str]:
    """Question and answer shown by the debug print: the record's first pair."""
    if record["data_type"] == "paraphrase":
        return "(paraphrase)", record["answers"][0]
    return record["questions"][0], record["answers"][0]


STAGE = Stage(
    name="stage1",
    description="compression pretraining",
    new_adapters=(COMPRESSOR, GENERATOR),
    loaded_adapters=(),
    trained_adapters=(COMPRESSOR, GENERATOR),
    trains_memory_embeddings=True,
    loss_terms=("mse",),
    uses_query=False,
    generates=False,
    previous=None,
    schema="stage1",
    default_dataset="example/pretrain_data.jsonl",
    learning_rate=1e-4,
    tiny_learning_rate=2e-3,
    max_len=2048,
    constant_schedule=False,
    example=example,
    header=header,
    typical_sample=TypicalSample(docs_per_sample=1, prompt_tokens=320, supervised_tokens=256),
)
