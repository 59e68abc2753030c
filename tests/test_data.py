"""Margin column derivation (trl_regularizers.data) with hand-computed values and the errors users see."""

from __future__ import annotations

import pytest
from datasets import Dataset

from trl_regularizers.configs import MarginArguments
from trl_regularizers.data import add_margin_column, check_margin_column, margin_bucket_namer


def rows() -> Dataset:
    return Dataset.from_dict(
        {
            "chosen": ["a", "b", "c"],
            "rejected": ["x", "y", "z"],
            "chosen_rating": [7, 5, 4],
            "rejected_rating": [1, 4, 4],
            "preference_strength": ["Significantly better", "slightly  better", "negligibly better / unsure"],
            "score": [0.25, 1.5, -0.5],
        }
    )


def margins(**fields) -> list[float]:
    return add_margin_column(rows(), MarginArguments(**fields))["margin"]


def test_sources_give_hand_computed_margins():
    assert margins(margin_source="rating", margin_scale=0.5) == [3.0, 0.5, 0.0]
    assert margins(margin_source="likert") == pytest.approx([1.0, 1 / 6, 0.0])  # 7-point scale: delta / 6
    assert margins(margin_source="likert", margin_likert_points=10, margin_scale=2.0) == pytest.approx([12 / 9, 2 / 9, 0.0])
    assert margins(margin_source="label") == pytest.approx([1.0, 1 / 3, 0.0])  # Llama 2 "margin small"
    assert margins(margin_source="label", margin_label_map="llama2_large") == [3.0, 1.0, 0.0]
    custom = '{"significantly better": 5, "slightly better": 2, "negligibly better / unsure": -1}'
    assert margins(margin_source="label", margin_label_map=custom) == [5.0, 2.0, -1.0]
    assert margins(margin_source="column", margin_column="score") == [0.25, 1.5, -0.5]


def test_no_source_leaves_dataset_untouched():
    data = rows()
    assert add_margin_column(data, MarginArguments()) is data


def test_derived_margin_replaces_an_existing_margin_column():
    data = rows().add_column("margin", [9.0, 9.0, 9.0])
    assert add_margin_column(data, MarginArguments(margin_source="rating"))["margin"] == [6.0, 1.0, 0.0]


@pytest.mark.parametrize(
    "fields, missing",
    [
        ({"margin_source": "rating", "margin_rejected_rating_field": "r2"}, "['r2']"),
        ({"margin_source": "likert", "margin_chosen_rating_field": "c", "margin_rejected_rating_field": "r"}, "['c', 'r']"),
        ({"margin_source": "label", "margin_label_field": "strength"}, "['strength']"),
        ({"margin_source": "column"}, "['margin']"),
    ],
)
def test_missing_columns_are_named_with_the_available_ones(fields, missing):
    with pytest.raises(ValueError) as error:
        add_margin_column(rows(), MarginArguments(**fields), dataset_name="eval")
    message = str(error.value)
    assert f"needs the column(s) {missing} in the eval dataset" in message
    assert "['chosen', 'rejected', 'chosen_rating', 'rejected_rating', 'preference_strength', 'score']" in message


@pytest.mark.parametrize(
    "column, values, fields, reason",
    [
        ("chosen_rating", [7, None, 4], {"margin_source": "rating"}, "row 1"),
        ("chosen_rating", [7.0, float("nan"), 4.0], {"margin_source": "rating"}, "row 1: chosen rating must be a finite number"),
        ("chosen_rating", [7, 8, 4], {"margin_source": "likert"}, "row 1: chosen Likert rating 8 is not an integer in 1..7"),
        ("preference_strength", ["better", "much better", "better"], {"margin_source": "label"}, "row 1: Unknown preference-strength label 'much better'"),
        ("score", [0.1, float("inf"), 0.2], {"margin_source": "column", "margin_column": "score"}, "row 1: margin must be a finite number"),
        # a boolean column (a mislabeled "is_better" flag) would read as margins of 0 and 1
        ("chosen_rating", [True, False, True], {"margin_source": "rating"}, "row 0: chosen rating must be a finite number, got bool True"),
        ("chosen_rating", [True, False, True], {"margin_source": "likert"}, "row 0: chosen Likert rating must be a finite number, got bool True"),
        ("score", [False, True, True], {"margin_source": "column", "margin_column": "score"}, "row 0: margin must be a finite number, got bool False"),
    ],
)
def test_bad_rows_are_named(column, values, fields, reason):
    data = rows().remove_columns(column).add_column(column, values)
    with pytest.raises(ValueError, match=reason):
        add_margin_column(data, MarginArguments(**fields))


def test_check_margin_column_names_the_bad_row():
    check_margin_column(rows().add_column("margin", [0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="train dataset, row 2: margin must be a finite number, got None"):
        check_margin_column(rows().add_column("margin", [0.0, 1.0, None]))


def test_iterable_dataset_is_derived_and_checked_lazily():
    data = rows().to_iterable_dataset()
    assert [row["margin"] for row in add_margin_column(data, MarginArguments(margin_source="rating"))] == [6.0, 1.0, 0.0]
    bad = rows().remove_columns("chosen_rating").add_column("chosen_rating", [7, None, 4]).to_iterable_dataset()
    derived = add_margin_column(bad, MarginArguments(margin_source="rating"))  # no error until iterated
    with pytest.raises(ValueError, match="row 1"):
        list(derived)


def test_bucket_names():
    by_value = margin_bucket_namer(MarginArguments(margin_source="likert"))
    assert [by_value(v) for v in (1 / 3, 2 / 3, 1.0, 0.0, -0.0, 2.5, -0.125)] == ["0.33", "0.67", "1", "0", "0", "2.5", "-0.12"]
    by_label = margin_bucket_namer(MarginArguments(margin_source="label", margin_scale=2.0))
    assert [by_label(2 * v) for v in (1.0, 2 / 3, 1 / 3, 0.0)] == ["significantly_better", "better", "slightly_better", "negligibly_better_unsure"]
    assert by_label(0.5) == "0.5"  # a value no label maps to keeps its number
    tied = margin_bucket_namer(MarginArguments(margin_source="label", margin_label_map='{"A b": 1, "c": 1}'))
    assert tied(1.0) == "a_b|c"
    assert by_value(0.004) == "0"
