"""From the documents' synthesized pairs to the three stages' training files, with a held-out split, and the
run's summary.

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
from clara.synthesis.documents import PAIR_TASKS
from clara.synthesis.recipe import question_key

STAGE_FILES = ("stage1", "stage1_2", "stage2")


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


def build_records(ids: list[str], texts: list[str], results: list[dict], layout: Layout) -> tuple[dict, Counter]:
    """{file name: records} for the three stages and their held-out files, and the duplicates dropped per
    document id."""
    held_out = held_out_ids(ids, layout.eval_fraction, layout.seed)
    row_of = {doc_id: row for row, doc_id in enumerate(ids)}
    files: dict[str, list[dict]] = {f"{stage}{suffix}": [] for stage in STAGE_FILES for suffix in ("", "_eval")}
    seen: set[str] = set()
    duplicates: Counter = Counter()
    questions: list[tuple[str, str, str]] = []  # (doc id, question, answer)
    for result in results:
        doc_id = result["id"]
        split = "_eval" if doc_id in held_out else ""
        pairs = []
        for question, answer in (pair for task in PAIR_TASKS for pair in result["pairs"][task]):
            key = question_key(question)
            if key in seen:
                duplicates[doc_id] += 1
                continue
            seen.add(key)
            pairs.append((question, answer))
        text = texts[row_of[doc_id]]
        if pairs:
            files["stage1" + split].append(
                {"data_type": "qa", "question": [q for q, _ in pairs], "answers": [a for _, a in pairs], "docs": [text]}
            )
            questions += [(doc_id, q, a) for q, a in pairs]
        if result["paraphrase"] and pairs:
            files["stage1" + split].append(
                {"data_type": "paraphrase", "docs": [text], "answers": [result["paraphrase"]]}
            )
    candidates = min(layout.candidates, len(ids))
    ranked = retrieve(texts, [q for _, q, _ in questions], min(candidates + 1, len(ids)))
    for (doc_id, question, answer), hits in zip(questions, ranked):
        split = "_eval" if doc_id in held_out else ""
        positive = row_of[doc_id]
        where = _hash(layout.seed, "place", question)
        rows = _with_positive(positive, hits, min(layout.stage1_2_docs, candidates), where)
        files["stage1_2" + split].append(
            {
                "question": question,
                "answers": answer,
                "docs": [texts[r] for r in rows],
                "pos_index": [rows.index(positive)],
            }
        )
        rows = _with_positive(positive, hits, candidates, where)
        files["stage2" + split].append(
            {
                "question": question,
                "docs": [texts[r] for r in rows],
                "gold_answer": answer,
                "pos_index": [rows.index(positive)],
                "gold_ids": [doc_id],
                "doc_ids": [ids[r] for r in rows],
            }
        )
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
