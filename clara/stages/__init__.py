"""The three training stages, each one `Stage` object that owns what makes it different.

The rest of the package asks the stage (its adapters, schema, defaults, prompts) instead of comparing
stage names. A new stage is a module here that defines `STAGE`, plus one line in `STAGES` below.
    stage      the `Stage` object and the adapter role names
    prompts    chat prompts, special tokens, memory slots (the stages' and everyone's)
    stage1, stage1_2, stage2   one module per stage, each defining `STAGE`

This package is pure description, the bottom of clara: it imports nothing outside itself, so that settings can
be resolved without loading torch or datasets.
"""

from __future__ import annotations

from clara.stages import stage1, stage1_2, stage2
from clara.stages.stage import COMPRESSOR, GENERATOR, QUERY_REASONER, Stage, TypicalSample

__all__ = ["COMPRESSOR", "GENERATOR", "QUERY_REASONER", "STAGES", "Stage", "TypicalSample", "get_stage"]

STAGES: dict[str, Stage] = {stage.name: stage for stage in (stage1.STAGE, stage1_2.STAGE, stage2.STAGE)}


def get_stage(name: str) -> Stage:
    """The stage of that name; KeyError names the known ones."""
    try:
        return STAGES[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}: expected one of {', '.join(STAGES)}") from None
