"""Tile probabilities → slide probabilities (tile models; MIL models aggregate with their attention head).

A lesion covers a handful of tiles in a slide of thousands, so the slide score looks at the most suspicious
tiles: the mean of the top-k (default), the maximum, or a high quantile, per finding.

That aggregate is a ranking score, not a probability: a negative slide with many tiles has a high top-k by
chance. Cards trained with slide calibration (``ModelCard.slide_calibration``) therefore map it through a
per-finding logistic (Platt) curve fit on validation slides:

    p_slide = sigmoid(a * logit(clip(aggregate, EPS, 1 - EPS)) + b)        (a > 0: the ranking is unchanged)

``slide_probabilities`` is the one entry point: (N, L) calibrated tile probabilities → (L,) slide probabilities,
aggregation and slide calibration exactly as the card prescribes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from calciscope.errors import CalciscopeError

METHODS = ("topk", "max", "quantile")
EPS = 1e-6  # aggregates are clipped to [EPS, 1 - EPS] before the logit


def aggregate(tile_probs: np.ndarray, method: str = "topk", *, k: int = 3, quantile: float = 0.98) -> np.ndarray:
    """(N, L) tile probabilities → (L,) slide probabilities."""
    probs = np.asarray(tile_probs, dtype=np.float64)
    if probs.ndim != 2:
        raise CalciscopeError(f"tile probabilities must be (tiles, labels), got shape {probs.shape}")
    if len(probs) == 0:
        raise CalciscopeError("no tiles to aggregate")
    if method == "max":
        return probs.max(axis=0)
    if method == "topk":
        k = max(1, min(int(k), len(probs)))
        return np.sort(probs, axis=0)[-k:].mean(axis=0)
    if method == "quantile":
        return np.quantile(probs, quantile, axis=0)
    raise CalciscopeError(f"unknown aggregation {method!r}; choose one of: {', '.join(METHODS)}")


def aggregation_settings(card) -> dict:
    """The card's slide aggregation (``method``, ``k``, ``quantile``) as trained; defaults when it has none."""
    settings = dict(card.training.get("config", {}).get("aggregation") or {})
    return {"method": settings.get("method", "topk"), "k": int(settings.get("k", 3)),
            "quantile": float(settings.get("quantile", 0.98))}


def logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0 - EPS)
    return np.log(p) - np.log1p(-p)


def apply_slide_calibration(slide_scores: np.ndarray, calibration: Mapping[str, Mapping[str, float]],
                            labels: Sequence[str], grid: np.ndarray | None = None) -> np.ndarray:
    """Aggregated scores (L,) or (S, L), columns named by ``labels`` → calibrated slide probabilities.

    ``calibration`` is {label: {"a": slope, "b": intercept}} (a card's ``slide_calibration``); labels it does
    not name pass through unchanged, so an empty mapping is the identity. A vessel classifier's map may add
    ``"grid": weight``, a second route to the finding that needs no vessel outline (the exclusion finding,
    vasculitis: an infiltrate round a vessel the segmenter missed): ``z = a · logit(score) + grid · logit(g) + b``
    with ``g`` the tile model's own slide probability over the grid tiles (``grid``, same shape as the scores).
    """
    scores = np.asarray(slide_scores, dtype=np.float64)
    if scores.shape[-1] != len(labels):
        raise CalciscopeError(f"slide scores with {scores.shape[-1]} columns for {len(labels)} labels")
    out = scores.copy()
    for j, label in enumerate(labels):
        params = calibration.get(label)
        if params:
            z = float(params["a"]) * logit(scores[..., j]) + float(params["b"])
            if params.get("grid"):
                if grid is None:
                    raise CalciscopeError(f"the slide map of {label!r} has a grid route: it needs the tile model's "
                                          f"slide probabilities over the grid tiles")
                z = z + float(params["grid"]) * logit(np.asarray(grid, np.float64)[..., j])
            out[..., j] = 0.5 * (1.0 + np.tanh(0.5 * z))  # sigmoid, without overflow warnings
    return out


def slide_from_vessels(vessel_probs: np.ndarray, calibration: Mapping[str, Mapping[str, float]],
                       labels: Sequence[str], grid: np.ndarray | None = None) -> np.ndarray:
    """(L,) slide probabilities from (N, L) calibrated per-vessel probabilities: the highest per finding (0 without
    vessels), through ``calibration`` (see ``apply_slide_calibration``; ``grid``: the grid route's input)."""
    top = np.asarray(vessel_probs, np.float64).max(axis=0) if len(vessel_probs) else np.zeros(len(labels))
    return apply_slide_calibration(top, calibration, labels, grid)


def slide_probabilities(tile_probs: np.ndarray, card, *, method: str | None = None, k: int | None = None,
                        quantile: float | None = None) -> np.ndarray:
    """(N, L) calibrated tile probabilities of a tile model → (L,) slide probabilities, as the card prescribes.

    Arguments left as None take the card's trained aggregation (see ``aggregation_settings``). The card's slide
    calibration (fit for that aggregation) is applied when the aggregation used is the trained one; an
    aggregation chosen otherwise returns its raw aggregate, which is a score, not a calibrated probability.
    """
    settings = aggregation_settings(card)
    method = method or settings["method"]
    k = settings["k"] if k is None else k
    quantile = settings["quantile"] if quantile is None else quantile
    scores = aggregate(tile_probs, method, k=k, quantile=quantile)
    calibration = getattr(card, "slide_calibration", None) or {}
    if calibration and _same_aggregation(settings, method, k, quantile):
        scores = apply_slide_calibration(scores, calibration, card.labels)
    return scores


def _same_aggregation(settings: dict, method: str, k: int, quantile: float) -> bool:
    if method != settings["method"]:
        return False
    if method == "topk":
        return int(k) == settings["k"]
    if method == "quantile":
        return float(quantile) == settings["quantile"]
    return True
