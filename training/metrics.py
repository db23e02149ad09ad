"""Per-label binary metrics for multi-label findings, threshold choice, fold summaries and plots.

Inputs are ``y_true`` (N, L) in {0, 1} and ``y_prob`` (N, L) probabilities (after sigmoid, and after
temperature scaling when calibrated). Outputs are plain dicts of floats, ready for JSON and model cards.
A label whose ``y_true`` holds a single class gets NaN for the ranking metrics and a note, not a crash.

Conventions: a prediction is positive when ``prob >= threshold``.
Expected calibration error (ECE), as used here for binary findings: split [0, 1] into ``n_bins``
equal-width bins of the predicted positive-class probability (the last bin includes 1.0); then
ECE = sum_b (n_b / N) * |mean(y_true in b) - mean(y_prob in b)|. This is the reliability-diagram
gap of the positive-class probability (not the "top-label confidence" ECE of multi-class work).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score, roc_curve

from calciscope.errors import CalciscopeError

NAN = float("nan")


def _binary_inputs(y_true, y_prob) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(np.float64).ravel()
    p = np.asarray(y_prob, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise CalciscopeError(f"y_true has {y.size} values but y_prob has {p.size}")
    if not np.all((y == 0) | (y == 1)):
        raise CalciscopeError("y_true must hold only 0 and 1")
    if not np.all(np.isfinite(p)) or p.min(initial=0) < 0 or p.max(initial=0) > 1:
        raise CalciscopeError("y_prob must hold probabilities in [0, 1]")
    return y.astype(int), p


def _both_classes(y: np.ndarray) -> bool:
    return 0 < y.sum() < y.size


def expected_calibration_error(y_true, y_prob, n_bins: int = 15) -> float:
    """Binary ECE over ``n_bins`` equal-width bins (definition in the module docstring)."""
    y, p = _binary_inputs(y_true, y_prob)
    if y.size == 0:
        return NAN
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in np.unique(bins):
        in_bin = bins == b
        ece += in_bin.mean() * abs(y[in_bin].mean() - p[in_bin].mean())
    return float(ece)


def reliability_curve(y_true, y_prob, n_bins: int = 15) -> dict[str, list[float]]:
    """Per non-empty bin: mean predicted probability, observed frequency, count."""
    y, p = _binary_inputs(y_true, y_prob)
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    out = {"mean_prob": [], "frac_positive": [], "count": []}
    for b in np.unique(bins):
        in_bin = bins == b
        out["mean_prob"].append(float(p[in_bin].mean()))
        out["frac_positive"].append(float(y[in_bin].mean()))
        out["count"].append(int(in_bin.sum()))
    return out


def sensitivity_at_specificity(y_true, y_prob, specificity: float = 0.9) -> tuple[float, float]:
    """Highest sensitivity with specificity >= ``specificity``, and the threshold achieving it (NaN if one class)."""
    y, p = _binary_inputs(y_true, y_prob)
    if not _both_classes(y):
        return NAN, NAN
    fpr, tpr, thresholds = roc_curve(y, p)
    ok = fpr <= 1.0 - specificity + 1e-12
    best = int(np.flatnonzero(ok)[np.argmax(tpr[ok])])
    return float(tpr[best]), float(min(thresholds[best], 1.0))


def binary_metrics(y_true, y_prob, *, threshold: float = 0.5, specificity_target: float = 0.9,
                   n_bins: int = 15) -> dict[str, float]:
    """AUROC, AUPRC, sensitivity at ``specificity_target``, and threshold metrics for one finding."""
    y, p = _binary_inputs(y_true, y_prob)
    pred = p >= threshold
    tp, fp = int(np.sum(pred & (y == 1))), int(np.sum(pred & (y == 0)))
    fn, tn = int(np.sum(~pred & (y == 1))), int(np.sum(~pred & (y == 0)))
    both = _both_classes(y)
    sens_at_spec, thr_at_spec = sensitivity_at_specificity(y, p, specificity_target)

    def ratio(a: int, b: int) -> float:
        return a / b if b else NAN

    return {
        "n": int(y.size),
        "n_positive": int(y.sum()),
        "auroc": float(roc_auc_score(y, p)) if both else NAN,
        "auprc": float(average_precision_score(y, p)) if both else NAN,
        "sens_at_spec": sens_at_spec,
        "sens_at_spec_threshold": thr_at_spec,
        "specificity_target": float(specificity_target),
        "threshold": float(threshold),
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "precision": ratio(tp, tp + fp),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "ece": expected_calibration_error(y, p, n_bins),
        "brier": float(brier_score_loss(y, p)) if y.size else NAN,
    }


def multilabel_metrics(y_true, y_prob, labels: Sequence[str], *,
                       thresholds: float | Mapping[str, float] = 0.5, specificity_target: float = 0.9,
                       n_bins: int = 15) -> dict[str, Any]:
    """{"per_label": {label: binary_metrics}, "macro": {metric: mean over labels, NaN skipped}, "notes": [...]}."""
    y = np.asarray(y_true)
    p = np.asarray(y_prob, dtype=np.float64)
    if y.ndim != 2 or p.shape != y.shape or y.shape[1] != len(labels):
        raise CalciscopeError(f"y_true {y.shape} and y_prob {p.shape} must both be (N, {len(labels)})")
    per_label, notes = {}, []
    for j, label in enumerate(labels):
        thr = thresholds.get(label, 0.5) if isinstance(thresholds, Mapping) else thresholds
        per_label[label] = binary_metrics(y[:, j], p[:, j], threshold=thr, specificity_target=specificity_target,
                                          n_bins=n_bins)
        if not _both_classes(y[:, j].astype(int)):
            only = int(y[0, j]) if len(y) else "no"
            notes.append(f"{label}: only class {only} present; AUROC/AUPRC/sens_at_spec are NaN")
    keys = ("auroc", "auprc", "sens_at_spec", "sensitivity", "specificity", "f1", "ece", "brier")
    macro = {k: _nanmean([per_label[label][k] for label in labels]) for k in keys}
    return {"per_label": per_label, "macro": macro, "notes": notes}


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else NAN


def choose_threshold(y_true, y_prob, method: str = "youden", target_sensitivity: float = 0.9) -> float:
    """Decision threshold for one finding (predict positive when prob >= threshold).

    "youden": maximises sensitivity + specificity - 1.
    "sensitivity": the highest threshold whose sensitivity is >= ``target_sensitivity`` (best specificity
    under that constraint).
    """
    y, p = _binary_inputs(y_true, y_prob)
    if not _both_classes(y):
        raise CalciscopeError("cannot choose a threshold: y_true holds a single class")
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    thresholds = np.minimum(thresholds, 1.0)  # sklearn puts +inf first
    if method == "youden":
        best = int(np.argmax(tpr - fpr))
    elif method == "sensitivity":
        best = int(np.flatnonzero(tpr >= target_sensitivity - 1e-12)[0])
    else:
        raise CalciscopeError(f"unknown threshold method {method!r}; choose 'youden' or 'sensitivity'")
    return float(thresholds[best])


def summarize_folds(fold_metrics: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and sample SD across folds of every numeric leaf: the same nesting, leaves become
    {"mean", "sd", "n"} (NaN folds skipped; sd NaN with fewer than 2 finite values). Non-numeric leaves are dropped."""
    if not fold_metrics:
        return {}

    def merge(items: list[Any]) -> Any:
        if all(isinstance(i, Mapping) for i in items):
            keys = dict.fromkeys(k for i in items for k in i)
            merged = {k: merge([i[k] for i in items if k in i]) for k in keys}
            return {k: v for k, v in merged.items() if v is not None}
        if all(isinstance(i, (int, float)) and not isinstance(i, bool) for i in items):
            finite = [float(i) for i in items if not math.isnan(i)]
            return {
                "mean": float(np.mean(finite)) if finite else NAN,
                "sd": float(np.std(finite, ddof=1)) if len(finite) >= 2 else NAN,
                "n": len(finite),
            }
        return None

    return merge(list(fold_metrics))


