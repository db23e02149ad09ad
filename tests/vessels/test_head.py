"""vessels.head: per-vessel logistic calibration; shape features are kept only where they help out of fold."""

import numpy as np
import pytest

from calciscope.errors import CalciscopeError
from calciscope.vessels.head import SHAPE_FEATURES, VesselHead, fit_vessel_head, vessel_features

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
    assert head.metrics["features"] == {k: "tile_logit+shape" for k in LABELS}
    for k in LABELS:
        by = head.metrics["cv_auroc_by_features"][k]
        assert by["tile_logit+shape"] >= 0.95 and by["tile_logit"] <= 0.9
    again = VesselHead.from_dict(head.to_dict(), LABELS)
    assert np.allclose(again.predict(x), head.predict(x))


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
