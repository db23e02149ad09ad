"""The training recipe, top to bottom: config → data → splits → (per fold) model, optimiser, schedule, resume,
epochs with checkpoints and early stopping → calibration and thresholds → metrics, plots, model card.

    fit(load_config("run.yaml"))            # or: calciscope train --config run.yaml
    fit(None, resume="runs/demo")           # continue a stopped run; it ends where an uninterrupted one would

Run directory: config.yaml, splits.json, metrics.csv (one row per epoch), metrics.json, roc.png, reliability.png
(reliability_slides.png with slide calibration), model/ (model.safetensors + model.json, the deliverable), best/ and
last/ (per fold with k-fold: fold<k>/...).

Tile models on slides can add hard-negative mining (``mining``: the model's own top-scoring negatives of the training
slides are drawn more often from the listed epochs on) and slide calibration (``calibration.slide``: a per-finding
logistic map from aggregated tile probabilities to slide probabilities, fit on the validation slides).
Multi-GPU / multi-process: ``torchrun --nproc-per-node N -m calciscope train --config run.yaml`` (DDP; gloo on CPU).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, WeightedRandomSampler
from torch.utils.data.distributed import DistributedSampler

from calciscope._version import __version__
from calciscope.errors import CalciscopeError
from calciscope.io import write_json
from calciscope.model import IMAGENET_MEAN, IMAGENET_STD, ModelCard, create_model, load_checkpoint, save_checkpoint
from calciscope.model.aggregate import aggregate, apply_slide_calibration, slide_probabilities
from calciscope.model.calibration import apply_temperature
from calciscope.model.cua import CUARule, cua_score
from calciscope.model.precision import Precision, choose_precision
from calciscope.training import calibration, metrics
from calciscope.training.config import TrainConfig, load_config, save_config
from calciscope.training.data import DataBundle, load_data
from calciscope.training.engine import load_state, predict_logits, save_state, train_one_epoch, warmup_cosine
from calciscope.training.splits import Fold, describe_splits, make_splits


@dataclass
class FoldResult:
    fold: int
    directory: Path
    best_score: float
    metrics: dict


# -- the recipe ------------------------------------------------------------------------------------------------
def fit(config: TrainConfig | None, *, resume: str | Path | None = None, show_progress: bool = True) -> Path:
    """Train as ``config`` says (or continue the run in ``resume``); returns the run directory."""
    rank, world = setup_distributed()
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise CalciscopeError(f"{run_dir}: not a calciscope run directory (no config.yaml) to resume")
        config = load_config(run_dir / "config.yaml")
    else:
        run_dir = Path(config.out)
        if (run_dir / "config.yaml").exists():
            raise CalciscopeError(f"{run_dir}: already holds a run; continue it with --resume {run_dir} or choose another out")
    if world > 1:  # every rank has looked before rank 0 writes config.yaml (else a late rank sees it and refuses)
        dist.barrier()
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")

    data = load_data(config, progress=_printer("preparing data", show_progress and rank == 0))
    test_units, folds = make_splits(data.groups, data.unit_labels, config.split, config.seed, data.fixed_split,
                                    labels=data.labels)
    if rank == 0:
        write_json(run_dir / "splits.json", {
            "data": data.describe,
            "summary": describe_splits(data.groups, data.unit_labels, data.labels, test_units, folds),
            "test": [data.unit_ids[i] for i in test_units],
            "folds": [{"train": [data.unit_ids[i] for i in f.train], "val": [data.unit_ids[i] for i in f.val]} for f in folds],
        })

    precision = choose_precision(config.optim.amp, config.optim.channels_last)
    results = []
    for fold in folds:
        fold_dir = run_dir if len(folds) == 1 else run_dir / f"fold{fold.index}"
        results.append(train_fold(config, data, fold, fold_dir, precision, rank, world, show_progress))

    if rank == 0:
        best = max(results, key=lambda r: r.best_score)
        final = run_dir / "model"
        if best.directory / "model" != final:
            shutil.copytree(best.directory / "model", final, dirs_exist_ok=True)
        summary = {"folds": [r.metrics for r in results]}
        if len(results) > 1:
            summary["cross_validation"] = metrics.summarize_folds([r.metrics["val"] for r in results])
            summary["model_from_fold"] = best.fold
        if len(test_units):
            summary["test"] = evaluate_units(final, data, test_units, config, precision, run_dir / "test")
            _update_card_metrics(final, {"test": summary["test"]})
        write_json(run_dir / "metrics.json", summary)
    if world > 1:
        dist.barrier()
    return run_dir


def train_fold(config: TrainConfig, data: DataBundle, fold: Fold, fold_dir: Path, precision: Precision,
               rank: int, world: int, show_progress: bool) -> FoldResult:
    """Model → optimiser → schedule → (resume) → epochs → calibration → card, for one fold."""
    fold_dir.mkdir(parents=True, exist_ok=True)
    train_set = data.make_dataset(fold.train, True)
    val_set = data.make_dataset(fold.val, False)
    optim = config.optim

    torch.manual_seed(config.seed)
    model = build_model(config, data).to(precision.device)
    if precision.channels_last and config.model.head == "tile":
        model = model.to(memory_format=torch.channels_last)
    mean, std = _imagenet_norm()

    train_labels = data.unit_labels[fold.train] if config.data.source != "slides" else _dataset_labels(train_set)
    pos_weight = _pos_weight(train_labels) if optim.class_balance == "pos_weight" else None
    mining = config.mining
    if mining.epochs and world > 1:
        raise CalciscopeError("hard-negative mining (mining.epochs) is not supported with DDP; run it on one process")
    base_indices = np.asarray(train_set.indices) if mining.epochs else None
    epoch_size = len(train_set)  # fixed, so the schedule holds when mining grows the pool
    criterion = nn.BCEWithLogitsLoss(pos_weight=pos_weight.to(precision.device) if pos_weight is not None else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    steps_per_epoch = _steps_per_epoch(len(train_set), optim, world)
    total_steps = steps_per_epoch * optim.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, int(round(optim.warmup_epochs * steps_per_epoch))))
    scaler = torch.amp.GradScaler("cuda") if precision.dtype == torch.float16 else None

    state = {"epoch": -1, "best": -np.inf, "bad_epochs": 0, "history": [], "mined": []}
    last = fold_dir / "last" / "state.pt"
    if last.is_file():  # resume: the last completed epoch's weights, optimiser, schedule and counters
        saved = load_state(last)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        state = {k: saved.get(k, state[k]) for k in state}

    trained = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    board = _tensorboard(fold_dir) if rank == 0 else None
    weights = _use_mined(train_set, base_indices, state["mined"], config, train_labels)
    for epoch in range(state["epoch"] + 1, optim.epochs):
        if state["bad_epochs"] >= optim.patience > 0:
            break
        if epoch + 1 in mining.epochs:  # a function of the weights after the previous epoch: resume repeats it
            state["mined"] = mine_hard_negatives(model, data, fold.train, config, precision, mean, std).tolist()
            weights = _use_mined(train_set, base_indices, state["mined"], config, train_labels)
            _print(show_progress, f"epoch {epoch + 1}: {len(state['mined'])} hard negatives mined, "
                                  f"training pool {len(train_set)} tiles")
        torch.manual_seed(config.seed * 100_003 + epoch)  # dropout etc.: a function of the epoch, so resume is exact
        train_set.set_epoch(epoch)
        loader = _train_loader(train_set, weights, config, epoch, rank, world, data.collate, epoch_size)
        bar = _epoch_bar(f"epoch {epoch + 1}/{optim.epochs}", len(train_set) // world, show_progress and rank == 0)
        stats = train_one_epoch(trained, loader, criterion, optimizer, scheduler, precision, mean, std,
                                accumulate=optim.accumulate, scaler=scaler,
                                max_steps=optim.max_steps_per_epoch, progress=bar.update)
        bar.close()
        if rank == 0:
            logits, y, val_positions = predict_logits(model, _eval_loader(val_set, config, data.collate), precision,
                                                      mean, std)
            probs = 1 / (1 + np.exp(-logits))
            val = metrics.multilabel_metrics(y, probs, data.labels)
            slide_auroc = _slide_auroc(probs, data, val_set, val_positions, config)
            val_loss = float(criterion(torch.from_numpy(logits).to(precision.device), torch.from_numpy(y).to(precision.device)))
            score = val["macro"]["auroc"]
            score = -val_loss if not np.isfinite(score) else score
            improved = score > state["best"]
            state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
            state["best"] = max(state["best"], score)
            state["history"].append({
                "epoch": epoch + 1, "train_loss": round(stats.loss, 5), "val_loss": round(val_loss, 5),
                "val_auroc_macro": round(val["macro"]["auroc"], 5), "lr": optimizer.param_groups[0]["lr"],
                "samples_per_s": round(stats.samples_per_s * world, 1), "seconds": round(stats.seconds, 1),
                **{f"val_auroc_{k}": round(v["auroc"], 5) for k, v in val["per_label"].items()},
                **({"val_slide_auroc_macro": round(slide_auroc, 5)} if slide_auroc is not None else {}),
            })
            if improved:
                save_checkpoint(fold_dir / "best", model, make_card(config, data, model, {}))
            state["epoch"] = epoch
            (fold_dir / "last").mkdir(exist_ok=True)
            save_state(last, model=model.state_dict(), optimizer=optimizer.state_dict(),
                       scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if scaler else {}, **state)
            _write_history(fold_dir / "metrics.csv", state["history"])
            if board is not None:
                for key, value in state["history"][-1].items():
                    board.add_scalar(key, value, epoch + 1)
                board.flush()
            _print(show_progress, f"epoch {epoch + 1}: train loss {stats.loss:.4f}, val loss {val_loss:.4f}, "
                                  f"val AUROC {val['macro']['auroc']:.3f}, {stats.samples_per_s * world:.0f} samples/s")
        if world > 1:
            _broadcast_state(state)

    result = None
    if rank == 0:
        shift = _prior_shift(_dataset_labels(train_set) if config.data.source == "slides" else train_labels,
                             weights, pos_weight, _natural_labels(data, fold, train_labels, config))
        result = finalize_fold(config, data, fold, fold_dir, val_set, precision, state, prior_shift=shift)
    if world > 1:
        dist.barrier()
    return result or FoldResult(fold.index, fold_dir, state["best"], {})


def finalize_fold(config, data, fold, fold_dir, val_set, precision, state, prior_shift=None) -> FoldResult:
    """Best weights → prior correction, temperature and thresholds on validation (and, with
    ``calibration.slide``, the slide calibration and slide thresholds on the validation slides) → metrics, card."""
    model, _ = load_checkpoint(fold_dir / "best")
    if prior_shift is not None:
        shift_output_bias(model, -prior_shift)
    mean, std = _imagenet_norm()
    logits, y, positions = predict_logits(model.to(precision.device), _eval_loader(val_set, config, data.collate),
                                          precision, mean, std)
    temperature = calibration.fit_temperature(logits, y) if config.calibration.temperature else np.ones(len(data.labels))
    probs = apply_temperature(logits, temperature)
    thresholds = _thresholds(y, probs, config, data.labels)
    card = make_card(config, data, model, {}, thresholds=thresholds,
                     temperature=calibration.temperatures_by_label(data.labels, temperature))
    if config.calibration.slide and data.slide_of is not None:
        scores, slide_y = _slide_scores(probs, data, val_set, positions, card)
        card.slide_calibration = {}
        for j, label in enumerate(data.labels):
            a, b = calibration.fit_platt(scores[:, j], slide_y[:, j], prior_sd=config.calibration.slide_prior_sd)
            card.slide_calibration[label] = {"a": a, "b": b}
        slide_probs = apply_slide_calibration(scores, card.slide_calibration, data.labels)
        card.extra["tile_thresholds"] = thresholds
        card.thresholds = _thresholds(slide_y, slide_probs, config, data.labels)
        metrics.plot_reliability(slide_y, slide_probs, data.labels, fold_dir / "reliability_slides.png",
                                 n_bins=10, title="Reliability, validation slides")
    card.metrics = {"val": _metric_report(y, probs, data, val_set, positions, config, card)}
    metrics.plot_roc(y, probs, data.labels, fold_dir / "roc.png", title=f"ROC, validation tiles (fold {fold.index})")
    metrics.plot_reliability(y, probs, data.labels, fold_dir / "reliability.png")
    save_checkpoint(fold_dir / "model", model, card)
    write_json(fold_dir / "fold_metrics.json", card.metrics)
    return FoldResult(fold.index, fold_dir, float(state["best"]), card.metrics)


def shift_output_bias(model: nn.Module, shift) -> None:
    """Add ``shift`` (one value per label) to the output layer's bias."""
    layer = model.mil.classifier if hasattr(model, "mil") else model.head
    with torch.no_grad():
        layer.bias += torch.as_tensor(np.asarray(shift, np.float32)).to(layer.bias)


