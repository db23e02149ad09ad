"""The CUA-pattern rule: calcification AND occlusion AND NOT vasculitis."""

import numpy as np
import pytest

from calciscope.errors import CalciscopeError
from calciscope.model.cua import CUARule, cua_score, explain


def probs(medial=0.05, small=0.05, thromb=0.05, vasc=0.05):
    return {"medial_calcification": medial, "small_vessel_calcification": small,
            "thrombosis": thromb, "vasculitis": vasc}


@pytest.mark.parametrize(
    "p, expected",
    [
        (probs(medial=0.9, thromb=0.9, vasc=0.05), 0.9 * 0.9 * 0.95),  # full pattern -> high
        (probs(small=0.9, thromb=0.9, vasc=0.05), 0.9 * 0.9 * 0.95),   # either calcification counts
        (probs(medial=0.9, thromb=0.9, vasc=0.9), 0.9 * 0.9 * 0.1),    # vasculitis excludes -> low
        (probs(medial=0.9, thromb=0.05, vasc=0.05), 0.9 * 0.05 * 0.95),  # no thrombosis -> low
        (probs(medial=0.05, thromb=0.9, vasc=0.05), 0.05 * 0.9 * 0.95),  # no calcification -> low
    ],
)
def test_product_rule_table(p, expected):
    assert cua_score(p) == pytest.approx(expected)


def test_min_rule_is_bounded_by_the_weakest_term():
    p = probs(medial=0.8, small=0.6, thromb=0.7, vasc=0.2)
    assert cua_score(p, CUARule(combine="min")) == pytest.approx(0.7)
    assert cua_score(p) == pytest.approx(0.8 * 0.7 * 0.8)


def test_array_input_scores_each_row():
    labels = ["vasculitis", "thrombosis", "medial_calcification", "small_vessel_calcification"]
    arr = np.array([[0.05, 0.9, 0.9, 0.1], [0.9, 0.9, 0.9, 0.1]])
    assert cua_score(arr, labels=labels) == pytest.approx([0.9 * 0.9 * 0.95, 0.9 * 0.9 * 0.1])


def test_explain_names_the_finding_that_drove_each_term():
    out = explain(probs(medial=0.3, small=0.85, thromb=0.7, vasc=0.4))
    assert out["terms"]["calcification"]["driver"] == "small_vessel_calcification"
    assert out["terms"]["calcification"]["value"] == pytest.approx(0.85)
    assert out["terms"]["no_exclusion"]["driver"] == "vasculitis"
    assert out["terms"]["no_exclusion"]["value"] == pytest.approx(0.6)
    assert out["limiting_term"] == "no_exclusion"
    assert out["score"] == pytest.approx(0.85 * 0.7 * 0.6)


def test_missing_labels_are_named():
    with pytest.raises(CalciscopeError, match="small_vessel_calcification"):
        cua_score({"medial_calcification": 0.9, "thrombosis": 0.9, "vasculitis": 0.1})


def test_rule_round_trips_through_a_dict_and_rejects_typos():
    rule = CUARule(calcification=("medial_calcification",), exclusion=(), combine="min")
    assert CUARule.from_dict(rule.to_dict()) == rule
    assert CUARule.from_dict({}) == CUARule()
    with pytest.raises(CalciscopeError, match="combin"):
        CUARule.from_dict({"combin": "min"})
    with pytest.raises(CalciscopeError, match="combine"):
        CUARule(combine="max")


def test_empty_exclusion_group_means_nothing_excludes():
    rule = CUARule(exclusion=())
    assert cua_score(probs(medial=0.9, thromb=0.8, vasc=0.99), rule) == pytest.approx(0.72)
