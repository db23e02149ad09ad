"""From a fold's best weights to its deliverable: the prior correction, temperature scaling and decision thresholds
fit on the validation split (and, with ``calibration.slide``, the slide calibration and slide thresholds on the
validation slides), the metrics, and the model card."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from calciscope._version import __version__
from calciscope.errors import CalciscopeError
from calciscope.io import sha256_file, write_json
from calciscope.model import IMAGENET_MEAN, IMAGENET_STD, ModelCard, load_checkpoint, save_checkpoint
from calciscope.model.aggregate import apply_slide_calibration
from calciscope.model.calibration import apply_temperature
from calciscope.model.cua import CUARule
from calciscope.model.precision import Precision
from calciscope.training import calibration, metrics
from calciscope.training.config import TrainConfig
from calciscope.training.data import DataBundle
from calciscope.training.engine import predict_logits
from calciscope.training.evaluation import metric_report, slide_scores
from calciscope.training.loaders import eval_loader, imagenet_norm
from calciscope.training.splits import Fold


@dataclass
class FoldResult:
    fold: int
    directory: Path
    best_score: float
    metrics: dict


def finalize_fold(config: TrainConfig, data: DataBundle, fold: Fold, fold_dir: Path, val_set, precision: Precision,
                  best_score: float, prior_shift=None) -> FoldResult:
    """Best weights → prior correction, temperature and thresholds on validation (and, with
    ``calibration.slide``, the slide calibration and slide thresholds on the validation slides) → metrics, card."""
    model, _ = load_checkpoint(fold_dir / "best")
    if prior_shift is not None:
        shift_output_bias(model, -prior_shift)
    mean, std = imagenet_norm()
    logits, y, positions = predict_logits(model.to(precision.device), eval_loader(val_set, config, data.collate),
                                          precision, mean, std)
    temperature = calibration.fit_temperature(logits, y) if config.calibration.temperature else np.ones(len(data.labels))
    probs = apply_temperature(logits, temperature)
    thresholds = choose_thresholds(y, probs, config, data.labels)
    card = make_card(config, data, model, {}, thresholds=thresholds,
                     temperature=calibration.temperatures_by_label(data.labels, temperature))
    if config.calibration.slide and data.slide_of is not None:
        scores, slide_y = slide_scores(probs, data, val_set, positions, card)
        card.slide_calibration = {}
        for j, label in enumerate(data.labels):
            a, b = calibration.fit_platt(scores[:, j], slide_y[:, j], prior_sd=config.calibration.slide_prior_sd)
            card.slide_calibration[label] = {"a": a, "b": b}
        slide_probs = apply_slide_calibration(scores, card.slide_calibration, data.labels)
        card.extra["tile_thresholds"] = thresholds
        card.thresholds = choose_thresholds(slide_y, slide_probs, config, data.labels)
        metrics.plot_reliability(slide_y, slide_probs, data.labels, fold_dir / "reliability_slides.png",
                                 n_bins=10, title="Reliability, validation slides")
    card.metrics = {"val": metric_report(y, probs, data, val_set, positions, config, card)}
    metrics.plot_roc(y, probs, data.labels, fold_dir / "roc.png", title=f"ROC, validation tiles (fold {fold.index})")
    metrics.plot_reliability(y, probs, data.labels, fold_dir / "reliability.png")
    save_checkpoint(fold_dir / "model", model, card)
    write_json(fold_dir / "fold_metrics.json", card.metrics)
    return FoldResult(fold.index, fold_dir, float(best_score), card.metrics)


def shift_output_bias(model: nn.Module, shift) -> None:
    """Add ``shift`` (one value per label) to the output layer's bias."""
    layer = model.mil.classifier if hasattr(model, "mil") else model.head
    with torch.no_grad():
        layer.bias += torch.as_tensor(np.asarray(shift, np.float32)).to(layer.bias)


def prior_shift(train_labels: np.ndarray, weights, pos_weight, natural_labels: np.ndarray) -> np.ndarray | None:
    """Per label, log(training odds / natural odds): how far the loss weights (``pos_weight``), the sampling weights
    (class-balanced or mined) and dropped negatives moved the model's prior from the data it will score
    (every tile of the training slides). Subtracting it from the output bias is the prior correction
    (King & Zeng 2001); temperature scaling alone cannot undo a shift. None when nothing moved it."""
    y = np.asarray(train_labels, np.float64)
    w = np.ones(len(y)) if weights is None else np.asarray(weights, np.float64)
    pw = np.ones(y.shape[1]) if pos_weight is None else pos_weight.numpy().astype(np.float64)
    pos, neg = (w[:, None] * y).sum(0) * pw, (w[:, None] * (1 - y)).sum(0)
    nat = np.asarray(natural_labels, np.float64)
    nat_pos, nat_neg = nat.sum(0), len(nat) - nat.sum(0)
    ok = (pos > 0) & (neg > 0) & (nat_pos > 0) & (nat_neg > 0)
    shift = np.zeros(y.shape[1])
    shift[ok] = np.log(pos[ok] / neg[ok]) - np.log(nat_pos[ok] / nat_neg[ok])
    return shift if np.any(shift != 0) else None


def natural_labels(data: DataBundle, fold: Fold, train_labels: np.ndarray, config: TrainConfig) -> np.ndarray:
    """The labels of every example the model will score (every tile of the training slides, for slide sources)."""
    if config.data.source == "slides" and data.examples is not None:
        return data.examples.labels[data.examples.tiles_of(fold.train)]
    return train_labels


def choose_thresholds(y, probs, config: TrainConfig, labels) -> dict[str, float]:
    """Per-finding decision thresholds, chosen on validation examples (fallback 0.5 where one class is missing)."""
    out = {}
    for j, label in enumerate(labels):
        try:
            out[label] = float(metrics.choose_threshold(y[:, j], probs[:, j], config.calibration.threshold,
                                                        config.calibration.target_sensitivity))
        except CalciscopeError:
            out[label] = 0.5
    return out


def make_card(config: TrainConfig, data: DataBundle, model: nn.Module, report: dict, *, thresholds=None,
              temperature=None) -> ModelCard:
    return ModelCard(
        name=config.model.name,
        version=config.model.version,
        labels=list(data.labels),
        backbone=getattr(model, "backbone_name", config.model.backbone),
        head=getattr(model, "head_kind", config.model.head),
        tile_px=config.data.tile_px,
        mpp=config.data.mpp,
        mean=list(IMAGENET_MEAN),
        std=list(IMAGENET_STD),
        thresholds=thresholds or {},
        temperature=temperature or {},
        cua_rule=CUARule.from_dict(config.cua_rule).to_dict(),
        training={"description": config.description, "data": data.describe, "config": config.to_dict(),
                  "seed": config.seed, "data_hashes": data_hashes(config)},
        metrics=report,
        synthetic_demo=config.synthetic_demo,
        extra={"aggregation": config.to_dict()["aggregation"], "stain_normalize": config.data.stain_normalize,
               "sampling": config.data.sampling,
               "calciscope_version_trained": __version__},
    )


def data_hashes(config: TrainConfig) -> dict:
    out = {}
    for key in ("manifest", "tiles"):
        value = getattr(config.data, key)
        if value and Path(value).is_file():
            out[key] = sha256_file(value)
    return out


def add_card_metrics(model_dir: Path, extra_metrics: dict) -> None:
    model, card = load_checkpoint(model_dir)
    card.metrics = {**card.metrics, **extra_metrics}
    save_checkpoint(model_dir, model, card)