def _prior_shift(train_labels: np.ndarray, weights, pos_weight, natural_labels: np.ndarray) -> np.ndarray | None:
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


def _natural_labels(data: DataBundle, fold: Fold, train_labels: np.ndarray, config: TrainConfig) -> np.ndarray:
    if config.data.source == "slides" and data.examples is not None:
        return data.examples.labels[data.examples.tiles_of(fold.train)]
    return train_labels


# -- hard-negative mining --------------------------------------------------------------------------------------
def mine_hard_negatives(model: nn.Module, data: DataBundle, units: np.ndarray, config: TrainConfig,
                        precision: Precision, mean, std) -> np.ndarray:
    """Tile ids (into ``data.examples``) of the hard negatives of the slides ``units``: per finding, the
    ``mining.top_fraction`` of its negative tiles that the model scores highest (ties: lower tile id first)."""
    dataset = data.make_dataset(units, False)  # every tissue tile, no augmentation
    logits, y, positions = predict_logits(model, _eval_loader(dataset, config, data.collate), precision, mean, std)
    tiles = np.asarray(dataset.indices)[positions]
    hard = []
    for j in range(y.shape[1]):
        negatives = np.flatnonzero(y[:, j] == 0)
        n = int(np.ceil(config.mining.top_fraction * len(negatives)))
        order = np.lexsort((tiles[negatives], -logits[negatives, j]))
        hard.append(tiles[negatives[order[:n]]])
    return np.unique(np.concatenate(hard)) if hard else np.zeros(0, np.int64)


