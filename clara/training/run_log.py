"""Rank-0 output of a training run: console lines, metrics.jsonl and the optional TensorBoard / W&B sinks."""

from __future__ import annotations

import json
import os
import resource
import sys

import torch
from tqdm import tqdm

from clara.config import ConfigError
from clara.files import json_safe
from clara.model.losses import LOSS_TERMS


class RunLog:
    """Rank-0 output: console lines, metrics.jsonl and the optional TensorBoard / W&B sinks."""

    def __init__(
        self,
        save_path: str,
        rank: int,
        use_tensorboard: bool = False,
        wandb_project: str | None = None,
        settings: dict | None = None,
    ):
        """Rank 0 writes into `save_path`; with `wandb_project` (USE_WANDB) also to a W&B run of that project,
        which records `settings` (every setting of the run, as plain data)."""
        self.enabled = rank == 0
        self.tensorboard = None
        self.wandb = None
        if not self.enabled:
            return
        os.makedirs(save_path, exist_ok=True)
        self.metrics_path = os.path.join(save_path, "metrics.jsonl")
        if use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "use_tensorboard", True, "the tensorboard package installed: pip install tensorboard"
                ) from None
            self.tensorboard = SummaryWriter(os.path.join(save_path, "tensorboard"))
        if wandb_project is not None:
            try:
                import wandb
            except ImportError:
                raise ConfigError("use_wandb", True, "the wandb package installed: pip install wandb") from None
            self.wandb = wandb.init(project=wandb_project, config=settings, dir=save_path)

    def print(self, *parts) -> None:
        if self.enabled:
            tqdm.write(" ".join(str(p) for p in parts), file=sys.stdout)
            sys.stdout.flush()

    def metrics(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as out:
            out.write(json.dumps(json_safe(record)) + "\n")
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tensorboard:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, record["step"])
        if self.wandb:
            self.wandb.log(numbers, step=record["step"])

    def close(self) -> None:
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def progress_bar(total_steps: int, done: int, stage_name: str) -> tqdm:
    """Rank 0's progress bar of the run, on stderr (the console lines go to stdout)."""
    return tqdm(total=total_steps, initial=done, desc=stage_name, dynamic_ncols=True, file=sys.stderr)


def show_step(progress: tqdm, metrics: dict) -> None:
    """One step done on the progress bar, with its loss, rate, throughput and each computed loss term."""
    progress.update(1)
    shown = {
        "loss": f"{metrics['loss']:.4f}",
        "lr": f"{metrics['lr']:.2e}",
        "samples/s": f"{metrics['samples_per_s']:.1f}",
        "tokens/s": f"{metrics['tokens_per_s']:.0f}",
    }
    for term in LOSS_TERMS:
        if metrics[term.metric] is not None:
            shown[term.short] = f"{metrics[term.metric]:.4f}"
    progress.set_postfix(shown, refresh=False)
