"""Metrics of a tile / attention-MIL model on labelled units: per example (tile or bag) and, for slide sources, per
slide (as inference aggregates and calibrates them) with the CUA-pattern score."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from calciscope.io import write_json
from calciscope.model import ModelCard, load_checkpoint
from calciscope.model.aggregate import aggregate, slide_probabilities
from calciscope.model.calibration import apply_temperature
from calciscope.model.cua import CUARule, cua_score
from calciscope.model.precision import Precision
from calciscope.training import metrics
from calciscope.training.config import TrainConfig
from calciscope.training.data import DataBundle
from calciscope.training.engine import predict_logits
from calciscope.training.loaders import eval_loader


def evaluate_units(model_dir: Path, data: DataBundle, units: np.ndarray, config: TrainConfig, precision: Precision,
                   out_dir: Path) -> dict:
    """Metrics of a finished model on some units (the frozen test split, or any labelled data)."""
    model, card = load_checkpoint(model_dir)
    dataset = data.make_dataset(units, False)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (card.mean, card.std))
    logits, y, positions = predict_logits(model.to(precision.device), eval_loader(dataset, config, data.collate),
                                          precision, mean, std)
    temperature = [card.temperature.get(label, 1.0) for label in data.labels]
    probs = apply_temperature(logits, temperature)
    report = metric_report(y, probs, data, dataset, positions, config, card)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics.plot_roc(y, probs, data.labels, out_dir / "roc.png")
    metrics.plot_reliability(y, probs, data.labels, out_dir / "reliability.png")
    if card.slide_calibration and data.slide_of is not None:
        slide_y, slide_p = slide_probs(probs, data, dataset, positions, card)
        metrics.plot_reliability(slide_y, slide_p, data.labels, out_dir / "reliability_slides.png", n_bins=10,
                                 title="Reliability, slides")
    write_json(out_dir / "metrics.json", report)
    return report


def metric_report(y, probs, data: DataBundle, dataset, positions, config: TrainConfig, card: ModelCard) -> dict:
    """Per-finding metrics on examples (tiles or bags) and, for slide sources, on slides with the CUA score.

    Slide probabilities are ``slide_probabilities`` of each slide's tiles under ``card`` (aggregation and slide
    calibration as inference computes them). Thresholds: the card's tile thresholds for tiles (its ``thresholds``
    when it has no separate ones) and its ``thresholds`` for slides."""
    tile_thresholds = card.extra.get("tile_thresholds") or card.thresholds or 0.5
    report = {"examples": metrics.multilabel_metrics(y, probs, data.labels, thresholds=tile_thresholds)}
    if data.slide_of is not None:
        slide_y, slide_p = slide_probs(probs, data, dataset, positions, card)
        report["slides"] = metrics.multilabel_metrics(slide_y, slide_p, data.labels,
                                                      thresholds=card.thresholds or 0.5)
        report["slides"]["n_slides"] = int(len(slide_y))
        rule = CUARule.from_dict(config.cua_rule)
        if set(rule.labels) <= set(data.labels):
            score = cua_score(slide_p, rule, labels=data.labels)
            truth = cua_score(slide_y, rule, labels=data.labels)
            report["slides"]["cua_pattern"] = metrics.binary_metrics((truth > 0.5).astype(int), score)
    return report


def per_slide(probs, data: DataBundle, dataset, positions, score) -> tuple[np.ndarray, np.ndarray]:
    """(slide labels (S, L), ``score(tile probabilities of the slide)`` (S, L)) of the slides in ``dataset``,
    in slide order."""
    slides = data.slide_of(dataset, positions)
    order = np.unique(slides)
    return data.unit_labels[order], np.stack([score(probs[slides == s]) for s in order])


def slide_probs(probs, data: DataBundle, dataset, positions, card: ModelCard) -> tuple[np.ndarray, np.ndarray]:
    """(slide labels (S, L), slide probabilities (S, L)) as inference computes them under ``card``."""
    return per_slide(probs, data, dataset, positions, lambda p: slide_probabilities(p, card))


def slide_scores(probs, data: DataBundle, dataset, positions, card: ModelCard) -> tuple[np.ndarray, np.ndarray]:
    """(raw aggregates (S, L), slide labels (S, L)): what the slide calibration is fit on."""
    raw = dataclasses.replace(card, slide_calibration={})
    slide_y, scores = slide_probs(probs, data, dataset, positions, raw)
    return scores, slide_y


def slide_auroc(probs, data: DataBundle, dataset, positions, config: TrainConfig) -> float | None:
    """Macro slide AUROC of the raw aggregate (for the epoch log); None without slides or with one class."""
    if data.slide_of is None:
        return None
    agg = config.aggregation
    slide_y, scores = per_slide(probs, data, dataset, positions,
                                lambda p: aggregate(p, agg.method, k=agg.k, quantile=agg.quantile))
    value = metrics.multilabel_metrics(slide_y, scores, data.labels)["macro"]["auroc"]
    return float(value) if np.isfinite(value) else None
