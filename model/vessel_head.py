"""The vessel head: per-vessel calibrated probabilities from the tile model's scores plus the vessel's size and place.

A tile sees a 112 µm window, and what separates some findings is the vessel itself: medial calcification sits in
the media of arterioles and small arteries, small-vessel (mural) calcification in capillaries and arterioles under
~40 µm. So each finding gets a logistic regression on the vessel's features — the logit of its tiles' highest probability
for that finding, log outer diameter, lumen / outer diameter, wall thickness / outer diameter, and whether it lies
in subcutaneous fat (the other findings' logits are left out: with a few dozen positive vessels they overfit) — fit on detected vessels matched to annotated ones (``calciscope
fit-vessel-head``). The fit is stored in the model card (``extra.vessel_head``) and applied by vessel analysis; a
card without one gives each vessel its tiles' highest calibrated probability.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from calciscope.errors import CalciscopeError
from calciscope.model.aggregate import slide_from_vessels

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
    # slide level: {label: {"a", "b"}} logistic map from the highest vessel probability to a slide probability
    slide_calibration: dict[str, dict[str, float]] = field(default_factory=dict)

    def slide_probabilities(self, vessel_probs: np.ndarray) -> np.ndarray:
        """(L,) slide probabilities from (N, L) vessel probabilities: the highest per finding (0 without vessels),
        through ``slide_calibration``."""
        return slide_from_vessels(vessel_probs, self.slide_calibration, self.labels)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """(N, L) probabilities for (N, F) features."""
        z = (np.asarray(features, np.float64) - np.asarray(self.mean)) / np.asarray(self.scale)
        logits = np.column_stack([z @ np.asarray(self.coef[k]) + self.intercept[k] for k in self.labels])
        return 1 / (1 + np.exp(-logits))

    def to_dict(self) -> dict[str, Any]:
        return {"labels": self.labels, "features": [f"logit_{k}" for k in self.labels] + list(SHAPE_FEATURES),
                "mean": self.mean, "scale": self.scale, "coef": self.coef, "intercept": self.intercept,
                "slide_calibration": self.slide_calibration, "metrics": self.metrics}

    @classmethod
    def from_dict(cls, data: dict[str, Any], labels: list[str]) -> VesselHead:
        try:
            head = cls(list(data["labels"]), [float(v) for v in data["mean"]], [float(v) for v in data["scale"]],
                       {k: [float(v) for v in data["coef"][k]] for k in data["labels"]},
                       {k: float(data["intercept"][k]) for k in data["labels"]}, dict(data.get("metrics", {})),
                       {k: {"a": float(v["a"]), "b": float(v["b"])}
                        for k, v in (data.get("slide_calibration") or {}).items()})
        except (KeyError, TypeError, ValueError) as exc:
            raise CalciscopeError(f"the model card's extra.vessel_head is malformed ({exc!r})") from None
        n = len(labels) + len(SHAPE_FEATURES)
        if head.labels != list(labels) or len(head.mean) != n or any(len(c) != n for c in head.coef.values()) \
                or not all(math.isfinite(v) for v in head.mean + head.scale):
            raise CalciscopeError("the model card's extra.vessel_head does not fit the model's labels")
        return head


def fit_vessel_head(features: np.ndarray, targets: np.ndarray, labels: list[str], groups: np.ndarray | None = None,
                    *, c: float = 1.0, folds: int = 5, seed: int = 0) -> VesselHead:
    """Logistic regression per finding on standardised features. Three feature sets compete per finding — the
    finding's own tile logit alone (a monotone recalibration), that logit plus the shape features, and every
    finding's logit plus the shape features — and, with ``groups`` (patients) for a grouped k-fold, the one with
    the highest out-of-fold per-vessel AUROC is kept, the simpler on a tie (``metrics``: every AUROC and the
    choice); without groups, the own logit plus the shape features are used."""
    # imported here: scikit-learn takes about a second to import, and only fitting needs it (predict does not)
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold

    x = np.asarray(features, np.float64)
    y = np.asarray(targets, np.int64)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale < 1e-6] = 1.0
    z = (x - mean) / scale
    n_labels = len(labels)
    sets = {"tile_logit": lambda j: np.array([j]),
            "tile_logit+shape": lambda j: np.r_[j, np.arange(n_labels, x.shape[1])],
            # every finding's logit: medial and small-vessel calcification share the calcium signal, and the
            # vessel's calibre (with the other finding's logit) tells them apart
            "tile_logits+shape": lambda j: np.arange(x.shape[1])}

    def fit(zz, yy):
        if len(np.unique(yy)) < 2:
            raise CalciscopeError("fitting the vessel head needs vessels with and without every finding")
        return LogisticRegression(C=c, max_iter=2000).fit(zz, yy)

    metrics: dict[str, Any] = {"n_vessels": int(len(y)), "n_positive": {k: int(y[:, j].sum()) for j, k in enumerate(labels)}}
    chosen = {k: "tile_logit+shape" for k in labels}
    if groups is not None and len(np.unique(groups)) >= folds:
        splits = list(GroupKFold(n_splits=folds).split(z, y, groups))
        cv: dict[str, dict[str, float]] = {}
        for j, k in enumerate(labels):
            cv[k] = {}
            for name, cols in sets.items():
                oof = np.zeros(len(y))
                for train, test in splits:
                    oof[test] = fit(z[train][:, cols(j)], y[train, j]).predict_proba(z[test][:, cols(j)])[:, 1]
                cv[k][name] = round(float(roc_auc_score(y[:, j], oof)), 4)
            simpler = list(sets)  # on a tie the simpler feature set wins
            chosen[k] = max(cv[k], key=lambda name: (cv[k][name], -simpler.index(name)))
        metrics.update(cv_auroc={k: cv[k][chosen[k]] for k in labels}, cv_auroc_by_features=cv, features=chosen,
                       folds=folds)
    coef, intercept = {}, {}
    for j, k in enumerate(labels):
        cols = sets[chosen[k]](j)
        model = fit(z[:, cols], y[:, j])
        full = np.zeros(x.shape[1])
        full[cols] = model.coef_[0]
        coef[k], intercept[k] = full.tolist(), float(model.intercept_[0])
    return VesselHead(list(labels), mean.tolist(), scale.tolist(), coef, intercept, metrics)
