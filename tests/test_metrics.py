"""Hand-made cases for clara.metrics."""

from __future__ import annotations

import pytest
import torch

from clara.metrics import (
    cover_exact_match,
    exact_match,
    f1_score,
    normalize_answer,
    precision_at_k,
    qa_summary,
    recall_at_k,
    retrieval_summary,
    token_accuracy,
)

# --- normalisation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("an apple a day", "apple day"),
        ("Theatre and another thing", "theatre and another thing"),  # articles as whole words only
        ("Paris!", "paris"),
        ("don't", "dont"),  # SQuAD deletes punctuation, it does not split on it
        ("  New \t York\n City  ", "new york city"),
        ("PARIS", "paris"),
        ("", ""),
        ("...", ""),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("True", "yes"),
        ("false.", "no"),
        (" TRUE ", "yes"),
        ("yes", "yes"),
        ("true story", "true story"),  # only a whole answer of true/false is mapped
    ],
)
def test_normalize_yes_no(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


# --- exact match --------------------------------------------------------------------------


def test_exact_match_ignores_case_articles_punctuation_whitespace() -> None:
    assert exact_match("  the  PARIS. ", "Paris") == 1.0
    assert exact_match("Paris, France", "Paris") == 0.0


def test_exact_match_true_false_read_as_yes_no() -> None:
    assert exact_match("True", "yes") == 1.0
    assert exact_match("False.", "No") == 1.0
    assert exact_match("True", "no") == 0.0


def test_exact_match_takes_best_of_several_answers() -> None:
    assert exact_match("NYC", ["New York City", "nyc"]) == 1.0
    assert exact_match("Boston", ["New York City", "nyc"]) == 0.0
    assert exact_match("anything", []) == 0.0


# --- F1 -----------------------------------------------------------------------------------


def test_f1_partial_overlap_exact_number() -> None:
    # pred tokens: new york (2); gold: new york city (3); overlap 2
    # precision 1, recall 2/3 -> F1 = 2 * 1 * (2/3) / (5/3) = 0.8
    assert f1_score("New York", "New York City") == pytest.approx(0.8)
    # pred: big red dog (3); gold: red cat (2); overlap 1 -> P 1/3, R 1/2 -> F1 0.4
    assert f1_score("the big red dog", "a red cat") == pytest.approx(0.4)


def test_f1_counts_repeated_tokens_once_per_match() -> None:
    # pred: paris paris (2); gold: paris (1); overlap min(2,1) = 1 -> P 1/2, R 1 -> 2/3
    assert f1_score("Paris Paris", "Paris") == pytest.approx(2 / 3)


def test_f1_empty_prediction() -> None:
    assert f1_score("", "Paris") == 0.0
    assert f1_score("the.", "Paris") == 0.0  # normalises to nothing
    assert f1_score("", "") == 1.0
    assert f1_score("", "The") == 1.0  # both normalise to empty


def test_f1_no_overlap_and_exact() -> None:
    assert f1_score("London", "Paris") == 0.0
    assert f1_score("Paris.", "paris") == 1.0


def test_f1_takes_best_of_several_answers() -> None:
    # vs "new york city": 0.8; vs "york": P 1/2, R 1 -> 2/3; best 0.8
    assert f1_score("New York", ["york", "New York City"]) == pytest.approx(0.8)
    assert f1_score("New York", ["London", "new york"]) == 1.0


def test_f1_true_reads_as_yes() -> None:
    assert f1_score("True", "Yes") == 1.0


# --- cover exact match --------------------------------------------------------------------


def test_cover_em_positive() -> None:
    assert cover_exact_match("It is Paris, the capital.", "Paris") == 1.0
    assert cover_exact_match("He lives in New York City now", "new york city") == 1.0
    assert cover_exact_match("The answer: Paris", "paris") == 1.0


def test_cover_em_negative() -> None:
    assert cover_exact_match("It is London", "Paris") == 0.0
    # tokens must be contiguous and in order
    assert cover_exact_match("York New City", "New York City") == 0.0


def test_cover_em_respects_token_boundaries() -> None:
    assert cover_exact_match("a party at noon", "art") == 0.0
    assert cover_exact_match("modern art at noon", "art") == 1.0


def test_cover_em_several_answers_and_empty() -> None:
    assert cover_exact_match("born in NYC", ["New York City", "NYC"]) == 1.0
    assert cover_exact_match("born in Boston", ["New York City", "NYC"]) == 0.0
    # an empty gold answer must not be covered by every prediction
    assert cover_exact_match("something", "") == 0.0
    assert cover_exact_match("", "") == 1.0
    assert cover_exact_match("anything", []) == 0.0


def test_cover_em_yes_no() -> None:
    assert cover_exact_match("True.", "yes") == 1.0


# --- retrieval ----------------------------------------------------------------------------


def test_recall_and_precision_with_several_positives() -> None:
    chosen = [4, 0, 7, 2, 9]
    positives = [0, 2, 5]
    assert recall_at_k(chosen, positives, 1) == 0.0
    assert precision_at_k(chosen, positives, 1) == 0.0
    assert recall_at_k(chosen, positives, 3) == pytest.approx(1 / 3)
    assert precision_at_k(chosen, positives, 3) == pytest.approx(1 / 3)
    assert recall_at_k(chosen, positives, 5) == pytest.approx(2 / 3)
    assert precision_at_k(chosen, positives, 5) == pytest.approx(2 / 5)


def test_recall_and_precision_without_positives_are_none() -> None:
    assert recall_at_k([1, 2], [], 1) is None
    assert precision_at_k([1, 2], [], 1) is None
    assert recall_at_k([1, 2], None, 1) is None


def test_recall_and_precision_k_larger_than_chosen() -> None:
    # Only what was chosen can count: two chosen, one of them positive.
    assert recall_at_k([3, 1], [1, 6], 5) == pytest.approx(0.5)
    assert precision_at_k([3, 1], [1, 6], 5) == pytest.approx(0.5)


def test_recall_duplicate_positives_count_once() -> None:
    assert recall_at_k([1], [1, 1], 1) == 1.0


def test_invalid_k_raises() -> None:
    with pytest.raises(ValueError):
        recall_at_k([1], [1], 0)
    with pytest.raises(ValueError):
        precision_at_k([1], [1], -1)


def test_retrieval_summary_means_and_skipped() -> None:
    chosen_lists = [[0, 1, 2], [5, 3, 4], [1, 2, 3]]
    positives_lists = [[0, 2], [4], []]
    summary = retrieval_summary(chosen_lists, positives_lists, ks=(1, 3))
    # sample 0: r@1 1/2, p@1 1, r@3 1, p@3 2/3; sample 1: r@1 0, p@1 0, r@3 1, p@3 1/3
    assert summary["recall@1"] == pytest.approx(0.25)
    assert summary["precision@1"] == pytest.approx(0.5)
    assert summary["recall@3"] == pytest.approx(1.0)
    assert summary["precision@3"] == pytest.approx(0.5)
    assert summary["retrieval_samples"] == 2
    assert summary["retrieval_skipped"] == 1


def test_retrieval_summary_skips_k_beyond_chosen() -> None:
    summary = retrieval_summary([[2, 0, 1]], [[0]], ks=(1, 3, 5))
    assert summary["recall@1"] == 0.0
    assert summary["recall@3"] == 1.0
    assert summary["precision@3"] == pytest.approx(1 / 3)
    assert "recall@5" not in summary and "precision@5" not in summary
    assert summary["retrieval_samples"] == 1
    assert summary["retrieval_skipped"] == 0


def test_retrieval_summary_none_positives_and_nothing_counted() -> None:
    summary = retrieval_summary([[0, 1], [1, 0]], [None, []])
    assert summary == {"retrieval_samples": 0, "retrieval_skipped": 2}


def test_retrieval_summary_length_mismatch() -> None:
    with pytest.raises(ValueError):
        retrieval_summary([[0]], [[0], [1]])


# --- token accuracy -----------------------------------------------------------------------


def test_token_accuracy_small_tensor() -> None:
    logits = torch.tensor(
        [
            [0.1, 2.0, 0.3],  # argmax 1
            [3.0, 0.0, 0.0],  # argmax 0
            [0.0, 0.0, 1.0],  # argmax 2
            [0.5, 0.4, 0.1],  # argmax 0
        ]
    )
    labels = torch.tensor([1, 0, 1, 2])
    correct, total = token_accuracy(logits, labels)
    assert (correct, total) == (2, 4)
    assert isinstance(correct, int) and isinstance(total, int)


def test_token_accuracy_ignores_minus_100_and_empty() -> None:
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    labels = torch.tensor([1, -100, 1])
    assert token_accuracy(logits, labels) == (1, 2)
    assert token_accuracy(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long)) == (0, 0)


def test_token_accuracy_shape_mismatch() -> None:
    with pytest.raises(ValueError):
        token_accuracy(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError):
        token_accuracy(torch.zeros(1, 3, 4), torch.zeros(3, dtype=torch.long))


# --- QA summary ---------------------------------------------------------------------------


def test_qa_summary_means() -> None:
    summary = qa_summary(
        ["Paris", "New York", "It was in Rome."],
        ["paris", ["New York City", "LA"], "Rome"],
    )
    # EM: 1, 0, 0; F1: 1, 0.8, (pred "it was in rome" vs "rome": P 1/4, R 1 -> 0.4);
    # cover-EM: 1, 0, 1
    assert summary["exact_match"] == pytest.approx(1 / 3)
    assert summary["f1"] == pytest.approx((1 + 0.8 + 0.4) / 3)
    assert summary["cover_exact_match"] == pytest.approx(2 / 3)
    assert summary["count"] == 3


def test_qa_summary_empty_and_mismatch() -> None:
    expected = {"exact_match": 0.0, "f1": 0.0, "cover_exact_match": 0.0, "count": 0}
    assert qa_summary([], []) == expected
    with pytest.raises(ValueError):
        qa_summary(["a"], [])
