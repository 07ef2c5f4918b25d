"""Hand-made cases for clara.evaluation.metrics."""

from __future__ import annotations

import pytest

from clara.evaluation.metrics import (
    ANSWER_SCORE_NAMES,
    answer_scores,
    cover_exact_match,
    exact_match,
    f1_score,
    normalize_answer,
    precision_at_k,
    recall_at_k,
    retrieval_summary,
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
        ("False", "no"),
        # As in the official evaluation, only the exact strings True / False are mapped.
        ("false.", "false"),
        (" TRUE ", "true"),
        ("true", "true"),
        ("True story", "true story"),
        ("yes", "yes"),
    ],
)
def test_normalize_true_false(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


# --- exact match --------------------------------------------------------------------------


def test_exact_match_ignores_case_articles_punctuation_whitespace() -> None:
    assert exact_match("  the  PARIS. ", "Paris") == 1.0
    assert exact_match("Paris, France", "Paris") == 0.0
    assert exact_match("", "the") == 1.0  # both normalise to nothing


def test_exact_match_true_false_read_as_yes_no() -> None:
    assert exact_match("True", "yes") == 1.0
    assert exact_match("False", "No.") == 1.0
    assert exact_match("yes", "True") == 1.0
    assert exact_match("True", "no") == 0.0
    assert exact_match("true.", "yes") == 0.0


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


def test_f1_empty_sides_score_zero() -> None:
    assert f1_score("", "Paris") == 0.0
    assert f1_score("the.", "Paris") == 0.0  # normalises to nothing
    assert f1_score("Paris", "") == 0.0
    # An empty pair shares no token either: 0, as in the official evaluation (EM still gives 1).
    assert f1_score("", "") == 0.0


def test_f1_no_overlap_and_exact() -> None:
    assert f1_score("London", "Paris") == 0.0
    assert f1_score("Paris.", "paris") == 1.0


def test_f1_yes_no_noanswer_get_no_partial_credit() -> None:
    # Token overlap would give 2/3 here; a yes/no prediction that differs from the gold scores 0.
    assert f1_score("yes", "yes it is") == 0.0
    assert f1_score("no answer", "noanswer") == 0.0
    assert f1_score("it is no", "no") == 0.0  # the gold side counts too
    assert f1_score("noanswer", "noanswer") == 1.0
    assert f1_score("True", "Yes") == 1.0
    assert f1_score("False", "yes") == 0.0
    # Other answers keep partial credit.
    assert f1_score("yes sir", "sir") == pytest.approx(2 / 3)


# --- cover exact match --------------------------------------------------------------------


def test_cover_em_positive() -> None:
    assert cover_exact_match("It is Paris, the capital.", "Paris") == 1.0
    assert cover_exact_match("He lives in New York City now", "new york city") == 1.0
    assert cover_exact_match("The answer: Paris", "paris") == 1.0


def test_cover_em_is_token_membership_not_a_span() -> None:
    # Every gold token among the prediction's tokens, in any order and not necessarily adjacent.
    assert cover_exact_match("York New City", "New York City") == 1.0
    assert cover_exact_match("city of new york", "New York City") == 1.0
    assert cover_exact_match("New York", "New York City") == 0.0
    assert cover_exact_match("It is London", "Paris") == 0.0


def test_cover_em_respects_token_boundaries() -> None:
    assert cover_exact_match("a party at noon", "art") == 0.0
    assert cover_exact_match("modern art at noon", "art") == 1.0


def test_cover_em_empty_gold_and_yes_no() -> None:
    # An empty gold answer has no token to miss (the official definition).
    assert cover_exact_match("something", "") == 1.0
    assert cover_exact_match("", "Paris") == 0.0
    assert cover_exact_match("True", "yes") == 1.0
    assert cover_exact_match("True.", "yes") == 0.0


# --- first gold and best over all golds ---------------------------------------------------


def test_answer_scores_first_gold_and_any() -> None:
    scores = answer_scores("born in NYC", ["New York City", "NYC", "born in nyc"])
    assert (
        list(scores)
        == list(ANSWER_SCORE_NAMES)
        == ["exact_match", "f1", "cover_exact_match", "exact_match_any", "f1_any", "cover_exact_match_any"]
    )
    # Against the first gold only: nothing in common.
    assert (scores["exact_match"], scores["f1"], scores["cover_exact_match"]) == (0.0, 0.0, 0.0)
    # Best over all: the third gold matches exactly.
    assert (scores["exact_match_any"], scores["f1_any"], scores["cover_exact_match_any"]) == (1.0, 1.0, 1.0)


def test_answer_scores_any_takes_each_metric_best_separately() -> None:
    # vs "new york city": F1 0.8, cover 0; vs "york": F1 2/3, cover 1.
    scores = answer_scores("New York", ["New York City", "york"])
    assert scores["f1"] == pytest.approx(0.8) and scores["f1_any"] == pytest.approx(0.8)
    assert scores["cover_exact_match"] == 0.0 and scores["cover_exact_match_any"] == 1.0
    assert scores["exact_match_any"] == 0.0


def test_answer_scores_one_gold_gives_equal_pairs() -> None:
    scores = answer_scores("Paris", ["paris"])
    assert all(scores[name] == 1.0 for name in ANSWER_SCORE_NAMES)


def test_answer_scores_needs_a_list_of_golds() -> None:
    with pytest.raises(ValueError, match="non-empty list"):
        answer_scores("Paris", [])
    with pytest.raises(ValueError, match="non-empty list"):
        answer_scores("Paris", "Paris")


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