def _use_mined(train_set, base_indices, mined, config: TrainConfig, unit_labels: np.ndarray):
    """Point the training set at its base pool plus the mined tiles; the sampling weights (None = uniform).
    ``unit_labels``: the training examples' labels for sources other than slides."""
    if base_indices is not None:
        train_set.indices = np.union1d(base_indices, np.asarray(mined, np.int64))
    weights = None
    if config.optim.class_balance == "sampler":
        labels = _dataset_labels(train_set) if config.data.source == "slides" else unit_labels
        rarity = 1.0 / np.maximum(labels.mean(axis=0), 1e-3)
        weights = np.where(labels.sum(axis=1) > 0, (labels * rarity).max(axis=1), 1.0)
    if len(mined):
        hard = np.isin(train_set.indices, np.asarray(mined, np.int64))
        weights = (np.ones(len(train_set)) if weights is None else weights) * np.where(hard, config.mining.weight, 1.0)
    return weights


# -- evaluation ------------------------------------------------------------------------------------------------
def evaluate_units(model_dir: Path, data: DataBundle, units: np.ndarray, config: TrainConfig, precision: Precision,
                   out_dir: Path) -> dict:
    """Metrics of a finished model on some units (the frozen test split, or any labelled data)."""
    model, card = load_checkpoint(model_dir)
    dataset = data.make_dataset(units, False)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (card.mean, card.std))
    logits, y, positions = predict_logits(model.to(precision.device), _eval_loader(dataset, config, data.collate),
                                          precision, mean, std)
    temperature = [card.temperature.get(label, 1.0) for label in data.labels]
    probs = apply_temperature(logits, temperature)
    report = _metric_report(y, probs, data, dataset, positions, config, card)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics.plot_roc(y, probs, data.labels, out_dir / "roc.png")
    metrics.plot_reliability(y, probs, data.labels, out_dir / "reliability.png")
    if card.slide_calibration and data.slide_of is not None:
        slide_y, slide_probs = _slide_probs(probs, data, dataset, positions, card)
        metrics.plot_reliability(slide_y, slide_probs, data.labels, out_dir / "reliability_slides.png", n_bins=10,
                                 title="Reliability, slides")
    write_json(out_dir / "metrics.json", report)
    return report


