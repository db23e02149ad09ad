"""vessels.head: per-vessel logistic calibration; shape features are kept only where they help out of fold."""

import numpy as np
import pytest

from calciscope.errors import CalciscopeError
from calciscope.model.vessel_head import SHAPE_FEATURES, VesselHead, fit_vessel_head, vessel_features

LABELS = ["medial_calcification", "small_vessel_calcification"]


def _vessels(n=600, seed=0):
    """Calcified vessels whose tile scores cannot tell medial from small-vessel calcification; their size can
    (medial ≥ 40 µm, small-vessel < 40 µm); plus uncalcified vessels of every size."""
    rng = np.random.default_rng(seed)
    outer = np.exp(rng.uniform(np.log(8), np.log(150), n))
    calcified = rng.random(n) < 0.4
    medial, small = calcified & (outer >= 40), calcified & (outer < 40)
    p_calc = np.where(calcified, rng.uniform(0.6, 0.99, n), rng.uniform(0.01, 0.5, n))
    tiles = np.column_stack([p_calc, p_calc])  # the tile model calls "calcified", not which kind
    x = vessel_features(tiles, outer, outer * 0.6, rng.random(n) < 0.7)
    return x, np.column_stack([medial, small]).astype(int), np.arange(n) // 10


def test_size_separates_medial_from_small_vessel_calcification():
    x, y, groups = _vessels()
    head = fit_vessel_head(x, y, LABELS, groups)
    assert all(head.metrics["features"][k].endswith("+shape") for k in LABELS)
    for k in LABELS:
        by = head.metrics["cv_auroc_by_features"][k]
        assert by["tile_logit+shape"] >= 0.95 and by["tile_logit"] <= 0.9
    again = VesselHead.from_dict(head.to_dict(), LABELS)
    assert np.allclose(again.predict(x), head.predict(x))


def test_the_other_findings_logit_is_used_where_it_tells_them_apart():
    """The medial tile score also fires on small-vessel calcification, and size does not separate them here; the
    small-vessel score does (it is low on medial vessels), so medial takes every logit and small-vessel its own."""
    rng = np.random.default_rng(1)
    n = 800
    kind = rng.choice(3, n, p=[0.6, 0.2, 0.2])  # 0 none, 1 medial, 2 small-vessel
    p_medial = np.where(kind > 0, rng.uniform(0.6, 0.99, n), rng.uniform(0.01, 0.5, n))
    p_small = np.where(kind == 2, rng.uniform(0.6, 0.99, n), rng.uniform(0.01, 0.5, n))
    outer = np.exp(rng.uniform(np.log(8), np.log(150), n))
    x = vessel_features(np.column_stack([p_medial, p_small]), outer, outer * 0.6, rng.random(n) < 0.7)
    y = np.column_stack([kind == 1, kind == 2]).astype(int)
    head = fit_vessel_head(x, y, LABELS, np.arange(n) // 10)
    by = head.metrics["cv_auroc_by_features"]
    assert head.metrics["features"]["medial_calcification"] == "tile_logits+shape"
    medial = by["medial_calcification"]
    assert medial["tile_logits+shape"] >= 0.9 and medial["tile_logits+shape"] >= medial["tile_logit+shape"] + 0.05
    assert head.metrics["features"]["small_vessel_calcification"] in ("tile_logit", "tile_logit+shape")


def test_a_head_from_another_label_set_or_malformed_is_refused():
    x, y, groups = _vessels()
    data = fit_vessel_head(x, y, LABELS, groups).to_dict()
    with pytest.raises(CalciscopeError, match="does not fit the model's labels"):
        VesselHead.from_dict(data, ["thrombosis", "vasculitis"])
    with pytest.raises(CalciscopeError, match="malformed"):
        VesselHead.from_dict({**data, "mean": "zero"}, LABELS)


def test_slide_probability_is_the_top_vessel_through_the_slide_map():
    x, y, groups = _vessels()
    head = fit_vessel_head(x, y, LABELS, groups)
    probs = head.predict(x[:5])
    assert np.allclose(head.slide_probabilities(probs), probs.max(axis=0))  # no slide map: the top vessel
    head.slide_calibration = {LABELS[0]: {"a": 1.0, "b": 2.0}}
    top = probs.max(axis=0)[0]
    assert head.slide_probabilities(probs)[0] == pytest.approx(1 / (1 + np.exp(-(np.log(top / (1 - top)) + 2))))
    assert np.all(head.slide_probabilities(np.zeros((0, 2))) < 1e-3)  # no vessel, no finding
    assert len(SHAPE_FEATURES) == x.shape[1] - len(LABELS)
