"""What a card's out-of-distribution (OOD) reference means: how unlike its network's training data a tile, window
or vessel crop is, and when a slide is too unlike it for the network's outputs to be trusted.

A reference describes the features a network computes just before its head (``model.ood_features`` says which:
the tile model's embedding, the vessel segmenter's bottleneck pooled per window, a vessel classifier's pooled crop
features) on its training data, in a few numbers the card carries (``CardBase.ood_reference``, a dict; empty: none):

- the features' mean, their top principal directions (enough for ``VARIANCE_KEPT`` of the variance, at most
  ``MAX_COMPONENTS``) with their variances, and the mean variance of the remaining directions;
- a unit's **distance** is the PCA-whitened Mahalanobis distance with a residual term (probabilistic PCA), divided
  by the feature dimension, square-rooted: about 1 for a typical training unit. A unit that moves along directions
  the training data never varied in (new textures, colours, scales) is far, even when it is close in Euclidean terms.
- the distance is **calibrated** on validation units (slides the reference was not fit on): a unit's **score** is
  the share of validation units that are nearer (interpolated between stored quantiles; 1 beyond the farthest), and
  a unit is OOD above ``unit_threshold``, the distance only ``unit_false_alarm`` (1 %) of validation units exceed;
- a **slide's score** is the fraction of its units that are OOD; the slide is OOD above ``slide_threshold``, set on
  the validation slides for a false-alarm rate of ``slide_false_alarm`` (5 %): the split-conformal quantile of their
  fractions (their largest when there are fewer than 1 / rate of them), and never below ``MIN_SLIDE_THRESHOLD``.

Why this and not a k-NN set: a mean and at most 32 directions of a 192-wide embedding fit in a JSON card and score a
slide's tiles in one matrix product; and on the shipped demo's networks it separated real H&E from unseen phantoms
better than the cosine distance to the k nearest training units (k 1 or 5, 256 to all units kept). The slide rule
rests on a fraction of units, which is what a reader can check.

A single unit beyond the unit threshold is expected on 1 % of in-distribution units; what predict says about one
vessel (``inference.ood``) uses the stricter ``farthest``: beyond every validation unit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

METHOD = "pca_mahalanobis"
MAX_COMPONENTS = 32
VARIANCE_KEPT = 0.99
UNIT_FALSE_ALARM = 0.01
SLIDE_FALSE_ALARM = 0.05
# a slide is never called OOD for a quarter of a network's units or fewer: a network sees 10-30 windows or vessel
# crops on a biopsy, so a fraction made of a few units is noise (on 60 unseen demo phantoms a floor of 0.10 flagged
# 5 slides, none had more than 0.20), and a validation set of a few dozen slides cannot place a 95 % quantile
MIN_SLIDE_THRESHOLD = 0.25
QUANTILE_LEVELS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.975, 0.99, 0.995, 0.999, 1.0)
_REQUIRED = ("unit", "features", "dim", "mean", "components", "variances", "residual_variance", "quantiles",
             "unit_threshold", "slide_threshold")
_VARIANCE_FLOOR = 1e-3  # of the mean variance: directions the training data never moved in still get a finite scale


@dataclass
class OODReference:
    """A card's OOD reference (see the module docstring); ``to_dict()`` is what the card stores."""

    unit: str  # what one scored unit is: tile | window | vessel
    features: str  # where the features come from, in words
    dim: int
    mean: list[float]
    components: list[list[float]]  # (k, dim) principal directions, rows of unit length
    variances: list[float]  # (k,) their variances
    residual_variance: float  # the mean variance of the other dim - k directions
    quantiles: list[float]  # validation distances at QUANTILE_LEVELS
    unit_threshold: float  # distance above which a unit is OOD
    slide_threshold: float  # fraction of OOD units above which a slide is OOD
    method: str = METHOD
    quantile_levels: list[float] = field(default_factory=lambda: list(QUANTILE_LEVELS))
    unit_false_alarm: float = UNIT_FALSE_ALARM
    slide_false_alarm: float = SLIDE_FALSE_ALARM
    fit: dict[str, Any] = field(default_factory=dict)  # how it was fit: data, unit and slide counts, rules, figures

    def __post_init__(self) -> None:
        self._mean = np.asarray(self.mean, np.float64)
        self._components = np.asarray(self.components, np.float64).reshape(-1, self.dim)
        self._scale = 1.0 / np.sqrt(np.asarray(self.variances, np.float64))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "OODReference":
        problem = reference_problem(data)
        if problem:
            raise ValueError(f"not a valid OOD reference: {problem}")
        return cls(**data)

    def distances(self, features: np.ndarray) -> np.ndarray:
        """(N,) distance of each row of (N, dim) features: sqrt(Mahalanobis² / dim) under the PCA model."""
        x = np.asarray(features, np.float64).reshape(-1, self.dim) - self._mean
        projected = x @ self._components.T
        residual = np.maximum((x * x).sum(axis=1) - (projected * projected).sum(axis=1), 0.0)
        d2 = ((projected * self._scale) ** 2).sum(axis=1) + residual / self.residual_variance
        return np.sqrt(d2 / self.dim)

    def unit_scores(self, distances: np.ndarray) -> np.ndarray:
        """(N,) calibrated scores in [0, 1]: the share of validation units nearer than each distance."""
        q = np.asarray(self.quantiles, np.float64)
        levels = np.asarray(self.quantile_levels, np.float64)
        d = np.asarray(distances, np.float64)
        q, keep = np.unique(q, return_index=True)  # ties (a step in the validation distances): the lowest level
        return np.where(d > q[-1], 1.0, np.interp(d, q, levels[keep], left=0.0))

    @property
    def farthest(self) -> float:
        """The largest validation distance: a unit beyond it is farther from the training data than every unit the
        reference was calibrated on."""
        return float(self.quantiles[-1])

    def summary(self, distances: np.ndarray) -> dict[str, Any]:
        """A slide's OOD summary from its units' distances: score (fraction of OOD units), threshold, flagged."""
        d = np.asarray(distances, np.float64)
        n, n_ood = int(len(d)), int((d > self.unit_threshold).sum())
        fraction = n_ood / n if n else 0.0
        return {"unit": self.unit, "n_units": n, "n_ood_units": n_ood, "score": round(fraction, 6),
                "threshold": round(self.slide_threshold, 6), "flagged": bool(n and fraction > self.slide_threshold),
                "median_unit_score": round(float(np.median(self.unit_scores(d))), 6) if n else None,
                "median_distance": round(float(np.median(d)), 4) if n else None,
                "unit_threshold": round(self.unit_threshold, 4), "unit_false_alarm": self.unit_false_alarm,
                "slide_false_alarm": self.slide_false_alarm}


