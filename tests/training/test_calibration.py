"""Temperature scaling recovers a known over-confidence factor and brings ECE down."""

import numpy as np
import pytest

from calciscope.model.calibration import apply_temperature
from calciscope.training.calibration import fit_temperature, temperatures_by_label
from calciscope.training.metrics import binary_metrics, expected_calibration_error


def _miscalibrated(rng, n=20000, factors=(3.0, 0.5)):
    true_logits = rng.normal(0.0, 2.0, size=(n, len(factors)))
    y = (rng.uniform(size=true_logits.shape) < 1 / (1 + np.exp(-true_logits))).astype(int)
    return true_logits * np.asarray(factors), y


def test_fit_recovers_the_scaling_factor_per_label_and_ece_drops():
    logits, y = _miscalibrated(np.random.default_rng(0))
    temperatures = fit_temperature(logits, y)
    assert temperatures == pytest.approx([3.0, 0.5], rel=0.08)
    before = apply_temperature(logits, 1.0)
    after = apply_temperature(logits, temperatures)
    for j in range(2):
        assert expected_calibration_error(y[:, j], before[:, j]) > 0.08
        assert expected_calibration_error(y[:, j], after[:, j]) < 0.05
        # ranking is untouched
        auroc_after = binary_metrics(y[:, j], after[:, j])["auroc"]
        assert auroc_after == pytest.approx(binary_metrics(y[:, j], before[:, j])["auroc"])


def test_fit_is_deterministic_and_single_class_labels_keep_t_one():
    logits, y = _miscalibrated(np.random.default_rng(1), n=2000)
    y[:, 1] = 0
    first, second = fit_temperature(logits, y), fit_temperature(logits, y)
    assert np.array_equal(first, second)
    assert first[1] == 1.0


def test_temperatures_by_label_apply_in_the_models_column_order():
    logits = np.array([[2.0, 2.0]])
    by_label = temperatures_by_label(["calc", "thromb"], [2.0, 1.0])
    probs = apply_temperature(logits, by_label, labels=["calc", "thromb"])
    assert probs[0] == pytest.approx([1 / (1 + np.exp(-1.0)), 1 / (1 + np.exp(-2.0))])
