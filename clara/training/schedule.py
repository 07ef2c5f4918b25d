"""Learning-rate schedule shared by the trainer and the tiny model's build."""

import math


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int, floor: float) -> float:
    """The learning rate at `step` (counted from 0) as a multiple of the peak.

    Linear warmup reaching the peak at step `warmup_steps - 1`, then half a cosine from the peak
    down to `floor` at `total_steps`, held at `floor` beyond it.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def restart_schedule_at(scheduler, optimizer, peak: float) -> None:
    """Set a restored LambdaLR `scheduler` (and its `optimizer`'s groups) to the peak rate `peak`, at the step
    it was restored at."""
    scheduler.base_lrs = [peak] * len(scheduler.base_lrs)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = peak
        group["lr"] = peak * factor(scheduler.last_epoch)
