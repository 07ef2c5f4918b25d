"""Open-corpus recall over a corpus indexed in passages (clara/evaluation/open_corpus.py): a passage of a gold
document is a hit for that document; a gold passage is found only as itself."""

from __future__ import annotations

from clara.evaluation.metrics import retrieval_summary
from clara.evaluation.open_corpus import as_gold


def test_a_passage_of_a_gold_document_counts_as_the_document():
    retrieved = [["other.md", "guide.md#3", "guide.md#1"], ["guide.md#2", "guide.md#3"]]
    gold = [["guide.md"], ["guide.md#3"]]
    assert [as_gold(r, g) for r, g in zip(retrieved, gold)] == [
        ["other.md", "guide.md", "guide.md"],
        ["guide.md#2", "guide.md#3"],
    ]
    summary = retrieval_summary([as_gold(r, g) for r, g in zip(retrieved, gold)], gold, ks=(1, 2))
    assert summary["recall@1"] == 0.0 and summary["recall@2"] == 1.0


def test_questions_without_gold_ids_are_left_alone():
    assert as_gold(["a#1", "b"], None) == ["a#1", "b"]
