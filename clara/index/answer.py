"""Answering from an index: the query reasoner encodes each question, the search finds its documents, and the
generator reads their stored vectors, never their text."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from clara.data.records import normalise
from clara.errors import CheckpointError, CorpusIndexError
from clara.index.search import normalised_rows
from clara.index.store import CorpusIndex
from clara.model.collate import Batch, Collator, encode_documents
from clara.model.model import ClaraModel, eval_mode
from clara.stages import QUERY_REASONER, stage2


@dataclass
class IndexAnswers:
    answers: list[str]
    ids: list[list[str]]  # per question, the retrieved document ids in rank order
    rows: list[list[int]]  # the same as rows of the index
    scores: list[list[float]]  # their cosine scores


@torch.no_grad()
def encode_questions(model: ClaraModel, questions: list[str], device: torch.device) -> np.ndarray:
    """The query reasoner's memory states of the questions, as normalised float32 rows."""
    ids, mask, _ = encode_documents(model.tokenizer, model.tokens, questions, model.settings.doc_max_length)
    query, _ = model.compress(ids.to(device), mask.to(device), QUERY_REASONER)
    return normalised_rows(query.cpu())


def generator_prompts(model: ClaraModel, questions: list[str], max_len: int, seed: int) -> Batch:
    """The generator's stage-2 prompts for the questions, generation_top_k memory slots each."""
    top_k = model.settings.generation_top_k
    collate = Collator(
        stage2.STAGE,
        model.tokenizer,
        model.tokens,
        model.settings.doc_max_length,
        max_len,
        top_k,
        seed,
        with_targets=False,
    )
    # The documents are compressed already: the prompt needs only how many there are.
    records = [normalise(stage2.STAGE, {"question": q, "answer": "", "docs": [""] * top_k}) for q in questions]
    return collate(records)


def generator_inputs(
    model: ClaraModel, index: CorpusIndex, questions: list[str], rows: list[list[int]], max_len: int, seed: int
) -> tuple[Batch, torch.Tensor]:
    """The generator's stage-2 prompts for the questions, and the stored vectors [slots * n, H] of each
    question's documents (the index rows, generation_top_k per question) for their memory slots."""
    memory = index.memory([row for found in rows for row in found])
    return generator_prompts(model, questions, max_len, seed), memory.reshape(-1, model.hidden_size)


@torch.no_grad()
def answer_from_index(
    model: ClaraModel,
    index: CorpusIndex,
    questions: list[str],
    *,
    retrieve: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    max_len: int = 1024,
    seed: int = 42,
    device: torch.device | None = None,
    generate: bool = True,
) -> IndexAnswers:
    """Retrieve each question's top documents with the query reasoner and answer from their stored vectors.

    The generator reads the first generation_top_k retrieved documents (the checkpoint's prompt has
    that many slots); `retrieve` (default the same) sets how many ids are returned. No document is
    compressed here. The caller checks the index with check_index_matches.
    """
    if QUERY_REASONER not in model.adapter_names:
        raise CheckpointError(
            f"the model has no {QUERY_REASONER}: answering from an index needs a stage2 "
            "checkpoint (or clara.model.stage_model.ensure_query_reasoner)"
        )
    device = device if device is not None else model.mem_embeddings.device
    top_k = model.settings.generation_top_k
    if index.documents < top_k:
        raise CorpusIndexError(
            f"--index {index.path}: {index.documents} documents, fewer than generation_top_k={top_k}"
        )
    retrieve = max(retrieve or top_k, top_k)
    result = IndexAnswers([], [], [], [])
    with eval_mode(model):
        for start in range(0, len(questions), batch_size):
            chunk = list(questions[start : start + batch_size])
            scores, rows = index.search(encode_questions(model, chunk, device), retrieve)
            result.rows += rows.tolist()
            result.scores += scores.tolist()
            result.ids += [[index.ids[r] for r in found] for found in rows.tolist()]
            if not generate:
                continue
            batch, vectors = generator_inputs(model, index, chunk, rows[:, :top_k].tolist(), max_len, seed)
            texts, _ = model.generate(batch.to(device), max_new_tokens=max_new_tokens, vectors=vectors.to(device))
            result.answers += texts
    return result
