"""Answer and retrieval metrics: EM, F1, cover-EM, recall/precision@k, token accuracy.

All scores are fractions in [0, 1]. Answer normalisation follows SQuAD so that numbers
compare with published results, plus one rule: a whole answer of "true"/"false" reads as
"yes"/"no".
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import torch

__all__ = [
    "normalize_answer",
    "exact_match",
    "f1_score",
    "cover_exact_match",
    "recall_at_k",
    "precision_at_k",
    "retrieval_summary",
    "token_accuracy",
    "qa_summary",
]

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# Models answer boolean questions with either word; gold data mostly says yes/no.
_BOOLEAN_WORDS = {"true": "yes", "false": "no"}


def normalize_answer(s: str) -> str:
    """Lower case, drop ASCII punctuation and articles, collapse whitespace, map true/false."""
    text = s.lower()
    # SQuAD deletes punctuation rather than spacing it ("don't" -> "dont"); keep that
    # so scores stay comparable with other implementations.
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    text = " ".join(text.split())
    return _BOOLEAN_WORDS.get(text, text)


def _gold_list(answers: str | Sequence[str]) -> list[str]:
    """Accept one gold answer or several."""
    if isinstance(answers, str):
        return [answers]
    return list(answers)


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals some normalised gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return max((float(pred == normalize_answer(g)) for g in _gold_list(answers)), default=0.0)


def _f1_tokens(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    """Token-level F1 of one prediction against one gold answer."""
    if not pred_tokens or not gold_tokens:
        # Both empty is a correct "no answer"; one empty shares nothing with the other.
        return float(pred_tokens == gold_tokens)
    overlap = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, answers: str | Sequence[str]) -> float:
    """Best token-level F1 of the prediction over the gold answers."""
    pred_tokens = normalize_answer(prediction).split()
    return max(
        (_f1_tokens(pred_tokens, normalize_answer(g).split()) for g in _gold_list(answers)),
        default=0.0,
    )


def _contains_span(tokens: list[str], span: list[str]) -> bool:
    """Whether span occurs as a contiguous run of whole tokens in tokens."""
    n = len(span)
    return any(tokens[i : i + n] == span for i in range(len(tokens) - n + 1))


def cover_exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 if some normalised gold answer occurs as a whole-token span of the prediction."""
    pred_tokens = normalize_answer(prediction).split()
    for gold in _gold_list(answers):
        gold_tokens = normalize_answer(gold).split()
        # An empty gold would be "contained" in every prediction; only an empty
        # prediction should match it.
        if not gold_tokens:
            if not pred_tokens:
                return 1.0
            continue
        if _contains_span(pred_tokens, gold_tokens):
            return 1.0
    return 0.0


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def recall_at_k(chosen: Sequence[int], positives: Sequence[int] | None, k: int) -> float | None:
    """Share of the positives found among the first k chosen indices; None without positives."""
    _check_k(k)
    if not positives:
        return None
    wanted = set(positives)
    return len(wanted.intersection(chosen[:k])) / len(wanted)


def precision_at_k(
    chosen: Sequence[int], positives: Sequence[int] | None, k: int
) -> float | None:
    """Share of the first k chosen indices that are positives; None without positives."""
    _check_k(k)
    if not positives:
        return None
    top = list(chosen[:k])
    if not top:
        return 0.0
    wanted = set(positives)
    return sum(1 for i in top if i in wanted) / len(top)


def retrieval_summary(
    chosen_lists: Sequence[Sequence[int]],
    positives_lists: Sequence[Sequence[int] | None],
    ks: Sequence[int] = (1, 3, 5),
) -> dict[str, float | int]:
    """Mean recall@k and precision@k over samples that have positives.

    A sample counts for a given k only when it chose at least k documents, so that
    recall@5 is not reported from runs that selected 3. Keys with no counted sample are
    left out. `retrieval_samples` counts samples with positives; `retrieval_skipped`
    those without (no or empty pos_index).
    """
    if len(chosen_lists) != len(positives_lists):
        raise ValueError(
            f"chosen_lists has {len(chosen_lists)} samples, positives_lists {len(positives_lists)}"
        )
    for k in ks:
        _check_k(k)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    samples = 0
    skipped = 0
    for chosen, positives in zip(chosen_lists, positives_lists):
        if not positives:
            skipped += 1
            continue
        samples += 1
        for k in ks:
            if k > len(chosen):
                continue
            for name, fn in (("recall", recall_at_k), ("precision", precision_at_k)):
                key = f"{name}@{k}"
                sums[key] = sums.get(key, 0.0) + fn(chosen, positives, k)
                counts[key] = counts.get(key, 0) + 1
    summary: dict[str, float | int] = {key: sums[key] / counts[key] for key in sums}
    summary["retrieval_samples"] = samples
    summary["retrieval_skipped"] = skipped
    return summary


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, total) of argmax(logits) == labels over aligned rows; -100 labels are ignored."""
    if logits.dim() != 2 or labels.dim() != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"expected logits [N, V] and labels [N], got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    with torch.no_grad():
        # Tolerate the usual ignore index so a caller that forgot to mask does not
        # count padding or prompt positions.
        mask = labels != -100
        correct = (logits.argmax(dim=-1) == labels) & mask
        return int(correct.sum().item()), int(mask.sum().item())


def qa_summary(
    predictions: Sequence[str], answers: Sequence[str | Sequence[str]]
) -> dict[str, float | int]:
    """Mean exact_match, f1 and cover_exact_match over samples, plus `count`.

    With no samples the means are 0.0 and count is 0.
    """
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answers")
    count = len(predictions)
    totals = {"exact_match": 0.0, "f1": 0.0, "cover_exact_match": 0.0}
    for pred, gold in zip(predictions, answers):
        totals["exact_match"] += exact_match(pred, gold)
        totals["f1"] += f1_score(pred, gold)
        totals["cover_exact_match"] += cover_exact_match(pred, gold)
    summary: dict[str, float | int] = {
        key: (value / count if count else 0.0) for key, value in totals.items()
    }
    summary["count"] = count
    return summary
