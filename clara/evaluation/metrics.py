"""Answer and retrieval metrics: EM, F1, cover-EM, recall/precision@k.

All scores are fractions in [0, 1]. The answer metrics follow the official CLaRa evaluation, so
that numbers compare with the paper:

- normalisation: an answer that is exactly "True" or "False" reads as "yes" / "no"; then SQuAD's
  rules (lower case, ASCII punctuation deleted, articles dropped, whitespace collapsed);
- exact_match: the normalised prediction equals the normalised gold answer;
- f1: token-level F1, except that it is 0 when the prediction or the gold answer is "yes", "no" or
  "noanswer" and the two differ (a yes/no answer is right or wrong, never half right);
- cover_exact_match: every normalised gold token appears among the prediction's tokens, in any
  order (so an empty gold answer is covered by every prediction).

Each of these scores one gold answer. `answer_scores` gives them against the first gold answer (what
the paper reports) and, as `<name>_any`, their best over all gold answers (how NQ-style sets with
several answers are usually scored).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

__all__ = [
    "normalize_answer",
    "exact_match",
    "f1_score",
    "cover_exact_match",
    "ANSWER_METRICS",
    "ANSWER_SCORE_NAMES",
    "answer_scores",
    "recall_at_k",
    "precision_at_k",
    "retrieval_summary",
]

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# The official evaluation maps only these two exact strings, before any normalisation.
_BOOLEAN_ANSWERS = {"True": "yes", "False": "no"}
# F1 gives no partial credit between these and anything else.
_CLOSED_ANSWERS = frozenset({"yes", "no", "noanswer"})


def normalize_answer(s: str) -> str:
    """Map exact True/False to yes/no, then lower case, drop punctuation and articles, collapse whitespace."""
    text = _BOOLEAN_ANSWERS.get(s, s).lower()
    # SQuAD deletes punctuation rather than spacing it ("don't" -> "dont").
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 if the normalised prediction equals the normalised gold answer, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token-level F1 of the prediction against the gold answer; 0 for a differing yes/no/noanswer."""
    pred, truth = normalize_answer(prediction), normalize_answer(gold)
    if (pred in _CLOSED_ANSWERS or truth in _CLOSED_ANSWERS) and pred != truth:
        return 0.0
    pred_tokens, gold_tokens = pred.split(), truth.split()
    # Empty on either side shares no token, so it scores 0 (an empty pair too, as officially).
    overlap = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def cover_exact_match(prediction: str, gold: str) -> float:
    """1.0 if every normalised gold token appears among the prediction's tokens (any order), else 0.0."""
    pred_tokens = set(normalize_answer(prediction).split())
    return float(all(token in pred_tokens for token in normalize_answer(gold).split()))


ANSWER_METRICS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "f1": f1_score,
    "cover_exact_match": cover_exact_match,
}
# The keys of answer_scores, in order: first-gold scores, then best-over-all-golds scores.
ANSWER_SCORE_NAMES = (*ANSWER_METRICS, *(f"{name}_any" for name in ANSWER_METRICS))


def answer_scores(prediction: str, answers: Sequence[str]) -> dict[str, float]:
    """Every answer metric against the first gold answer, then `<name>_any`: the best over all of them."""
    if isinstance(answers, str) or not answers:
        raise ValueError(f"answers: expected a non-empty list of gold answers, got {answers!r}")
    per_gold = {name: [metric(prediction, gold) for gold in answers] for name, metric in ANSWER_METRICS.items()}
    first = {name: scores[0] for name, scores in per_gold.items()}
    best = {f"{name}_any": max(scores) for name, scores in per_gold.items()}
    return {**first, **best}


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


def precision_at_k(chosen: Sequence[int], positives: Sequence[int] | None, k: int) -> float | None:
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
        raise ValueError(f"chosen_lists has {len(chosen_lists)} samples, positives_lists {len(positives_lists)}")
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
