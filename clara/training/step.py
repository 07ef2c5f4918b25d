"""One optimizer step: the data order that feeds it, its micro-batches' forwards and backwards, and what
it adds up by name (`StepSums`), which the trainer reduces over the ranks into the step's metrics line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from clara.model.collate import Batch
from clara.model.losses import LOSS_TERMS
from clara.model.model import StepOutput
from clara.parallel.distributed import gathered


# -- data order -------------------------------------------------------------------------------------------
def epoch_order(num_samples: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(num_samples, generator=generator).tolist()


def micro_batch_indices(
    order: list[int], step_in_epoch: int, micro: int, rank: int, world: int, batch_size: int, micro_batch_size: int
) -> list[int]:
    """The samples of one rank's micro-batch: each optimizer step takes the next batch_size of the order."""
    start = step_in_epoch * batch_size + (micro * world + rank) * micro_batch_size
    return order[start : start + micro_batch_size]


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    # Dropout is seeded from the position in the run, so a resumed run draws what the uninterrupted one drew.
    return (seed * 1_000_003 + step * 10_007 + micro * 101 + rank) % (2**63)


# -- what a step adds up ----------------------------------------------------------------------------------
SUM_NAMES: tuple[str, ...] = (
    "lm_loss",
    # each loss term of clara.model.losses: its sum, and the micro-batches that computed it (retrieval: those
    # with a record with pos_index)
    *(name for term in LOSS_TERMS for name in (term.name, f"{term.name}_batches")),
    "finite_batches",  # micro-batches whose loss was finite
    "tokens",  # tokens the model read: decoder prompt and answer, documents, questions
    "correct_tokens",  # answer tokens whose argmax prediction was the gold token
    "answer_tokens",
    "stop_requests",  # ranks that received SIGTERM / SIGINT
    "diverged_ranks",  # ranks whose trained weights hold inf or NaN after the step
)


@dataclass
class StepSums:
    """What a step adds up over its micro-batches (and, all-reduced, over the ranks), by the names of
    SUM_NAMES: `sums["lm_loss"]`, `sums["retrieval_batches"]`, ..."""

    values: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SUM_NAMES, 0.0))

    def __getitem__(self, name: str) -> float:
        try:
            return self.values[name]
        except KeyError:
            raise KeyError(f"StepSums has no {name!r}: expected one of {', '.join(SUM_NAMES)}") from None

    def all_reduced(self, device: torch.device) -> StepSums:
        total = torch.tensor([self.values[name] for name in SUM_NAMES], dtype=torch.float64, device=device)
        dist.all_reduce(total)
        return StepSums(dict(zip(SUM_NAMES, total.tolist())))


class DeviceSums:
    """StepSums added up on the device, with no .item() per summed value."""

    def __init__(self, device: torch.device):
        self.zero = torch.zeros((), dtype=torch.float64, device=device)
        self.total = torch.zeros(len(SUM_NAMES), dtype=torch.float64, device=device)

    def add(self, values: dict[str, torch.Tensor]) -> None:
        unknown = set(values) - set(SUM_NAMES)
        if unknown:
            raise KeyError(f"unknown step sums {sorted(unknown)}")
        self.total += torch.stack([values[name].double() if name in values else self.zero for name in SUM_NAMES])

    def sums(self) -> StepSums:
        return StepSums(dict(zip(SUM_NAMES, self.total.tolist())))


def micro_batch_sums(batch: Batch, out: StepOutput) -> dict[str, torch.Tensor]:
    """What one finite micro-batch adds to the step's sums."""
    device = out.lm.loss.device
    one = torch.ones((), device=device)
    values = {
        "lm_loss": out.lm.loss.detach(),
        "finite_batches": one,
        "tokens": torch.tensor(batch.num_tokens, device=device),
        "correct_tokens": (out.lm.logits.argmax(-1) == out.lm.targets).sum(),
        "answer_tokens": torch.tensor(out.lm.targets.numel(), device=device),
    }
    for name, value in out.terms.items():
        values[name] = value.detach()
        values[f"{name}_batches"] = one
    return values


def term_means(sums: StepSums, skipped: bool) -> dict[str, float | None]:
    """Each loss term's metrics.jsonl value: its mean over the micro-batches that computed it, else None."""
    means = {}
    for term in LOSS_TERMS:
        batches = sums.values[f"{term.name}_batches"]
        means[term.metric] = sums.values[term.name] / batches if batches and not skipped else None
    return means


# -- the step ---------------------------------------------------------------------------------------------
@dataclass
class StepResult:
    sums: StepSums  # this rank's
    skipped: bool
    chosen: list[list[int]] = field(default_factory=list)  # stage 2: each sample's chosen candidates
    positives: list[list[int] | None] = field(default_factory=list)


def _zero_backward(engine) -> None:
    """Backward of a zero loss touching every trained parameter, so that ZeRO's gradient hooks still fire
    (under ZeRO-3 with the parameters gathered: outside a forward each rank holds only its shard)."""
    trained = [p for p in engine.module.parameters() if p.requires_grad]
    with gathered(trained):
        engine.backward(sum(p.sum() for p in trained) * 0.0)


def optimizer_step(
    engine,
    optimizer,
    batches: list[Batch],
    seeds: list[int],
    on_first: Callable[[Batch, StepOutput], None] | None = None,
    loss_scaled: bool = False,
    **weights: float,
) -> StepResult:
    """Forward and backward every micro-batch of one optimizer step, then step.

    The loss weights (`<term>_weight`: clara.model.losses) go to the model's forward.
    A non-finite loss on any rank replaces that micro-batch's backward by a zero one and runs the
    optimizer step at learning rate 0, so the weights stay as they were. With fp16 loss scaling
    (`loss_scaled`) DeepSpeed's scaler handles overflows itself: it skips the step and lowers the scale.
    """
    sums = DeviceSums(batches[0].dec_ids.device)
    result = StepResult(sums=StepSums(), skipped=False)
    for micro, (batch, seed) in enumerate(zip(batches, seeds)):
        torch.manual_seed(seed)
        try:
            out = engine(batch, **weights)
            finite = torch.isfinite(out.loss.detach()).float()
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if loss_scaled or finite.item() == 1.0:
                engine.backward(out.loss)
                sums.add(micro_batch_sums(batch, out))
            else:
                result.skipped = True
                _zero_backward(engine)
            if result.skipped and engine.is_gradient_accumulation_boundary():
                for group in optimizer.param_groups:
                    group["lr"] = 0.0  # the schedule sets the next step's rate again
            engine.step()
        except torch.OutOfMemoryError as error:
            raise RuntimeError(
                "Out of memory. Lower MICRO_BATCH_SIZE (raise the gradient accumulation instead), set "
                "GRADIENT_CHECKPOINTING=true, or lower MAX_LEN / DOC_MAX_LENGTH."
            ) from error
        if out.chosen is not None:
            result.chosen += out.chosen.tolist()
            result.positives += batch.pos_index
        if micro == 0 and on_first is not None:
            on_first(batch, out)
    result.sums = sums.sums()
    return result


def grad_norm(engine) -> float | None:
    """The DeepSpeed engine's gradient norm of the last step (None where it keeps none)."""
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)
