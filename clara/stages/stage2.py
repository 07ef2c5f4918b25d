"""Stage 2: end-to-end retrieval and generation, trained only by the generator's LM loss."""

from __future__ import annotations

from clara import prompts

# Compressor and generator come from stage 1_2; the query reasoner is loaded when the checkpoint
# has one, else it starts as a copy of the compressor. The compressor stays frozen.
NEW_ADAPTERS: tuple[str, ...] = ()
LOADED_ADAPTERS = ("encoder_adapter", "decoder_adapter")
TRAINED_ADAPTERS = ("query_reasoner_adapter", "decoder_adapter")
USES_MSE = False


def example(record: dict, n_mem: int, top_k: int, seed: int) -> tuple[str, str, str]:
    slots = prompts.memory_slots(n_mem, top_k)
    return prompts.SYSTEM_ANSWER, prompts.answer_user_message(slots, record["question"]), record["answer"]


def header(record: dict) -> tuple[str, str]:
    return record["question"], record["answer"]
