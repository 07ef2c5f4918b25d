"""The loss terms a training step adds to the generator's LM loss, each one named once.

A term's name is everything about it: its weight setting is `<name>_weight` (a TrainConfig field and
the keyword `ClaraModel.forward` takes), its value is `StepOutput.terms[<name>]`, its step sums are
`<name>` and `<name>_batches` (clara.training.step), and its metrics.jsonl key and console name are below. A new
loss is a function here that computes it from the step's output, one `LossTerm` in `LOSS_TERMS`, and its
weight setting in clara.config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from clara.model.topk import retrieval_loss
from clara.stages import Stage


@dataclass(frozen=True)
class LossTerm:
    name: str
    metric: str  # the metrics.jsonl key of its mean over the micro-batches that computed it
    short: str  # its name on the progress bar
    used_by: Callable[[Stage], bool]  # a stage without the term trains with its weight at 0
    # (model, batch, step output) -> the term, or None where this batch has none. Runs after the LM loss.
    compute: Callable[[object, object, object], torch.Tensor | None]

    @property
    def weight_setting(self) -> str:
        return f"{self.name}_weight"

    def weight(self, cfg, stage: Stage) -> float:
        """The configured weight, or 0 for a stage without this term."""
        return getattr(cfg, self.weight_setting) if self.used_by(stage) else 0.0


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
    LossTerm("mse", "mse_loss", "mse", lambda stage: stage.uses_mse, compressor_mse),
    LossTerm("retrieval", "retrieval_loss", "retrieval", lambda stage: stage.uses_query, query_retrieval),
)
WEIGHT_SETTINGS = tuple(term.weight_setting for term in LOSS_TERMS)


def stage_weights(cfg, stage: Stage) -> dict[str, float]:
    """Every term's weight for `stage`, by weight setting: the keywords of ClaraModel.forward."""
    return {term.weight_setting: term.weight(cfg, stage) for term in LOSS_TERMS}
