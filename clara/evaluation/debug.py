"""The colour-coded confidence print (README: "The debug print"), computed from the training forward's own logits."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

import torch

from clara.model.collate import Batch
from clara.model.model import StepOutput
from clara.stages.prompts import SpecialTokens

RULE = "=" * 80
RESET = "\x1b[0m"


def colour(p: float) -> str:
    """24-bit ANSI foreground from red (p=0) to green (p=1).

    A non-finite p (the logits of a diverged step, which the trainer skips but still prints) shows red.
    """
    p = min(max(p, 0.0), 1.0) if math.isfinite(p) else 0.0
    return f"\x1b[38;2;{round(255 * (1 - p))};{round(255 * p)};0m"


def use_colour() -> bool:
    return "NO_COLOR" not in os.environ


@dataclass
class SampleStats:
    token_ids: list[int]
    probs: list[float]
    correct: int
    ce_loss: float

    @property
    def total(self) -> int:
        return len(self.token_ids)


def sample_stats(out: StepOutput, sample: int = 0) -> SampleStats:
    """P(gold), accuracy and cross-entropy over one sample's answer tokens."""
    rows = out.lm.sample_index == sample
    logits, gold = out.lm.logits[rows].float(), out.lm.targets[rows]
    log_probs = torch.log_softmax(logits, dim=-1)
    gold_log_probs = log_probs.gather(1, gold.unsqueeze(1)).squeeze(1)
    return SampleStats(
        token_ids=gold.tolist(),
        probs=gold_log_probs.exp().tolist(),
        correct=int((logits.argmax(-1) == gold).sum()),
        ce_loss=float(-gold_log_probs.mean()) if gold.numel() else float("nan"),
    )


class DebugPrinter:
    def __init__(self, tokenizer, tokens: SpecialTokens, max_print_tokens: int = 100, stream=None):
        self.tokenizer = tokenizer
        self.tokens = tokens
        self.max_print_tokens = max_print_tokens
        self.stream = stream

    def coloured_answer(self, stats: SampleStats, with_colour: bool) -> str:
        shown = []
        for token_id, p in list(zip(stats.token_ids, stats.probs))[: self.max_print_tokens]:
            text = self.tokenizer.decode([token_id])
            shown.append(f"{colour(p)}{text}{RESET}" if with_colour else f"{text}[{p:.2f}]")
        hidden = stats.total - self.max_print_tokens
        return "".join(shown) + (f"...(+{hidden} tokens)" if hidden > 0 else "")

    def format_sample(self, batch: Batch, out: StepOutput, sample: int = 0) -> str:
        stats = sample_stats(out, sample)
        with_colour = use_colour()
        slots = out.chosen.shape[1] if out.chosen is not None else batch.docs_per_sample[sample]
        accuracy = stats.correct / max(stats.total, 1)
        lines = [
            RULE,
            f"[Debug] CLaRa Training Debug - Sample {sample}",
            RULE,
            f"[Debug] Question: {batch.questions[sample]}",
            f"[Debug] Expected Answer: {batch.answers[sample]}",
        ]
        if out.chosen is not None:
            positives = batch.pos_index[sample] if batch.pos_index else None
            lines.append(f"[Debug] Chosen documents: {out.chosen[sample].tolist()}  pos_index: {positives}")
        lines += [
            "[Debug] Answer metrics",
            f"  token_acc : {accuracy:.2%} ({stats.correct}/{stats.total})",
            f"  ce_loss   : {stats.ce_loss:.6f}",
            "",
            "[Debug] Answer colored by P(gold token) - red=low confidence, green=high confidence:",
            f"<MEM...>*{slots} Question: {batch.questions[sample]}",
            f"Assistant: {self.coloured_answer(stats, with_colour)}",
            RULE,
        ]
        return "\n".join(lines)

    def print_sample(self, batch: Batch, out: StepOutput) -> None:
        from tqdm import tqdm

        stream = self.stream or sys.stdout
        text = self.format_sample(batch, out)
        # Flushed before the progress bar is redrawn: on a pipe or a log file (the launchers' tee,
        # nohup, a batch scheduler) stdout is block-buffered, and the print would otherwise show up
        # long after its step, or be cut in two by the progress bar on stderr.
        with tqdm.external_write_mode(file=stream):
            stream.write(text + "\n")
            stream.flush()