def _metric_report(y, probs, data: DataBundle, dataset, positions, config: TrainConfig, card: ModelCard) -> dict:
    """Per-finding metrics on examples (tiles or bags) and, for slide sources, on slides with the CUA score.

    Slide probabilities are ``slide_probabilities`` of each slide's tiles under ``card`` (aggregation and slide
    calibration as inference computes them). Thresholds: the card's tile thresholds for tiles (its ``thresholds``
    when it has no separate ones) and its ``thresholds`` for slides."""
    tile_thresholds = card.extra.get("tile_thresholds") or card.thresholds or 0.5
    report = {"examples": metrics.multilabel_metrics(y, probs, data.labels, thresholds=tile_thresholds)}
    if data.slide_of is not None:
        slide_y, slide_probs = _slide_probs(probs, data, dataset, positions, card)
        report["slides"] = metrics.multilabel_metrics(slide_y, slide_probs, data.labels,
                                                      thresholds=card.thresholds or 0.5)
        report["slides"]["n_slides"] = int(len(slide_y))
        rule = CUARule.from_dict(config.cua_rule)
        if set(rule.labels) <= set(data.labels):
            score = cua_score(slide_probs, rule, labels=data.labels)
            truth = cua_score(slide_y, rule, labels=data.labels)
            report["slides"]["cua_pattern"] = metrics.binary_metrics((truth > 0.5).astype(int), score)
    return report