def fit_reference(train: np.ndarray, val: np.ndarray, val_groups: np.ndarray | None, *, unit: str, features: str,
                  unit_false_alarm: float = UNIT_FALSE_ALARM, slide_false_alarm: float = SLIDE_FALSE_ALARM,
                  max_components: int = MAX_COMPONENTS, variance_kept: float = VARIANCE_KEPT,
                  fit_info: dict[str, Any] | None = None) -> OODReference:
    """Fit a reference on (N, D) training features; calibrate it on (M, D) validation features, whose slides are
    ``val_groups`` (M,) (None: no slides, e.g. tile folders; the slide threshold is then ``MIN_SLIDE_THRESHOLD``)."""
    train = np.asarray(train, np.float64)
    val = np.asarray(val, np.float64)
    if train.ndim != 2 or len(train) < 2 or val.ndim != 2 or len(val) < 1 or val.shape[1] != train.shape[1]:
        raise ValueError(f"an OOD reference needs (N >= 2, D) training and (M >= 1, D) validation features, got "
                         f"{train.shape} and {val.shape}")
    dim = train.shape[1]
    mean = train.mean(axis=0)
    variances, vectors = np.linalg.eigh(np.cov(train - mean, rowvar=False).reshape(dim, dim))
    order = np.argsort(variances)[::-1]
    variances, vectors = np.maximum(variances[order], 0.0), vectors[:, order]
    floor = max(float(variances.mean()) * _VARIANCE_FLOOR, 1e-12)
    share = np.cumsum(variances) / max(float(variances.sum()), 1e-12)
    k = int(min(max_components, dim - 1 if dim > 1 else 1, np.searchsorted(share, variance_kept) + 1))
    rest = variances[k:]
    ref = OODReference(
        unit=unit, features=features, dim=dim, mean=_floats(mean), components=[_floats(v) for v in vectors[:, :k].T],
        variances=_floats(np.maximum(variances[:k], floor)),
        residual_variance=float(max(rest.mean() if len(rest) else floor, floor)),
        quantiles=[], unit_threshold=0.0, slide_threshold=MIN_SLIDE_THRESHOLD, unit_false_alarm=unit_false_alarm,
        slide_false_alarm=slide_false_alarm)
    d_val = ref.distances(val)
    ref.quantiles = _floats(np.quantile(d_val, QUANTILE_LEVELS))
    ref.unit_threshold = float(np.quantile(d_val, 1.0 - unit_false_alarm))
    info = {"n_train_units": int(len(train)), "n_validation_units": int(len(val)), "components": k,
            "variance_kept": round(float(share[k - 1]), 4),
            "validation_unit_false_alarm": round(float((d_val > ref.unit_threshold).mean()), 4)}
    if val_groups is not None:
        groups = np.asarray(val_groups)
        fractions = np.array([float((d_val[groups == g] > ref.unit_threshold).mean()) for g in np.unique(groups)])
        ref.slide_threshold = max(conformal_threshold(fractions, slide_false_alarm), MIN_SLIDE_THRESHOLD)
        info.update({"n_validation_slides": int(len(fractions)),
                     "validation_slide_fractions": {"median": round(float(np.median(fractions)), 4),
                                                    "max": round(float(fractions.max()), 4)},
                     "validation_slides_flagged": int((fractions > ref.slide_threshold).sum())})
    info["rules"] = (f"unit threshold: the {1 - unit_false_alarm:.1%} quantile of validation distances; slide threshold:"
                     f" the split-conformal {1 - slide_false_alarm:.0%} quantile of validation slides' OOD fractions "
                     f"(their largest when fewer than {math.ceil(1 / slide_false_alarm) - 1}), at least "
                     f"{MIN_SLIDE_THRESHOLD:g}")
    ref.fit = {**info, **(fit_info or {})}
    return ref


