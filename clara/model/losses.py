"""The loss terms a training step adds to the generator's LM loss, each one named once.

A term's name is everything about it: a stage trains with it when the name is in `Stage.loss_terms`, its
weight setting is `<name>_weight` (a setting in clara.config and the keyword `ClaraModel.forward` takes), its value
is `StepOutput.terms[<name>]`, its step sums are `<name>` and `<name>_batches` (clara.training.step), and
its metrics.jsonl key and console name are below. A new loss is a function here that computes it from the
step's output, one `LossTerm` in `LOSS_TERMS`, its weight setting in clara.config, and its name in the
`loss_terms` of the stages that train with it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from clara.model.topk import retrieval_loss
from clara.stages import Stage


@dataclass(frozen=True)
class LossTerm:
    name: str
    metric: str  # the metrics.jsonl key of its mean over the micro-batches that computed it
    short: str  # its name on the progress bar
    # (model, batch, step output) -> the term, or None where this batch has none. Runs after the LM loss.
    compute: Callable[[object, object, object], torch.Tensor | None]
    # Measured by ClaraModel.compress while it makes the memory states (in StepOutput.terms before `compute`),
    # so that a weight of 0 also spares the measurement.
    measured_while_compressing: bool = False

    @property
    def weight_setting(self) -> str:
        return f"{self.name}_weight"


def compressor_mse(model, batch, out) -> torch.Tensor | None:
    # Measured on the memory states while the compressor makes them (ClaraModel.decoder_inputs).
    return out.terms.get("mse")


def query_retrieval(model, batch, out) -> torch.Tensor | None:
    """Stage 2: cross-entropy of the retrieval scores towards pos_index (None when no record has one)."""
    if out.scores is None:
        return None
    return retrieval_loss(out.scores, batch.pos_index, model.settings.topk_temperature)


# In the order they are added to the loss, and logged.
LOSS_TERMS: tuple[LossTerm, ...] = (
    LossTerm("mse", "mse_loss", "mse", compressor_mse, measured_while_compressing=True),
    LossTerm("retrieval", "retrieval_loss", "retrieval", query_retrieval),
)
WEIGHT_SETTINGS = tuple(term.weight_setting for term in LOSS_TERMS)


def stage_weights(stage: Stage, configured: Mapping[str, float]) -> dict[str, float]:
    """Every term's weight by weight setting (the keywords of ClaraModel.forward): the configured one for the
    stage's own terms, 0 for the others. `configured` maps each weight setting to its value."""
    return {
        term.weight_setting: configured[term.weight_setting] if term.name in stage.loss_terms else 0.0
        for term in LOSS_TERMS
    }
