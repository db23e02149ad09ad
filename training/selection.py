"""From a fold's trained epochs to its deliverable: which weights ship (``optim.select``), the prior correction,
temperature scaling and decision thresholds fit on the validation split where it can support them (and, with
``calibration.slide``, the slide calibration and slide thresholds on the validation slides), the metrics, and the
model card."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from calciscope._version import __version__
from calciscope.data.stain import normalizer_from_spec
from calciscope.errors import CalciscopeError
from calciscope.io import sha256_file, write_json
from calciscope.model import IMAGENET_MEAN, IMAGENET_STD, ModelCard, load_checkpoint, save_checkpoint
from calciscope.model.aggregate import apply_slide_calibration
from calciscope.model.backbones import get_backbone_spec
from calciscope.model.calibration import apply_temperature
from calciscope.model.cua import CUARule
from calciscope.model.encoders import env_variable
from calciscope.model.precision import Precision, prepare_inputs
from calciscope.training import calibration, metrics
from calciscope.training.config import OptimConfig, TrainConfig
from calciscope.training.data import DataBundle
from calciscope.training.engine import forward, predict_logits
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
                  best_score: float, prior_shift=None, *, weights: str = "best",
                  selection: dict | None = None) -> FoldResult:
    """Shipped weights (``fold_dir / weights``) → prior correction, temperature and thresholds on validation (and,
    with ``calibration.slide``, the slide calibration and slide thresholds on the validation slides) → metrics, card.
    ``selection`` (which epoch shipped and why) goes into the card's ``training.selection``."""
    model, _ = load_checkpoint(fold_dir / weights)
    if prior_shift is not None:
        shift_output_bias(model, -prior_shift)
    mean, std = imagenet_norm()
    logits, y, positions = predict_logits(model.to(precision.device), eval_loader(val_set, config, data.collate),
                                          precision, mean, std)
    cal = config.calibration
    choose = (lambda yj, pj: metrics.choose_threshold(yj, pj, cal.threshold, cal.target_sensitivity))
    temperature, thresholds, record, warnings = calibration.robust_calibration(
        logits, y, data.labels, fit=cal.temperature, robust=cal.robust, min_per_class=cal.min_per_class,
        max_temperature=cal.max_temperature, choose=choose)
    for line in warnings:
        print(f"warning: {line}", flush=True)
    probs = apply_temperature(logits, temperature)
    card = make_card(config, data, model, {}, thresholds=thresholds,
                     temperature=calibration.temperatures_by_label(data.labels, temperature))
    card.extra["calibration"] = record
    card.extra["warnings"] = [*card.extra.get("warnings", []), *warnings]
    if selection is not None:
        card.training["selection"] = selection
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
    if isinstance(layer, nn.Sequential):  # an MLP head: its last layer
        layer = layer[-1]
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
    encoder = get_backbone_spec(getattr(model, "backbone_name", config.model.backbone)).encoder
    card = ModelCard(
        name=config.model.name,
        version=config.model.version,
        labels=list(data.labels),
        backbone=getattr(model, "backbone_name", config.model.backbone),
        head=getattr(model, "head_kind", config.model.head),
        tile_px=config.data.tile_px,
        mpp=config.data.mpp,
        mean=list(encoder.mean if encoder else IMAGENET_MEAN),
        std=list(encoder.std if encoder else IMAGENET_STD),
        thresholds=thresholds or {},
        temperature=temperature or {},
        cua_rule=CUARule.from_dict(config.cua_rule).to_dict(),
        training={"description": config.description, "data": data.describe, "config": config.to_dict(),
                  "seed": config.seed, "data_hashes": data_hashes(config)},
        metrics=report,
        synthetic_demo=config.synthetic_demo,
        extra={"aggregation": config.to_dict()["aggregation"], "stain_normalize": _normalizer_spec(config),
               "sampling": config.data.sampling,
               "calciscope_version_trained": __version__},
    )
    if encoder is not None:  # the publisher's preprocessing and weights travel with the card
        weights = getattr(model, "head_config", {}).get("encoder_weights")
        card.extra["encoder"] = {**encoder.preprocessing(), "weights": weights,
                                 "weights_env": env_variable(encoder.name)}
    return card


def _normalizer_spec(config: TrainConfig) -> dict | bool:
    """The stain normaliser's full target (what inference rebuilds with ``data.stain.normalizer_from_spec``), or
    False."""
    normalizer = normalizer_from_spec(config.data.stain_normalize)
    return normalizer.to_dict() if normalizer is not None else False