def _per_slide(probs, data: DataBundle, dataset, positions, score) -> tuple[np.ndarray, np.ndarray]:
    """(slide labels (S, L), ``score(tile probabilities of the slide)`` (S, L)) of the slides in ``dataset``,
    in slide order."""
    slides = data.slide_of(dataset, positions)
    order = np.unique(slides)
    return data.unit_labels[order], np.stack([score(probs[slides == s]) for s in order])


def _slide_probs(probs, data: DataBundle, dataset, positions, card: ModelCard) -> tuple[np.ndarray, np.ndarray]:
    """(slide labels (S, L), slide probabilities (S, L)) as inference computes them under ``card``."""
    return _per_slide(probs, data, dataset, positions, lambda p: slide_probabilities(p, card))


def _slide_scores(probs, data: DataBundle, dataset, positions, card: ModelCard) -> tuple[np.ndarray, np.ndarray]:
    """(raw aggregates (S, L), slide labels (S, L)): what the slide calibration is fit on."""
    raw = dataclasses.replace(card, slide_calibration={})
    slide_y, scores = _slide_probs(probs, data, dataset, positions, raw)
    return scores, slide_y


def _slide_auroc(probs, data: DataBundle, dataset, positions, config: TrainConfig) -> float | None:
    """Macro slide AUROC of the raw aggregate (for the epoch log); None without slides or with one class."""
    if data.slide_of is None:
        return None
    agg = config.aggregation
    slide_y, scores = _per_slide(probs, data, dataset, positions,
                                 lambda p: aggregate(p, agg.method, k=agg.k, quantile=agg.quantile))
    value = metrics.multilabel_metrics(slide_y, scores, data.labels)["macro"]["auroc"]
    return float(value) if np.isfinite(value) else None


def _thresholds(y, probs, config: TrainConfig, labels) -> dict[str, float]:
    """Per-finding decision thresholds, chosen on validation examples (fallback 0.5 where one class is missing)."""
    out = {}
    for j, label in enumerate(labels):
        try:
            out[label] = float(metrics.choose_threshold(y[:, j], probs[:, j], config.calibration.threshold,
                                                        config.calibration.target_sensitivity))
        except CalciscopeError:
            out[label] = 0.5
    return out


# -- building blocks -------------------------------------------------------------------------------------------
def build_model(config: TrainConfig, data: DataBundle) -> nn.Module:
    if config.data.source == "slide_labels":
        from calciscope.training.mil import mil_head_for

        return mil_head_for(config, data)
    model = create_model(config.model.backbone, data.labels, weights=config.model.weights, head=config.model.head,
                         dropout=config.model.dropout)
    if config.model.init:
        init_from_checkpoint(model, config.model.init)
    return model


def init_from_checkpoint(model: nn.Module, spec: str) -> None:
    """Copy a checkpoint's weights into ``model`` (fine-tuning); its backbone, head and labels must match."""
    from calciscope.model.demo import resolve_model

    source, card = load_checkpoint(resolve_model(spec))
    mine = (getattr(model, "backbone_name", None), getattr(model, "head_kind", None), list(getattr(model, "labels", [])))
    if (card.backbone, card.head, list(card.labels)) != mine:
        raise CalciscopeError(f"model.init {spec}: its backbone/head/labels ({card.backbone}, {card.head}, "
                              f"{card.labels}) differ from this run's ({mine[0]}, {mine[1]}, {mine[2]})")
    model.load_state_dict(source.state_dict())


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
                  "seed": config.seed, "data_hashes": _data_hashes(config)},
        metrics=report,
        synthetic_demo=config.synthetic_demo,
        extra={"aggregation": config.to_dict()["aggregation"], "stain_normalize": config.data.stain_normalize,
               "sampling": config.data.sampling,
               "calciscope_version_trained": __version__},
    )