def conformal_threshold(values: np.ndarray, false_alarm: float) -> float:
    """The ceil((1 - rate)(n + 1))-th smallest of n values (their largest when that rank is beyond n): a new value
    from the same distribution exceeds it with probability at most ``false_alarm`` (split conformal)."""
    v = np.sort(np.asarray(values, np.float64))
    rank = math.ceil((1.0 - false_alarm) * (len(v) + 1))
    return float(v[min(rank, len(v)) - 1])


def _floats(a: np.ndarray) -> list[float]:
    """float32 precision is plenty for a reference and keeps the card small."""
    return [float(f"{v:.7g}") for v in np.asarray(a, np.float64).ravel()]


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def reference_problem(data: Any) -> str | None:
    """What is wrong with a card's ``ood_reference`` value ({} is fine: no reference), or None."""
    if data == {}:
        return None
    if not isinstance(data, dict):
        return "must be an object"
    known = {f.name for f in fields(OODReference)}
    if set(data) - known or set(_REQUIRED) - set(data):
        return f"needs keys {list(_REQUIRED)} (and only {sorted(known)})"
    dim = data["dim"]
    if not (isinstance(dim, int) and dim > 0) or data.get("method", METHOD) != METHOD \
            or not all(isinstance(data[k], str) for k in ("unit", "features")) \
            or not isinstance(data.get("fit", {}), dict):
        return f"needs a positive dim, method {METHOD!r}, unit and features as text and fit an object"
    comps, var = data["components"], data["variances"]
    numbers = [data["mean"], var, data["quantiles"], *(comps if isinstance(comps, list) else [None])]
    if not all(isinstance(v, list) and all(_is_num(x) for x in v) for v in numbers):
        return "mean, components, variances and quantiles must be lists of finite numbers"
    if len(data["mean"]) != dim or not comps or any(len(c) != dim for c in comps) or len(var) != len(comps):
        return f"mean must have {dim} numbers, and each of the components (as many as variances) too"
    levels = data.get("quantile_levels", list(QUANTILE_LEVELS))
    if len(data["quantiles"]) != len(levels) or any(b < a for a, b in zip(data["quantiles"], data["quantiles"][1:])):
        return "quantiles must be as many as quantile_levels and non-decreasing"
    if not all(_is_num(data[k]) and data[k] > 0 for k in ("residual_variance", "unit_threshold")) \
            or any(v <= 0 for v in var) or not (_is_num(data["slide_threshold"]) and 0 <= data["slide_threshold"] <= 1):
        return "variances, residual_variance and unit_threshold must be > 0, slide_threshold in [0, 1]"
    return None
