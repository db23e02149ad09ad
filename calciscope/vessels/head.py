"""The vessel head: per-vessel calibrated probabilities from the tile model's scores plus the vessel's size and place.

A tile sees a 112 µm window, and what separates some findings is the vessel itself: medial calcification sits in
the media of arterioles and small arteries, small-vessel (mural) calcification in capillaries and arterioles under
~40 µm. So each finding gets a logistic regression on the vessel's features — the logits of its tiles' highest
probabilities for every finding, log outer diameter, lumen / outer diameter, wall thickness / outer diameter, and
whether it lies in subcutaneous fat — fit on detected vessels matched to annotated ones (``calciscope
fit-vessel-head``). The fit is stored in the model card (``extra.vessel_head``) and applied by vessel analysis; a
card without one gives each vessel its tiles' highest calibrated probability.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from calciscope.errors import CalciscopeError

SHAPE_FEATURES = ("log_outer_um", "lumen_ratio", "wall_ratio", "in_fat")
_EPS = 1e-4


def vessel_features(tile_probs: np.ndarray, outer_um: np.ndarray, lumen_um: np.ndarray, in_fat: np.ndarray) -> np.ndarray:
    """(N, L + 4) features: logit of each finding's highest tile probability, then SHAPE_FEATURES."""
    p = np.clip(np.asarray(tile_probs, np.float64), _EPS, 1 - _EPS)
    outer = np.maximum(np.asarray(outer_um, np.float64), 1.0)
    lumen = np.nan_to_num(np.asarray(lumen_um, np.float64), nan=0.0)
    ratio = np.clip(lumen / outer, 0.0, 1.0)
    return np.column_stack([np.log(p / (1 - p)), np.log(outer), ratio, (1 - ratio) / 2,
                            np.asarray(in_fat, np.float64)])


@dataclass
class VesselHead:
    labels: list[str]
    mean: list[float]
    scale: list[float]
    coef: dict[str, list[float]]
    intercept: dict[str, float]
    metrics: dict[str, Any] = field(default_factory=dict)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """(N, L) probabilities for (N, F) features."""
        z = (np.asarray(features, np.float64) - np.asarray(self.mean)) / np.asarray(self.scale)
        logits = np.column_stack([z @ np.asarray(self.coef[k]) + self.intercept[k] for k in self.labels])
        return 1 / (1 + np.exp(-logits))

    def to_dict(self) -> dict[str, Any]:
        return {"labels": self.labels, "features": [f"logit_{k}" for k in self.labels] + list(SHAPE_FEATURES),
                "mean": self.mean, "scale": self.scale, "coef": self.coef, "intercept": self.intercept,
                "metrics": self.metrics}

    @classmethod
    def from_dict(cls, data: dict[str, Any], labels: list[str]) -> VesselHead:
        try:
            head = cls(list(data["labels"]), [float(v) for v in data["mean"]], [float(v) for v in data["scale"]],
                       {k: [float(v) for v in data["coef"][k]] for k in data["labels"]},
                       {k: float(data["intercept"][k]) for k in data["labels"]}, dict(data.get("metrics", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise CalciscopeError(f"the model card's extra.vessel_head is malformed ({exc!r})") from None
        n = len(labels) + len(SHAPE_FEATURES)
        if head.labels != list(labels) or len(head.mean) != n or any(len(c) != n for c in head.coef.values()) \
                or not all(math.isfinite(v) for v in head.mean + head.scale):
            raise CalciscopeError("the model card's extra.vessel_head does not fit the model's labels")
        return head


def fit_vessel_head(features: np.ndarray, targets: np.ndarray, labels: list[str], groups: np.ndarray | None = None,
                    *, c: float = 1.0, folds: int = 5, seed: int = 0) -> VesselHead:
    """Logistic regression per finding on standardised features; with ``groups`` (patients), also a grouped
    k-fold estimate of per-vessel AUROC (``metrics``), from out-of-fold predictions."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold

    x = np.asarray(features, np.float64)
    y = np.asarray(targets, np.int64)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale < 1e-6] = 1.0
    z = (x - mean) / scale

    def fit(zz, yy):
        if len(np.unique(yy)) < 2:
            raise CalciscopeError("fitting the vessel head needs vessels with and without every finding")
        return LogisticRegression(C=c, max_iter=2000).fit(zz, yy)

    models = {k: fit(z, y[:, j]) for j, k in enumerate(labels)}
    metrics: dict[str, Any] = {"n_vessels": int(len(y)), "n_positive": {k: int(y[:, j].sum()) for j, k in enumerate(labels)}}
    if groups is not None and len(np.unique(groups)) >= folds:
        oof = np.zeros(y.shape, np.float64)
        for train, test in GroupKFold(n_splits=folds).split(z, y, groups):
            for j, k in enumerate(labels):
                oof[test, j] = fit(z[train], y[train, j]).predict_proba(z[test])[:, 1]
        metrics["cv_auroc"] = {k: round(float(roc_auc_score(y[:, j], oof[:, j])), 4) for j, k in enumerate(labels)}
        metrics["cv_auroc_tiles_only"] = {k: round(float(roc_auc_score(y[:, j], x[:, j])), 4)
                                          for j, k in enumerate(labels)}
        metrics["folds"] = folds
    return VesselHead(list(labels), mean.tolist(), scale.tolist(),
                      {k: m.coef_[0].tolist() for k, m in models.items()},
                      {k: float(m.intercept_[0]) for k, m in models.items()}, metrics)
