"""From the documents' synthesized pairs to a training file for every stage in `clara.stages.STAGES`, named
after the stage and made by its record schema, with a held-out split; and the run's summary. Today's stages:

    stage1.jsonl     per document: a QA record with all its pairs, and a paraphrase record
    stage1_2.jsonl   per question: its document among `stage1_2_docs` documents (the others retrieved for it)
    stage2.jsonl     per question: `candidates` documents, the positive at `pos_index`, `gold_ids`, the answer
    *_eval.jsonl     the same for the held-out documents (a share of the corpus chosen by a hash of their ids)

Distractors are the documents BM25 (the bm25s package) ranks highest for the question, other than its own;
the positive's place among them is drawn from a hash of the question, so every rerun writes the same files.
A question asked of an earlier document too is dropped as a duplicate.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass

import bm25s
import numpy as np

from clara.files import write_jsonl_atomic
from clara.stages import STAGES, Stage
from clara.synthesis.documents import PAIR_TASKS
from clara.synthesis.recipe import question_key


@dataclass(frozen=True)
class Layout:
    eval_fraction: float
    stage1_2_docs: int
    candidates: int
    seed: int


def _hash(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big")


def held_out_ids(ids: list[str], fraction: float, seed: int) -> set[str]:
    """round(fraction x documents) documents (at least one when fraction > 0 and there are two), by id hash."""
    if fraction <= 0 or len(ids) < 2:
        return set()
    count = min(len(ids) - 1, max(1, round(fraction * len(ids))))
    return set(sorted(ids, key=lambda i: _hash(seed, "eval", i))[:count])


def retrieve(texts: list[str], questions: list[str], k: int) -> np.ndarray:
    """The `k` corpus rows BM25 ranks highest for each question, best first: [questions, k]."""
    if not questions:
        return np.zeros((0, k), dtype=np.int64)
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    query_tokens = bm25s.tokenize(questions, stopwords="en", return_ids=False, show_progress=False)
    rows, _ = retriever.retrieve(query_tokens, k=k, show_progress=False, n_threads=1)
    return np.asarray(rows)


def _with_positive(positive: int, ranked, count: int, where: int) -> list[int]:
    """`count` rows: the best `count - 1` of `ranked` other than `positive`, with `positive` at `where`."""
    rows = [int(r) for r in ranked if int(r) != positive][: count - 1]
    rows.insert(where % count, positive)
    return rows


def _kept_pairs(results: list[dict]) -> tuple[list[tuple[str, list[tuple[str, str]], str | None]], Counter]:
    """Per document (id, its (question, answer) pairs, its paraphrase), a question asked of an earlier document
    dropped; and the duplicates dropped per document id."""
    seen: set[str] = set()
    duplicates: Counter = Counter()
    documents = []
    for result in results:
        pairs = []
        for question, answer in (pair for task in PAIR_TASKS for pair in result["pairs"][task]):
            key = question_key(question)
            if key in seen:
                duplicates[result["id"]] += 1
                continue
            seen.add(key)
            pairs.append((question, answer))
        documents.append((result["id"], pairs, result["paraphrase"]))
    return documents, duplicates


def _document_records(documents, row_of: dict[str, int], texts: list[str]):
    """The "stage1" schema: (doc id, record) for a QA record with all of a document's pairs, then its
    paraphrase; a document without pairs gives none."""
    for doc_id, pairs, paraphrase in documents:
        if not pairs:
            continue
        text = texts[row_of[doc_id]]
        yield (
            doc_id,
            {"data_type": "qa", "question": [q for q, _ in pairs], "answers": [a for _, a in pairs], "docs": [text]},
        )
        if paraphrase:
            yield doc_id, {"data_type": "paraphrase", "docs": [text], "answers": [paraphrase]}


def _question_records(stage: Stage, questions, ranked, row_of: dict[str, int], ids, texts, layout: Layout):
    """The "answer" schema: (doc id, record) per question. With a query reasoner (`stage.uses_query`) the
    positive sits among `candidates` documents and the record names the ids; else among `stage1_2_docs`."""
    candidates = min(layout.candidates, len(ids))
    count = candidates if stage.uses_query else min(layout.stage1_2_docs, candidates)
    for (doc_id, question, answer), hits in zip(questions, ranked):
        positive = row_of[doc_id]
        rows = _with_positive(positive, hits, count, _hash(layout.seed, "place", question))
        docs = [texts[r] for r in rows]
        if not stage.uses_query:
            yield doc_id, {"question": question, "answers": answer, "docs": docs, "pos_index": [rows.index(positive)]}
            continue
        yield (
            doc_id,
            {
                "question": question,
                "docs": docs,
                "gold_answer": answer,
                "pos_index": [rows.index(positive)],
                "gold_ids": [doc_id],
                "doc_ids": [ids[r] for r in rows],
            },
        )


def build_records(ids: list[str], texts: list[str], results: list[dict], layout: Layout) -> tuple[dict, Counter]:
    """{file name: records} for every registered stage (the file named after it) and its held-out file, and
    the duplicates dropped per document id."""
    held_out = held_out_ids(ids, layout.eval_fraction, layout.seed)
    row_of = {doc_id: row for row, doc_id in enumerate(ids)}
    documents, duplicates = _kept_pairs(results)
    questions = [(doc_id, q, a) for doc_id, pairs, _ in documents for q, a in pairs]  # (doc id, question, answer)
    ranked = retrieve(texts, [q for _, q, _ in questions], min(min(layout.candidates, len(ids)) + 1, len(ids)))
    files: dict[str, list[dict]] = {}
    for stage in STAGES.values():
        if stage.schema == "stage1":
            records = _document_records(documents, row_of, texts)
        else:
            records = _question_records(stage, questions, ranked, row_of, ids, texts, layout)
        files[stage.name], files[stage.name + "_eval"] = [], []
        for doc_id, record in records:
            files[stage.name + ("_eval" if doc_id in held_out else "")].append(record)
    return files, duplicates


def write_records(out: str, files: dict[str, list[dict]]) -> dict[str, int]:
    """Write every non-empty file (atomically) and remove an earlier run's file that is now empty; returns
    {file: records}."""
    written = {}
    for name, records in files.items():
        path = os.path.join(out, f"{name}.jsonl")
        if records:
            write_jsonl_atomic(path, records)
            written[f"{name}.jsonl"] = len(records)
        elif os.path.exists(path):
            os.remove(path)
    return written


def document_outcome(result: dict, duplicates: int) -> str:
    """ "with_pairs", or why a document gave no pair."""
    kept = sum(len(result["pairs"][task]) for task in PAIR_TASKS) - duplicates
    if kept > 0:
        return "with_pairs"
    if result["answered_outputs"] == 0:
        return "no_valid_output"
    return "all_pairs_filtered" if result["proposed_pairs"] else "no_pairs"


def summarize(results: list[dict], duplicates: Counter, written: dict[str, int]) -> dict:
    """What the run made and what it cost, as summary.json holds it."""
    outcome_of = {r["id"]: document_outcome(r, duplicates[r["id"]]) for r in results}
    outcomes = Counter(outcome_of.values())
    rejected = sum((Counter(r["rejected"]) for r in results), Counter())
    rejected["duplicate"] += sum(duplicates.values())
    pairs = {task: sum(len(r["pairs"][task]) for r in results) for task in PAIR_TASKS}
    total_pairs = sum(pairs.values()) - sum(duplicates.values())
    documents = len(results)
    retried = sum((Counter(r["retried"]) for r in results), Counter())
    counts = {
        key: sum(r[key] for r in results)
        for key in ("requests", "malformed_retried", "prompt_tokens", "completion_tokens", "coverage_rounds")
    }
    return {
        "documents": documents,
        "documents_with_pairs": outcomes.pop("with_pairs", 0),
        "documents_rejected": dict(sorted(outcomes.items())),
        "pairs": total_pairs,
        "pairs_by_task": pairs,
        "pairs_per_document": round(total_pairs / documents, 3) if documents else 0.0,
        # Written for the documents with pairs only: a document is trained on with both or not at all.
        "paraphrases": sum(r["paraphrase"] is not None and outcome_of[r["id"]] == "with_pairs" for r in results),
        "rejected": dict(sorted((k, v) for k, v in rejected.items() if v)),
        "malformed_retried": counts["malformed_retried"],
        "coverage_rounds": counts["coverage_rounds"],
        "coverage_rounds_per_document": round(counts["coverage_rounds"] / documents, 3) if documents else 0.0,
        "requests": {
            "answered": counts["requests"],
            "retried": dict(sorted(retried.items())),
            "per_document": round(counts["requests"] / documents, 3) if documents else 0.0,
        },
        "tokens": {
            "prompt": counts["prompt_tokens"],
            "completion": counts["completion_tokens"],
            "per_document": round((counts["prompt_tokens"] + counts["completion_tokens"]) / documents, 1)
            if documents
            else 0.0,
        },
        "files": written,
    }