def _figure(width: float = 5.0, height: float = 5.0):
    # imported here: matplotlib takes about 0.3 s to import and only the plots need it (not the metrics that
    # inference's evaluate and calibrate-slides take from this module)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)  # Agg canvas: no display, no pyplot global state
    return fig, fig.add_subplot(1, 1, 1)


def plot_roc(y_true, y_prob, labels: Sequence[str], path: str | Path, title: str = "ROC") -> Path:
    """One ROC curve per label (those with both classes) with AUROC in the legend; writes a PNG."""
    y, p = np.asarray(y_true), np.asarray(y_prob, dtype=np.float64)
    fig, ax = _figure()
    for j, label in enumerate(labels):
        if not _both_classes(y[:, j].astype(int)):
            continue
        fpr, tpr, _ = roc_curve(y[:, j], p[:, j])
        ax.plot(fpr, tpr, label=f"{label} (AUROC {roc_auc_score(y[:, j], p[:, j]):.3f})")
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01), title=title)
    ax.legend(loc="lower right", fontsize=8)
    path = Path(path)
    fig.savefig(path)
    return path


def plot_reliability(y_true, y_prob, labels: Sequence[str], path: str | Path, n_bins: int = 15,
                     title: str = "Reliability") -> Path:
    """Reliability diagram per label (observed frequency vs mean predicted probability) with ECE; writes a PNG."""
    y, p = np.asarray(y_true), np.asarray(y_prob, dtype=np.float64)
    fig, ax = _figure()
    for j, label in enumerate(labels):
        curve = reliability_curve(y[:, j], p[:, j], n_bins)
        ece = expected_calibration_error(y[:, j], p[:, j], n_bins)
        ax.plot(curve["mean_prob"], curve["frac_positive"], marker="o", label=f"{label} (ECE {ece:.3f})")
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
    ax.set(xlabel="mean predicted probability", ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1), title=title)
    ax.legend(loc="upper left", fontsize=8)
    path = Path(path)
    fig.savefig(path)
    return path
