"""Retrieval scores and the differentiable top-k of stage 2 (README: "How CLaRa reads a document")."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_scores(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """queries [B, D], candidates [B, N, D] -> cosine similarities [B, N]."""
    return torch.einsum("bd,bnd->bn", F.normalize(queries, dim=-1), F.normalize(candidates, dim=-1))


def differentiable_topk(
    scores: torch.Tensor, k: int, temperature: float, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight-through top-k.

    scores [B, N] (and an optional boolean mask of valid candidates) -> indices [B, k] of the k
    highest scores in order, and slot weights [B, k, N]. The forward value of slot j is one-hot on
    its choice; its gradient is that of slot j's softmax(score / temperature) over the candidates
    not taken by slots 0..j-1.
    """
    masked = scores if valid is None else scores.masked_fill(~valid, float("-inf"))
    indices = masked.topk(k, dim=-1).indices
    taken = torch.zeros_like(scores, dtype=torch.bool) if valid is None else ~valid
    weights = []
    for slot in range(k):
        soft = torch.softmax((scores / temperature).masked_fill(taken, float("-inf")), dim=-1)
        hard = F.one_hot(indices[:, slot], scores.shape[-1]).to(soft.dtype)
        weights.append(hard + soft - soft.detach())
        taken = taken | hard.bool()
    return indices, torch.stack(weights, dim=1)


def retrieval_loss(scores: torch.Tensor, positives: list[list[int] | None], temperature: float) -> torch.Tensor | None:
    """Cross-entropy of softmax(scores / temperature) over each record's candidates towards its positives.

    scores [B, N] with -inf at padding; a record with several positives counts their probabilities
    together. Records without positives are left out; None when no record has any.
    """
    rows = [i for i, wanted in enumerate(positives) if wanted]
    if not rows:
        return None
    log_probs = torch.log_softmax(scores[rows].float() / temperature, dim=-1)
    is_positive = torch.zeros_like(log_probs, dtype=torch.bool)
    for row, i in enumerate(rows):
        is_positive[row, positives[i]] = True
    return -torch.logsumexp(log_probs.masked_fill(~is_positive, float("-inf")), dim=-1).mean()
