"""Metrics against hand-computable cases."""

import json
import math

import numpy as np
import pytest

from calciscope.errors import CalciscopeError
from calciscope.training.metrics import (
    binary_metrics,
    choose_threshold,
    expected_calibration_error,
    multilabel_metrics,
    plot_reliability,
    plot_roc,
    sensitivity_at_specificity,
    summarize_folds,
)


def test_perfect_separation_has_auroc_and_auprc_one():
    m = binary_metrics([0, 0, 1, 1], [0.1, 0.4, 0.6, 0.9])
    assert m["auroc"] == 1.0 and m["auprc"] == 1.0
    assert m["sensitivity"] == 1.0 and m["specificity"] == 1.0 and m["f1"] == 1.0


def test_threshold_metrics_on_a_confusion_matrix_counted_by_hand():
    # threshold 0.5: TP=2 (0.7, 0.9), FN=1 (0.3), FP=1 (0.6), TN=2 (0.1, 0.2)
    m = binary_metrics([1, 1, 1, 0, 0, 0], [0.7, 0.9, 0.3, 0.6, 0.1, 0.2], threshold=0.5)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert m["brier"] == pytest.approx(np.mean([0.09, 0.01, 0.49, 0.36, 0.01, 0.04]))


def test_ece_of_a_constructed_case():
    # bin [0.1, 0.2): mean p 0.1, frequency 1/2 -> gap 0.4, weight 1/2
    # bin [0.9, 1.0]: mean p 0.9, frequency 1   -> gap 0.1, weight 1/2   => ECE 0.25
    assert expected_calibration_error([0, 1, 1, 1], [0.1, 0.1, 0.9, 0.9], n_bins=10) == pytest.approx(0.25)
    assert expected_calibration_error([0, 1], [0.0, 1.0]) == 0.0


def test_sensitivity_at_90_percent_specificity():
    # 10 negatives at 0.0..0.9, positives at 0.95, 0.85, 0.5, 0.05: specificity >= 0.9 allows one negative
    # above threshold (0.9), so threshold 0.85 catches the positives at 0.95 and 0.85 -> sensitivity 0.5
    neg = np.arange(10) / 10
    pos = np.array([0.95, 0.85, 0.5, 0.05])
    y = np.r_[np.zeros(10), np.ones(4)]
    sens, thr = sensitivity_at_specificity(y, np.r_[neg, pos], specificity=0.9)
    assert sens == pytest.approx(0.5)
    assert thr == pytest.approx(0.85)
    sens_100, _ = sensitivity_at_specificity(y, np.r_[neg, pos], specificity=1.0)
    assert sens_100 == pytest.approx(0.25)


def test_single_class_label_gives_nan_and_a_note_not_a_crash():
    y = np.array([[0, 1], [1, 1], [0, 1], [1, 1]])
    p = np.array([[0.2, 0.9], [0.8, 0.7], [0.3, 0.6], [0.6, 0.8]])
    out = multilabel_metrics(y, p, ["calc", "thromb"])
    assert out["per_label"]["calc"]["auroc"] == 1.0
    assert math.isnan(out["per_label"]["thromb"]["auroc"])
    assert math.isnan(out["per_label"]["thromb"]["auprc"])
    assert out["macro"]["auroc"] == 1.0  # NaN skipped in the macro mean
    assert any("thromb" in note for note in out["notes"])
    json.dumps(out)  # plain Python types only


def test_choose_threshold_youden_and_sensitivity_target():
    y = [0, 0, 0, 0, 1, 1, 1, 1]
    p = [0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9]
    # Youden J = sens + spec - 1: 0.8 -> 0.5, 0.7 -> 0.75, 0.6 -> 0.5, 0.4 -> 0.75; the tie goes to the
    # higher threshold (fewer false positives). Sensitivity 1.0 first holds at threshold 0.4.
    assert choose_threshold(y, p, "youden") == pytest.approx(0.7)
    assert choose_threshold(y, p, "sensitivity", target_sensitivity=1.0) == pytest.approx(0.4)
    with pytest.raises(CalciscopeError):
        choose_threshold([1, 1], [0.2, 0.3])


def test_summarize_folds_gives_mean_and_sample_sd_per_leaf():
    folds = [{"per_label": {"calc": {"auroc": 0.8}}, "note": "x"},
             {"per_label": {"calc": {"auroc": 0.9}}},
             {"per_label": {"calc": {"auroc": float("nan")}}}]
    out = summarize_folds(folds)
    assert out["per_label"]["calc"]["auroc"]["mean"] == pytest.approx(0.85)
    assert out["per_label"]["calc"]["auroc"]["sd"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert out["per_label"]["calc"]["auroc"]["n"] == 2
    assert "note" not in out


def test_plots_write_png_files(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=(50, 2))
    p = np.clip(y * 0.6 + rng.uniform(0, 0.4, size=(50, 2)), 0, 1)
    for path in (plot_roc(y, p, ["a", "b"], tmp_path / "roc.png"),
                 plot_reliability(y, p, ["a", "b"], tmp_path / "rel.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
