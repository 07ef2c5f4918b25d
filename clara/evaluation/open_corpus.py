"""Open-corpus evaluation: retrieval over the whole index against each question's gold ids, and the answers
generated from the stored vectors."""

from __future__ import annotations

from clara.evaluation.metrics import ANSWER_METRICS, retrieval_summary
from clara.index.answer import answer_from_index
from clara.index.passages import document_of
from clara.index.store import CorpusIndex
from clara.model.model import ClaraModel


def as_gold(retrieved: list[str], gold: list[str] | None) -> list[str]:
    """Retrieved ids with a passage of a gold document (`guide.md#3` for gold `guide.md`) named by the document,
    so that a corpus indexed in passages is scored against the documents its questions name."""
    wanted = set(gold or ())
    return [document_of(r) if r not in wanted and document_of(r) in wanted else r for r in retrieved]


def open_corpus_summary(
    model: ClaraModel,
    index: CorpusIndex,
    questions: list[str],
    answers: list[str],
    gold_ids: list[list[str] | None],
    generate_limit: int,
    ks: tuple[int, ...] = (1, 3, 5),
    **answer_kwargs,
) -> tuple[dict, list[dict]]:
    """Recall@k over the whole index against gold_ids, and EM / F1 / cover-EM of the answers generated from it
    (the first generate_limit questions). Returns the summary and per-question rows."""
    head = answer_from_index(model, index, questions[:generate_limit], retrieve=max(ks), **answer_kwargs)
    rest = answer_from_index(
        model, index, questions[generate_limit:], retrieve=max(ks), generate=False, **answer_kwargs
    )
    ranked = head.ids + rest.ids
    summary: dict = {"documents": index.documents}
    retrieval = retrieval_summary([as_gold(r, g) for r, g in zip(ranked, gold_ids)], gold_ids, ks)
    summary.update(
        sorted(retrieval.items(), key=lambda kv: (not kv[0].startswith("recall@"), not kv[0].startswith("precision@")))
    )
    rows = []
    for i, question in enumerate(questions):
        row = {
            "index": i,
            "question": question,
            "answer": answers[i],
            "retrieved": ranked[i],
            "gold_ids": gold_ids[i],
            "prediction": head.answers[i] if i < generate_limit else None,
        }
        if row["prediction"] is not None:
            row.update({name: score(row["prediction"], answers[i]) for name, score in ANSWER_METRICS.items()})
        rows.append(row)
    generated = rows[:generate_limit]
    for key in ANSWER_METRICS:
        summary[key] = sum(r[key] for r in generated) / len(generated) if generated else float("nan")
    summary["generated"] = len(generated)
    return summary, rows
