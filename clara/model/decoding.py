"""Each answer of a batch decoded its own way: greedy or sampled (temperature, top_p, seed), its own token
limit and stop strings, streamed piece by piece, and cancellable (`ClaraModel.generate(rows=...)`).

They hook into the `transformers` generate loop, which stays greedy for the batch: `RowSampler`, a logits
processor, draws the next token of each sampling row from its own seeded generator and leaves only that
token possible, so the loop's argmax takes it; greedy rows are not touched, so their tokens are the ones
generate gives without rows. `RowWatch`, a stopping criterion called after every token, follows each row's
text: it ends a row at an end token, a stop string, its token limit or its cancellation, and passes the
new text on to a streaming callback. A row that ends stops its own decoding only; the batch goes on.
A row's state (its tokens, text and random generator) lives in its RowDecoding, so a server can decode
a few tokens at a time and let new requests join the batch in between (clara.serving.engine).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, StoppingCriteria


@dataclass(frozen=True)
class Sampling:
    """How one answer is decoded. temperature 0 is greedy; seed None samples from a fresh random seed."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_tokens: int = 0  # the end tokens are not allowed before this many tokens (vLLM's min_tokens)


@dataclass
class RowDecoding:
    """One answer being decoded: its settings, its callbacks, and the answer so far."""

    sampling: Sampling = field(default_factory=Sampling)
    on_text: Callable[[str], None] | None = None  # each new piece of the answer, as it is decoded
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)  # generated tokens, the end token excluded
    text: str = ""  # the answer: stripped, cut before a stop string
    emitted: str = ""  # what on_text has been given (a prefix of the answer)
    finish_reason: str | None = None  # "stop" (end token or stop string), "length" or "cancelled"
    generator: torch.Generator | None = None  # a sampling row's random state, kept between generate calls


def cut_at_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the first stop string starts in text, or None."""
    found = [at for at in (text.find(s) for s in stops if s) if at >= 0]
    return min(found) if found else None


class RowSampler(LogitsProcessor):
    """Samples the next token of each row whose temperature is above 0 (top_p nucleus, seeded per row); keeps
    the end tokens out of rows below their min_tokens."""

    def __init__(self, rows: list[RowDecoding], stop_ids: set[int]):
        self.rows, self.stop_ids = rows, sorted(stop_ids)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        for i, row in enumerate(self.rows):
            if row.finish_reason is not None:
                continue
            if len(row.tokens) < row.sampling.min_tokens:
                scores[i, self.stop_ids] = float("-inf")
            if row.sampling.temperature <= 0:
                continue
            if row.generator is None:
                seed = row.sampling.seed if row.sampling.seed is not None else secrets.randbits(63)
                row.generator = torch.Generator(device=scores.device).manual_seed(seed)
            probs = torch.softmax(scores[i].float() / row.sampling.temperature, dim=-1)
            if row.sampling.top_p < 1.0:
                ranked, order = probs.sort(descending=True)
                keep = ranked.cumsum(0) - ranked < row.sampling.top_p  # the most likely token always stays
                probs = torch.zeros_like(probs).scatter(0, order[keep], ranked[keep])
            token = torch.multinomial(probs, 1, generator=row.generator)
            scores[i] = float("-inf")
            scores[i, token] = 0.0
        return scores


class RowWatch(StoppingCriteria):
    """Follows every row after each generated token; returns which rows are done."""

    def __init__(self, rows: list[RowDecoding], tokenizer, stop_ids: set[int]):
        self.rows, self.tokenizer, self.stop_ids = rows, tokenizer, stop_ids
        # Streamed text holds back what could still become a stop string (and the whitespace the
        # answer's strip may drop), so that the pieces always add up to the final answer.
        self.hold = [max((len(s) for s in r.sampling.stop), default=1) - 1 for r in rows]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        for i, row in enumerate(self.rows):
            if row.finish_reason is None:
                self._advance(i, row, int(input_ids[i, -1]))
        return torch.tensor([row.finish_reason is not None for row in self.rows], device=input_ids.device)

    def _advance(self, i: int, row: RowDecoding, token: int) -> None:
        if row.cancelled.is_set():
            row.finish_reason = "cancelled"
            return
        if token in self.stop_ids:
            row.finish_reason = "stop"
            return
        row.tokens.append(token)
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True).lstrip()
        at = cut_at_stop(text, row.sampling.stop)
        if at is not None:
            row.text, row.finish_reason = text[:at].rstrip(), "stop"
            emit(row, row.text)
            return
        row.text = text.rstrip()
        if len(row.tokens) >= row.sampling.max_new_tokens:
            row.finish_reason = "length"
            return
        safe = text.rstrip().rstrip("\ufffd")  # a partial UTF-8 character decodes as U+FFFD
        emit(row, safe[: len(safe) - self.hold[i]] if self.hold[i] else safe)


def emit(row: RowDecoding, text: str) -> None:
    """Pass on what text adds to what was emitted (nothing where it does not extend it)."""
    if row.on_text is not None and len(text) > len(row.emitted) and text.startswith(row.emitted):
        piece, row.emitted = text[len(row.emitted) :], text
        row.on_text(piece)


def finish(row: RowDecoding) -> None:
    """After a generate call: stream what a finished row held back. A row left with finish_reason None
    has tokens of its budget left; passing its tokens back after its prompt continues it."""
    if row.finish_reason is not None:
        emit(row, row.text)
