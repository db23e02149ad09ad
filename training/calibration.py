"""Temperature scaling for multi-label logits (Guo et al., ICML 2017), one temperature per finding.

p = sigmoid(logit / T_l). Each T_l is fit on validation logits by minimising the binary cross-entropy
(NLL) of label l alone. Written in beta = 1 / T the NLL is convex (a one-parameter logistic regression
without intercept), hence unimodal in log T, so a bounded 1-D search on log T finds the optimum
deterministically. Temperature scaling does not change the ranking: AUROC is untouched.

Slide level: ``fit_platt`` fits the per-finding logistic map from aggregated tile probabilities to calibrated
slide probabilities (stored in the card's ``slide_calibration``, applied by ``inference.aggregate``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import minimize_scalar

from calciscope.errors import CalciscopeError
from calciscope.model.aggregate import logit
from calciscope.model.calibration import to_numpy

T_MIN, T_MAX = 0.05, 20.0


def _nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    z = logits / temperature
    # BCE with logits, numerically stable: log(1 + e^z) - y z
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def fit_temperature(logits, y_true, bounds: tuple[float, float] = (T_MIN, T_MAX)) -> np.ndarray:
    """Per-label temperatures (L,) minimising the validation BCE of ``sigmoid(logits / T)``.

    logits, y_true: (N, L) (or (N,) for one label). A label whose y_true holds a single class keeps T = 1.
    T is searched in ``bounds`` ([0.05, 20] by default).
    """
    z, y = to_numpy(logits), to_numpy(y_true)
    if z.ndim == 1:
        z, y = z[:, None], y[:, None]
    if z.shape != y.shape or z.ndim != 2:
        raise CalciscopeError(f"logits {z.shape} and y_true {y.shape} must both be (N, L)")
    if not np.all(np.isfinite(z)):
        raise CalciscopeError("logits contain NaN or inf")
    temperatures = np.ones(z.shape[1])
    for j in range(z.shape[1]):
        if not 0 < y[:, j].sum() < len(y) or not np.any(z[:, j]):
            continue
        result = minimize_scalar(
            lambda log_t: _nll(z[:, j], y[:, j], float(np.exp(log_t))),
            bounds=(np.log(bounds[0]), np.log(bounds[1])),
            method="bounded",
            options={"xatol": 1e-6},
        )
        temperatures[j] = float(np.exp(result.x))
    return temperatures


def robust_calibration(logits, y_true, labels: Sequence[str], *, fit: bool = True, robust: bool = True,
                       min_per_class: int = 20, max_temperature: float = 5.0,
                       choose=None) -> tuple[np.ndarray, dict[str, float], dict[str, dict], list[str]]:
    """Per label, a temperature and a decision threshold from validation logits, where validation can support them.

    Returns (temperatures (L,), thresholds {label: p}, record {label: method, temperature, threshold, counts,
    reason}, warnings). ``choose(y, p)`` picks a threshold on calibrated probabilities (Youden or a target
    sensitivity). With ``robust``: a separable label (every positive logit above every negative one: temperature
    scaling would sharpen without bound and Youden puts the threshold at the lowest positive) keeps T = 1 and gets the
    max-margin threshold, the middle of the gap in logits; a label with fewer than ``min_per_class`` positives or
    negatives gets T bounded to [1, ``max_temperature``] (a handful of examples never sharpens the model). Either way
    the card should warn: its probabilities were not checked on enough data. One class only: T = 1, threshold 0.5.
    """
    z, y = to_numpy(logits), to_numpy(y_true)
    temperatures, thresholds, record, warnings = np.ones(len(labels)), {}, {}, []
    for j, label in enumerate(labels):
        zj, yj = z[:, j], y[:, j]
        n_pos, n_neg = int(yj.sum()), int(len(yj) - yj.sum())
        entry = {"n_pos": n_pos, "n_neg": n_neg}
        if n_pos == 0 or n_neg == 0:
            entry.update(method="none", reason="validation holds one class only")
            thresholds[label] = 0.5
        elif robust and zj[yj == 1].min() > zj[yj == 0].max():
            gap = (float(zj[yj == 1].min()), float(zj[yj == 0].max()))
            thresholds[label] = float(1 / (1 + np.exp(-(gap[0] + gap[1]) / 2)))
            entry.update(method="none", reason=f"validation is separable ({n_pos} positives, {n_neg} negatives): "
                                               "temperature 1, threshold at the middle of the gap")
        else:
            small = robust and min(n_pos, n_neg) < min_per_class
            if fit:
                bounds = (1.0, max_temperature) if small else (T_MIN, T_MAX)
                temperatures[j] = fit_temperature(zj[:, None], yj[:, None], bounds)[0]
            thresholds[label] = float(choose(yj, 0.5 * (1 + np.tanh(0.5 * zj / temperatures[j])))) if choose else 0.5
            few = f"{min(n_pos, n_neg)} validation {'positives' if n_pos < n_neg else 'negatives'}"
            if small:
                entry.update(method="bounded" if fit else "none", reason=f"only {few} (< calibration.min_per_class "
                             f"= {min_per_class})" + (f": temperature kept in [1, {max_temperature:g}]" if fit else ""))
            else:
                entry.update(method="fit" if fit else "none",
                             reason="fit on validation" if fit else "calibration.temperature is off")
        entry.update(temperature=float(temperatures[j]), threshold=thresholds[label])
        record[label] = entry
        if entry["reason"] not in ("fit on validation", "calibration.temperature is off"):
            warnings.append(f"calibration of {label!r} not checked on enough data: {entry['reason']}; judge its "
                            "probabilities (ECE) on held-out data of your own")
    return temperatures, thresholds, record, warnings


def temperatures_by_label(labels: Sequence[str], temperatures) -> dict[str, float]:
    """{label: T} for the model card."""
    t = to_numpy(temperatures).ravel()
    if len(t) != len(labels):
        raise CalciscopeError(f"{len(t)} temperatures for {len(labels)} labels")
    return {label: float(v) for label, v in zip(labels, t)}


def fit_platt(scores, y_true, *, prior_sd: float = 3.0) -> tuple[float, float]:
    """Slope a > 0 and intercept b of p = sigmoid(a * logit(score) + b), fit by penalised maximum likelihood.

    Platt scaling for few examples (e.g. validation slides): the negative log-likelihood plus a Gaussian prior
    ((a - 1)² + b²) / (2 prior_sd²) centred on the identity map, so perfectly separated scores still give a finite,
    deterministic fit. One class only: the identity (1, 0).
    """
    a, b = _penalised_logistic([scores], y_true, prior_sd)
    return a, b


def fit_platt_with_grid(scores, grid, y_true, *, prior_sd: float = 3.0) -> tuple[float, float, float]:
    """Slope a > 0, grid weight g ≥ 0 and intercept b of p = sigmoid(a * logit(score) + g * logit(grid) + b): the
    Platt map with a second, monotone input (``model.aggregate.apply_slide_calibration``'s grid route), under the
    same prior (centred on a = 1, g = 0, b = 0). One class only: (1, 0, 0)."""
    a, g, b = _penalised_logistic([scores, grid], y_true, prior_sd)
    return a, g, b


def _penalised_logistic(inputs, y_true, prior_sd: float) -> tuple[float, ...]:
    """Weights (first input's centred on 1, the others' on 0, all ≥ 0 or > 0) and intercept (last) of a logistic
    regression on the logits of ``inputs``, by penalised maximum likelihood."""
    # imported here: scipy.optimize takes about 0.3 s to import, and inference modules that import this one for
    # other helpers should not pay it
    from scipy.optimize import minimize

    x = np.stack([logit(to_numpy(v).ravel()) for v in inputs], axis=1)
    y = to_numpy(y_true).ravel()
    if x.shape[0] != y.shape[0]:
        raise CalciscopeError(f"{x.shape[0]} scores but {y.size} labels")
    centre = np.zeros(x.shape[1] + 1)
    centre[0] = 1.0
    if not 0 < y.sum() < len(y):
        return tuple(float(v) for v in centre)
    design = np.column_stack([x, np.ones(len(y))])

    def objective(theta):
        z = design @ theta
        nll = np.sum(np.logaddexp(0.0, z) - y * z)
        p = 0.5 * (1.0 + np.tanh(0.5 * z))
        prior = np.sum((theta - centre) ** 2) / (2 * prior_sd**2)
        return nll + prior, design.T @ (p - y) + (theta - centre) / prior_sd**2

    bounds = [(1e-3, 1e3)] + [(0.0, 1e3)] * (x.shape[1] - 1) + [(None, None)]
    result = minimize(objective, centre, jac=True, method="L-BFGS-B", bounds=bounds,
                      options={"ftol": 1e-12, "gtol": 1e-9})
    return tuple(float(v) for v in result.x)
