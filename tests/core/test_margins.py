"""Margins from ratings, Likert scales and strength labels."""

import pytest

from trl_regularizers.core.margins import LLAMA2_MARGIN_LARGE, label_margin, likert_margin, rating_margin


def test_rating_and_likert_margins_by_hand():
    assert rating_margin(8.5, 6.0, scale=2.0) == 5.0
    assert likert_margin(7, 1, num_points=7) == 1.0
    assert likert_margin(4, 3, num_points=5, scale=2.0) == 0.5


def test_label_margins_follow_llama2_and_ignore_case_and_spacing():
    assert label_margin("Significantly Better") == 1.0
    assert label_margin("  slightly   better ") == pytest.approx(1 / 3)
    assert label_margin("Negligibly Better / Unsure") == 0.0
    assert label_margin("better", LLAMA2_MARGIN_LARGE, scale=0.5) == 1.0
    assert label_margin("meh", {"meh": 0.2}) == 0.2


def test_bad_inputs_raise_errors_that_name_them():
    with pytest.raises(ValueError, match="'much better'.*Allowed labels"):
        label_margin("much better")
    with pytest.raises(ValueError, match=r"chosen Likert rating 8 is not an integer in 1..7"):
        likert_margin(8, 2, num_points=7)
    with pytest.raises(ValueError, match="rejected Likert rating 2.5"):
        likert_margin(3, 2.5, num_points=7)
    with pytest.raises(ValueError, match="finite"):
        rating_margin(float("nan"), 1.0)
