"""Tile probabilities → slide probabilities (tile models; MIL models aggregate with their attention head).

A lesion covers a handful of tiles in a slide of thousands, so the slide score looks at the most suspicious
tiles: the mean of the top-k (default), the maximum, or a high quantile, per finding.
"""

from __future__ import annotations

import numpy as np

from calciscope.errors import CalciscopeError

METHODS = ("topk", "max", "quantile")


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


def slide_probabilities(tile_probs: np.ndarray, card, *, method: str | None = None, k: int | None = None,
                        quantile: float | None = None) -> np.ndarray:
    """(N, L) calibrated tile probabilities of a tile model → (L,) slide probabilities, as the card prescribes.

    Arguments left as None take the card's trained aggregation (see ``aggregation_settings``).
    """
    settings = aggregation_settings(card)
    method = method or settings["method"]
    k = settings["k"] if k is None else k
    quantile = settings["quantile"] if quantile is None else quantile
    return aggregate(tile_probs, method, k=k, quantile=quantile)
