"""Stage 1_2: compression instruction tuning, answering a question from compressed documents."""

from __future__ import annotations

from clara import prompts

# The compressor comes from stage 1; the generator starts fresh.
NEW_ADAPTERS = ("decoder_adapter",)
LOADED_ADAPTERS = ("encoder_adapter",)
TRAINED_ADAPTERS = ("encoder_adapter", "decoder_adapter")
USES_MSE = True


def example(record: dict, n_mem: int, top_k: int, seed: int) -> tuple[str, str, str]:
    slots = prompts.memory_slots(n_mem, len(record["docs"]))
    return prompts.SYSTEM_ANSWER, prompts.answer_user_message(slots, record["question"]), record["answer"]


def header(record: dict) -> tuple[str, str]:
    return record["question"], record["answer"]
