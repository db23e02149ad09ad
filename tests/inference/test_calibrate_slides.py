"""Slide calibration: Platt scaling of aggregated tile probabilities, stored in the card, applied by
``inference.aggregate.slide_probabilities`` (the one function inference calls)."""

import numpy as np
import pytest

from calciscope.model import ModelCard
from calciscope.model.aggregate import aggregate, apply_slide_calibration, logit, slide_probabilities
from calciscope.training.calibration import fit_platt
from calciscope.training.metrics import binary_metrics, expected_calibration_error

LABELS = ["medial_calcification", "small_vessel_calcification", "thrombosis", "vasculitis"]


def _card(**overrides):
    fields = dict(name="t", labels=LABELS, backbone="tiny", tile_px=64, mpp=1.0,
                  training={"config": {"aggregation": {"method": "topk", "k": 2, "quantile": 0.98}}})
    fields.update(overrides)
    return ModelCard(**fields)


def test_platt_recovers_a_known_map_and_brings_slide_ece_down():
    rng = np.random.default_rng(0)
    true_z = rng.normal(0.0, 2.5, 4000)  # what a calibrated slide logit would be
    y = (rng.uniform(size=true_z.size) < 1 / (1 + np.exp(-true_z))).astype(int)
    scores = 1 / (1 + np.exp(-(true_z - 1.5) / 0.5))  # the aggregate: over-confident and shifted (a=0.5, b=1.5)
    a, b = fit_platt(scores, y, prior_sd=10.0)
    assert a == pytest.approx(0.5, rel=0.08) and b == pytest.approx(1.5, abs=0.15)  # logit(score) = 2z - 3
    calibrated = apply_slide_calibration(scores[:, None], {"x": {"a": a, "b": b}}, ["x"])[:, 0]
    assert expected_calibration_error(y, scores) > 0.1
    assert expected_calibration_error(y, calibrated) < 0.02
    assert binary_metrics(y, calibrated)["auroc"] == pytest.approx(binary_metrics(y, scores)["auroc"])


def test_platt_stays_finite_and_deterministic_on_separable_slides_and_one_class_is_the_identity():
    scores = np.array([0.02, 0.05, 0.1, 0.2, 0.6, 0.8, 0.9, 0.97])
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    first, second = fit_platt(scores, y), fit_platt(scores, y)
    assert first == second and 0 < first[0] < 20 and np.isfinite(first[1])
    tight = fit_platt(scores, y, prior_sd=0.1)  # a strong prior keeps the map near the identity
    assert tight[0] == pytest.approx(1.0, abs=0.2) and tight[1] == pytest.approx(0.0, abs=0.2)
    assert fit_platt(scores, np.zeros(8)) == (1.0, 0.0)


def test_slide_probabilities_aggregate_then_calibrate_as_the_card_says():
    rng = np.random.default_rng(1)
    tiles = rng.uniform(0, 0.3, (50, 4))
    tiles[7, 2] = 0.95
    raw = aggregate(tiles, "topk", k=2)
    assert slide_probabilities(tiles, _card()) == pytest.approx(raw)  # no slide calibration: the aggregate
    calib = {"thrombosis": {"a": 2.0, "b": -1.0}}
    card = _card(slide_calibration=calib)
    p = slide_probabilities(tiles, card)
    expected = 1 / (1 + np.exp(-(2.0 * logit(raw[2]) - 1.0)))
    assert p[2] == pytest.approx(expected) and p[[0, 1, 3]] == pytest.approx(raw[[0, 1, 3]])
    # the card's own aggregation passed explicitly (as predict does) is calibrated too; another one is not
    assert slide_probabilities(tiles, card, method="topk", k=2, quantile=0.98) == pytest.approx(p)
    assert slide_probabilities(tiles, card, method="max") == pytest.approx(tiles.max(axis=0))
    assert slide_probabilities(tiles, card, k=3) == pytest.approx(aggregate(tiles, "topk", k=3))