def _data_hashes(config: TrainConfig) -> dict:
    from calciscope.io import sha256_file

    out = {}
    for key in ("manifest", "tiles"):
        value = getattr(config.data, key)
        if value and Path(value).is_file():
            out[key] = sha256_file(value)
    return out


def _update_card_metrics(model_dir: Path, extra_metrics: dict) -> None:
    model, card = load_checkpoint(model_dir)
    card.metrics = {**card.metrics, **extra_metrics}
    save_checkpoint(model_dir, model, card)


def _imagenet_norm():
    return torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _dataset_labels(dataset) -> np.ndarray:
    return dataset.examples.labels[dataset.indices]


def _pos_weight(labels: np.ndarray) -> torch.Tensor:
    """neg/pos per label, clipped to [1, 100]: rare findings weigh as much as common ones in the loss."""
    pos = labels.sum(axis=0)
    neg = len(labels) - pos
    return torch.tensor(np.clip(neg / np.maximum(pos, 1), 1.0, 100.0), dtype=torch.float32)


def _steps_per_epoch(n: int, optim, world: int) -> int:
    batches = -(-n // (optim.batch_size * world))
    if optim.max_steps_per_epoch is not None:
        batches = min(batches, optim.max_steps_per_epoch * optim.accumulate)
    return max(1, -(-batches // optim.accumulate))


def _train_loader(dataset, weights, config: TrainConfig, epoch: int, rank: int, world: int, collate,
                  num_samples: int | None = None) -> DataLoader:
    """Shuffled, or drawn by ``weights`` (class balance, mined hard negatives), in an order fixed by (seed, epoch):
    a resumed run sees the same batches. ``num_samples`` fixes the length of a weighted epoch."""
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    if world > 1:
        if weights is not None:
            raise CalciscopeError("optim.class_balance 'sampler' is not supported with DDP; use 'pos_weight'")
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=config.seed)
        sampler.set_epoch(epoch)
    elif weights is not None:
        sampler = WeightedRandomSampler(np.asarray(weights, np.float64).tolist(), num_samples or len(weights),
                                        replacement=True, generator=generator)
    else:
        sampler = RandomSampler(dataset, generator=generator)
    workers = config.optim.workers
    return DataLoader(dataset, batch_size=config.optim.batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate, drop_last=False, persistent_workers=False,
                      prefetch_factor=4 if workers > 0 else None)


def _eval_loader(dataset, config: TrainConfig, collate) -> DataLoader:
    workers = config.optim.workers
    return DataLoader(dataset, batch_size=config.optim.batch_size, shuffle=False, num_workers=workers,
                      collate_fn=collate, prefetch_factor=4 if workers > 0 else None)


def setup_distributed() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; a single process is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return (dist.get_rank() if world > 1 else 0), world


def _broadcast_state(state: dict) -> None:
    """Rank 0 decides early stopping; the others follow."""
    payload = [state["bad_epochs"], state["best"]]
    dist.broadcast_object_list(payload, src=0)
    state["bad_epochs"], state["best"] = payload


def _write_history(path: Path, history: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in history for k in row))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
    tmp.replace(path)


def _tensorboard(fold_dir: Path):
    """A TensorBoard writer when the ``tensorboard`` package is installed (optional), else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(fold_dir / "tensorboard"))


class _NullBar:
    def update(self, *args) -> None:
        pass

    def close(self) -> None:
        pass


class _TqdmBar:
    def __init__(self, desc: str, total: int):
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=desc, unit="tile", leave=False, dynamic_ncols=True)

    def update(self, samples: int, loss: float, rate: float) -> None:
        self._bar.n = samples
        self._bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{rate:.0f}", refresh=True)

    def close(self) -> None:
        self._bar.close()


def _epoch_bar(desc: str, total: int, show: bool):
    return _TqdmBar(desc, total) if show else _NullBar()


def _printer(desc: str, show: bool):
    if not show:
        return None

    def progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 10) == 0:
            print(f"{desc}: {done}/{total}", flush=True)

    return progress


def _print(show: bool, message: str) -> None:
    if show:
        print(message, flush=True)
