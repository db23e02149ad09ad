"""Calibration maps as a card applies them: per-finding temperature scaling of logits (p = sigmoid(z / T)).

Fitting them is training's job (``calciscope.training.calibration``); applying them is what a card's outputs mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from calciscope.errors import CalciscopeError


def to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def apply_temperature(logits, temperature: float | Sequence[float] | np.ndarray | Mapping[str, float],
                      labels: Sequence[str] | None = None) -> np.ndarray:
    """Calibrated probabilities sigmoid(logits / T); T is a scalar, one per column, or {label: T} with ``labels``."""
    z = to_numpy(logits)
    if isinstance(temperature, Mapping):
        if labels is None:
            raise CalciscopeError("temperatures given by label need the labels naming the logit columns")
        t = np.asarray([float(temperature.get(label, 1.0)) for label in labels])
    else:
        t = to_numpy(temperature)
    if np.any(t <= 0):
        raise CalciscopeError("temperatures must be > 0")
    return 0.5 * (1.0 + np.tanh(0.5 * z / t))  # = sigmoid, without overflow warnings