# -- which epoch ships -------------------------------------------------------------------------------------------
def choose_shipped(optim: OptimConfig, history: list[dict], best_epoch: int, val_counts: dict) -> dict:
    """Which weights ship and why: {policy (what ``optim.select`` resolved to), epochs (1-based, several for swa),
    reason, best_val_epoch, best_val_score, ties (epochs within ``tie_tolerance`` of the best)}.

    ``val_counts``: {"n": validation examples, "min_class": the fewest positives or negatives of any label}.
    ``auto`` ships the last epoch when validation is too small to rank epochs or saturates, else the best epoch.
    """
    scores = np.array([row.get("val_auroc_macro", np.nan) for row in history], np.float64)
    best = float(np.nanmax(scores)) if np.isfinite(scores).any() else float("nan")
    ties = [int(row["epoch"]) for row, v in zip(history, scores)
            if np.isfinite(v) and v >= best - optim.tie_tolerance]
    last = int(history[-1]["epoch"])
    best_epoch = best_epoch + 1 if best_epoch >= 0 else last
    policy, why = optim.select, f"optim.select = {optim.select}"
    if policy == "auto":
        small = val_counts["n"] < optim.select_min_val or val_counts["min_class"] < optim.select_min_per_class
        saturated = np.isfinite(best) and best >= optim.saturation
        if saturated or small or not np.isfinite(best):
            policy = "last"
            first = ties[0] if ties else best_epoch
            why = ("validation saturated (AUROC {:.3f} from epoch {}): it cannot rank epochs".format(best, first)
                   if saturated else f"validation too small to rank epochs ({val_counts['n']} examples, fewest "
                   f"{val_counts['min_class']} of a class; optim.select_min_val = {optim.select_min_val}, "
                   f"optim.select_min_per_class = {optim.select_min_per_class})" if small
                   else "no validation AUROC (one class only)")
        else:
            policy, why = "best_val", f"validation ranks epochs ({val_counts['n']} examples)"
    if policy == "best_val":
        epochs = [best_epoch]
        reason = f"best validation AUROC {best:.4f} at epoch {best_epoch}"
        if len(ties) > 1:
            reason += f" (epochs {ties} tie within optim.tie_tolerance = {optim.tie_tolerance}: the latest)"
    elif policy == "last":
        epochs, reason = [last], f"last epoch ({last})"
    else:
        epochs = [int(row["epoch"]) for row in history[-optim.swa_epochs:]]
        reason = f"average of the weights of epochs {epochs[0]}-{epochs[-1]}"
    return {"policy": policy, "epochs": epochs, "reason": f"{reason}; {why}", "best_val_epoch": best_epoch,
            "best_val_score": best if np.isfinite(best) else None, "ties": ties}


class SWA:
    """Running mean of the weights of the last ``n`` of ``epochs`` epochs (float tensors; counters keep the last)."""

    def __init__(self, n: int, epochs: int):
        self.first = max(0, epochs - n)
        self.mean: dict[str, torch.Tensor] = {}
        self.count = 0

    def update(self, model: nn.Module, epoch: int) -> None:
        if epoch < self.first:
            return
        self.count += 1
        for key, value in model.state_dict().items():
            value = value.detach().to("cpu")
            if not value.is_floating_point():
                self.mean[key] = value.clone()
            elif key not in self.mean:
                self.mean[key] = value.float().clone()
            else:
                self.mean[key] += (value.float() - self.mean[key]) / self.count

    def apply(self, model: nn.Module) -> None:
        state = model.state_dict()
        model.load_state_dict({k: v.to(state[k].dtype) for k, v in self.mean.items()})

    def state(self) -> dict:
        return {"mean": self.mean, "count": self.count}

    def load(self, state: dict) -> None:
        self.mean, self.count = dict(state.get("mean", {})), int(state.get("count", 0))


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, loader, precision: Precision, mean, std) -> None:
    """BatchNorm running statistics of averaged weights, from one pass over ``loader`` (what ``swa_utils.update_bn``
    does, with this trainer's batches)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = {m: m.momentum for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the pass
    model.train()
    for inputs, _, _ in loader:
        x = prepare_inputs(inputs, mean, std, precision)
        with precision.autocast():
            forward(model, x)
    for m in norms:
        m.momentum = momenta[m]
    model.eval()


def mark_shipped(history: list[dict], record: dict) -> list[dict]:
    """metrics.csv rows with a ``shipped`` column: the selection's reason on the epoch(s) that ship, else empty."""
    chosen = set(record["epochs"])
    return [{**row, "shipped": f"{record['policy']}: {record['reason']}" if int(row["epoch"]) in chosen else ""}
            for row in history]


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
