"""The learning-rate schedule: linear warmup, then a cosine down to a floor."""

import pytest

from clara.training.schedule import cosine_with_warmup


def test_warmup_rises_linearly_to_the_peak():
    assert [cosine_with_warmup(step, 100, 4, 0.1) for step in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_cosine_falls_from_the_peak_to_the_floor_and_stays_there():
    values = [cosine_with_warmup(step, 100, 10, 0.1) for step in range(10, 120)]
    assert values[0] == 1.0
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert cosine_with_warmup(55, 100, 10, 0.1) == pytest.approx(0.55)
    assert values[90:] == [pytest.approx(0.1)] * 20


def test_without_warmup_the_first_step_is_at_the_peak():
    assert cosine_with_warmup(0, 10, 0, 0.0) == 1.0
    assert cosine_with_warmup(10, 10, 0, 0.0) == pytest.approx(0.0)
