"""The training recipe, top to bottom: config → data → splits → (per fold) model, optimiser, schedule, resume,
epochs with checkpoints and early stopping → calibration and thresholds → metrics, plots, model card.

    fit(load_config("run.yaml"))            # or: calciscope train --config run.yaml
    fit(None, resume="runs/demo")           # continue a stopped run; it ends where an uninterrupted one would

Run directory: config.yaml, splits.json, metrics.csv (one row per epoch), metrics.json, roc.png, reliability.png
(reliability_slides.png with slide calibration), model/ (model.safetensors + model.json, the deliverable), best/ and
last/ (per fold with k-fold: fold<k>/...).

A fold is a :class:`TileTrainer`: its hooks run on the one training engine (``training.engine``), which owns the
loop, resume, early stopping, metrics.csv and progress. Selection and calibration of the finished fold are in
``training.selection``, metrics of a model on units in ``training.evaluation``, loaders, sampling and hard-negative
mining in ``training.loaders``.

Tile models on slides can add hard-negative mining (``mining``: the model's own top-scoring negatives of the training
slides are drawn more often from the listed epochs on) and slide calibration (``calibration.slide``: a per-finding
logistic map from aggregated tile probabilities to slide probabilities, fit on the validation slides).
Multi-GPU / multi-process: ``torchrun --nproc-per-node N -m calciscope train --config run.yaml`` (DDP; gloo on CPU).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from calciscope.errors import CalciscopeError
from calciscope.io import write_json
from calciscope.model import create_model, load_checkpoint, save_checkpoint
from calciscope.model.demo import resolve_model
from calciscope.model.encoders import ENCODERS, resolve_weights
from calciscope.model.precision import Precision, choose_precision
from calciscope.training import metrics
from calciscope.training.config import TrainConfig, auto_epochs, load_config
from calciscope.training.data import DataBundle, load_data
from calciscope.training.engine import (
    EpochBar,
    EpochStats,
    RunFolder,
    Trainer,
    count_lines,
    grad_scaler,
    predict_logits,
    run_epochs,
    train_one_epoch,
    warmup_cosine,
)
from calciscope.training.evaluation import evaluate_units, slide_auroc
from calciscope.training.loaders import (
    dataset_labels,
    eval_loader,
    imagenet_norm,
    mine_hard_negatives,
    pos_weight,
    sampling_weights,
    setup_distributed,
    steps_per_epoch,
    train_loader,
)
from calciscope.training.mil import mil_head_for
from calciscope.training.ood_reference import add_tile_reference
from calciscope.training.selection import (
    SWA,
    FoldResult,
    add_card_metrics,
    choose_shipped,
    finalize_fold,
    make_card,
    mark_shipped,
    natural_labels,
    prior_shift,
    recompute_batchnorm,
)
from calciscope.training.splits import Fold, describe_splits, make_splits

__all__ = ["fit", "train_fold", "TileTrainer", "build_model", "init_from_checkpoint",
           "evaluate_units", "mine_hard_negatives"]  # the last two live in training.evaluation / training.loaders


# -- the recipe ------------------------------------------------------------------------------------------------
def fit(config: TrainConfig | None, *, resume: str | Path | None = None, show_progress: bool = True) -> Path:
    """Train as ``config`` says (or continue the run in ``resume``); returns the run directory.

    A new run that fails before its first epoch (bad data, bad splits) removes what it wrote, so the same command
    runs again once the data or config is fixed."""
    rank, world = setup_distributed()
    config, run = _start_run(config, resume, rank, world)
    try:
        data = load_data(config, progress=count_lines("preparing data", show_progress and rank == 0))
        test_units, folds = make_splits(data.groups, data.unit_labels, config.split, config.seed, data.fixed_split,
                                        labels=data.labels)
    except BaseException:
        if resume is None and rank == 0:
            _remove_unstarted(run)
        raise
    if rank == 0:
        write_json(run.root / "splits.json", {
            "data": data.describe,
            "summary": describe_splits(data.groups, data.unit_labels, data.labels, test_units, folds),
            "test": [data.unit_ids[i] for i in test_units],
            "folds": [{"train": [data.unit_ids[i] for i in f.train], "val": [data.unit_ids[i] for i in f.val]}
                      for f in folds],
        })

    precision = choose_precision(config.optim.amp, config.optim.channels_last)
    results = []
    for fold in folds:
        fold_dir = run.root if len(folds) == 1 else run.root / f"fold{fold.index}"
        results.append(train_fold(config, data, fold, fold_dir, precision, rank, world, show_progress))

    if rank == 0:
        best = max(results, key=lambda r: r.best_score)
        final = run.root / "model"
        if best.directory / "model" != final:
            shutil.copytree(best.directory / "model", final, dirs_exist_ok=True)
        add_tile_reference(final, data, next(f for f in folds if f.index == best.fold), config, precision)
        summary = {"folds": [r.metrics for r in results]}
        if len(results) > 1:
            summary["cross_validation"] = metrics.summarize_folds([r.metrics["val"] for r in results])
            summary["model_from_fold"] = best.fold
        if len(test_units):
            summary["test"] = evaluate_units(final, data, test_units, config, precision, run.root / "test")
            add_card_metrics(final, {"test": summary["test"]})
        write_json(run.root / "metrics.json", summary)
    if world > 1:
        dist.barrier()
    return run.root


def _start_run(config: TrainConfig | None, resume: str | Path | None, rank: int,
               world: int) -> tuple[TrainConfig, RunFolder]:
    """The run's config and folder: a new run refuses a folder that holds one; a resumed one reads its config.yaml."""
    if resume is not None:
        run = RunFolder(Path(resume))
        if not run.config_file.is_file():
            raise CalciscopeError(f"{run.root}: not a calciscope run directory (no config.yaml) to resume")
        config = load_config(run.config_file)
    else:
        run = RunFolder(Path(config.out))
        if _has_epochs(run):
            raise CalciscopeError(f"{run.root}: already holds a run; continue it with --resume {run.root} "
                                  f"or choose another out (the config's 'out' key, or --out)")
    if world > 1:  # every rank has looked before rank 0 writes config.yaml (else a late rank sees it and refuses)
        dist.barrier()
    if rank == 0:
        run.save_config(config)
    return config, run


def _has_epochs(run: RunFolder) -> bool:
    """Whether a folder holds a run that trained (a folder a failed start left behind, or no folder, does not)."""
    return any(p.exists() for p in (run.metrics_csv, run.state_file, run.root / "model", run.root / "fold0"))


def _remove_unstarted(run: RunFolder) -> None:
    """Remove what a run wrote before its first epoch (config.yaml, splits.json), and its folder when that leaves it
    empty (an embedding cache inside it stays for the next try)."""
    if _has_epochs(run):
        return
    for name in ("config.yaml", "splits.json"):
        (run.root / name).unlink(missing_ok=True)
    try:
        run.root.rmdir()
    except OSError:
        pass


def train_fold(config: TrainConfig, data: DataBundle, fold: Fold, fold_dir: Path, precision: Precision,
               rank: int, world: int, show_progress: bool) -> FoldResult:
    """Model → optimiser → schedule → (resume) → epochs → which weights ship → calibration → card, for one fold."""
    fold_dir.mkdir(parents=True, exist_ok=True)
    trainer = TileTrainer(config, data, fold, fold_dir, precision, rank, world, show_progress)
    folder = RunFolder(fold_dir)
    state = run_epochs(trainer, folder, rank=rank, world=world, progress=_printer(show_progress and rank == 0))
    result = None
    if rank == 0:
        record = choose_shipped(config.optim, state["history"], state.get("best_epoch", -1), trainer.val_counts)
        folder.write_history(mark_shipped(state["history"], record))
        if show_progress:
            print(f"shipping {record['policy']}: {record['reason']}", flush=True)
        weights = "best" if record["policy"] == "best_val" else trainer.save_shipped(record)
        labels = dataset_labels(trainer.train_set) if config.data.source == "slides" else trainer.train_labels
        shift = prior_shift(labels, trainer.weights, trainer.pos_weight,
                            natural_labels(data, fold, trainer.train_labels, config))
        result = finalize_fold(config, data, fold, fold_dir, trainer.val_set, precision, state["best"],
                               prior_shift=shift, weights=weights, selection=record)
    if world > 1:
        dist.barrier()
    return result or FoldResult(fold.index, fold_dir, state["best"], {})


class TileTrainer(Trainer):
    """One fold of the tile / attention-MIL recipe as engine hooks: an epoch is one pass over the training split
    (seeded per epoch, so a resumed run sees the same batches), validated on the validation split (macro AUROC
    selects ``best/``), with hard negatives mined at the start of ``mining.epochs``."""

    def __init__(self, config: TrainConfig, data: DataBundle, fold: Fold, fold_dir: Path, precision: Precision,
                 rank: int, world: int, show_progress: bool):
        self.config, self.data, self.fold, self.fold_dir = config, data, fold, fold_dir
        self.precision, self.rank, self.world, self.show = precision, rank, world, show_progress
        optim = config.optim
        self.train_set = data.make_dataset(fold.train, True)
        self.val_set = data.make_dataset(fold.val, False)
        self.epochs, self.patience = optim.epochs or auto_epochs(len(self.train_set)), optim.patience
        if optim.epochs is None and rank == 0 and show_progress:
            print(f"optim.epochs not set: {self.epochs} epochs of {len(self.train_set)} training examples", flush=True)
        self.prefer_later_ties, self.tie_tolerance, self.saturation = True, optim.tie_tolerance, optim.saturation
        self.val_counts = {"n": 0, "min_class": 0}
        self.swa = SWA(optim.swa_epochs, self.epochs) if optim.select == "swa" else None

        torch.manual_seed(config.seed)
        self.model = build_model(config, data).to(precision.device)
        if precision.channels_last and config.model.head == "tile":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.mean, self.std = imagenet_norm()

        self.train_labels = (data.unit_labels[fold.train] if config.data.source != "slides"
                             else dataset_labels(self.train_set))
        self.pos_weight = pos_weight(self.train_labels) if optim.class_balance == "pos_weight" else None
        if config.mining.epochs and world > 1:
            raise CalciscopeError("hard-negative mining (mining.epochs) is not supported with DDP; run it on one "
                                  "process")
        self.base_indices = np.asarray(self.train_set.indices) if config.mining.epochs else None
        self.epoch_size = len(self.train_set)  # fixed, so the schedule holds when mining grows the pool
        weight = self.pos_weight.to(precision.device) if self.pos_weight is not None else None
        self.criterion = nn.BCEWithLogitsLoss(pos_weight=weight)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
        per_epoch = steps_per_epoch(len(self.train_set), optim, world)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(per_epoch * self.epochs, int(round(optim.warmup_epochs * per_epoch))))
        self.scaler = grad_scaler(precision)
        self.mined: list[int] = []
        self.trained, self.board, self.weights = self.model, None, None
        self._line = ""

    # -- resume ----------------------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else {},
                "mined": self.mined, "swa": self.swa.state() if self.swa is not None else {},
                "val_counts": dict(self.val_counts)}

    def load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.mined = state.get("mined", [])
        self.val_counts = state.get("val_counts", self.val_counts)
        if self.swa is not None:
            self.swa.load(state.get("swa", {}))

    # -- the loop --------------------------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        self.trained = nn.parallel.DistributedDataParallel(self.model) if self.world > 1 else self.model
        self.board = _tensorboard(self.fold_dir) if self.rank == 0 else None
        self.weights = sampling_weights(self.train_set, self.base_indices, self.mined, self.config, self.train_labels)

    def on_epoch_start(self, epoch: int) -> None:
        if epoch + 1 in self.config.mining.epochs:  # a function of the weights after the previous epoch: resume repeats it
            self.mined = mine_hard_negatives(self.model, self.data, self.fold.train, self.config, self.precision,
                                             self.mean, self.std).tolist()
            self.weights = sampling_weights(self.train_set, self.base_indices, self.mined, self.config,
                                            self.train_labels)
            if self.show:
                print(f"epoch {epoch + 1}: {len(self.mined)} hard negatives mined, training pool "
                      f"{len(self.train_set)} tiles", flush=True)
        torch.manual_seed(self.config.seed * 100_003 + epoch)  # dropout etc.: a function of the epoch, so resume is exact
        self.train_set.set_epoch(epoch)

    def train_epoch(self, epoch: int) -> EpochStats:
        optim = self.config.optim
        loader = train_loader(self.train_set, self.weights, self.config, epoch, self.rank, self.world,
                              self.data.collate, self.epoch_size)
        bar = EpochBar(f"epoch {epoch + 1}/{self.epochs}", len(self.train_set) // self.world,
                       self.show and self.rank == 0)
        stats = train_one_epoch(self.trained, loader, self.criterion, self.optimizer, self.scheduler, self.precision,
                                self.mean, self.std, accumulate=optim.accumulate, scaler=self.scaler,
                                max_steps=optim.max_steps_per_epoch, progress=bar.update)
        bar.close()
        return stats

    def validate(self, epoch: int, stats: EpochStats) -> dict:
        """The epoch's row; its score is the validation macro AUROC (minus the loss where AUROC is undefined)."""
        logits, y, positions = predict_logits(self.model, eval_loader(self.val_set, self.config, self.data.collate),
                                              self.precision, self.mean, self.std)
        probs = 0.5 * (1.0 + np.tanh(0.5 * logits))  # the sigmoid, without exp overflow warnings
        val = metrics.multilabel_metrics(y, probs, self.data.labels)
        self.val_counts = {"n": int(len(y)), "min_class": int(min(y.sum(0).min(), (1 - y).sum(0).min()))}
        slides = slide_auroc(probs, self.data, self.val_set, positions, self.config)
        device = self.precision.device
        val_loss = float(self.criterion(torch.from_numpy(logits).to(device), torch.from_numpy(y).to(device)))
        score = val["macro"]["auroc"]
        self._line = (f"epoch {epoch + 1}: train loss {stats.loss:.4f}, val loss {val_loss:.4f}, "
                      f"val AUROC {score:.3f}, {stats.samples_per_s * self.world:.0f} samples/s")
        return {
            "epoch": epoch + 1, "train_loss": round(stats.loss, 5), "val_loss": round(val_loss, 5),
            "val_auroc_macro": round(val["macro"]["auroc"], 5), "lr": self.optimizer.param_groups[0]["lr"],
            "samples_per_s": round(stats.samples_per_s * self.world, 1), "seconds": round(stats.seconds, 1),
            **{f"val_auroc_{k}": round(v["auroc"], 5) for k, v in val["per_label"].items()},
            **({"val_slide_auroc_macro": round(slides, 5)} if slides is not None else {}),
            "score": score if np.isfinite(score) else -val_loss,
        }

    def on_improved(self, epoch: int) -> None:
        save_checkpoint(self.fold_dir / "best", self.model, make_card(self.config, self.data, self.model, {}))

    def on_epoch_end(self, epoch: int, row: dict) -> None:
        if self.swa is not None:
            self.swa.update(self.model, epoch)
        if self.board is not None:
            for key, value in row.items():
                self.board.add_scalar(key, value, epoch + 1)
            self.board.flush()

    def epoch_line(self, epoch: int, row: dict) -> str:
        return self._line

    def save_shipped(self, record: dict) -> str:
        """Write the weights ``record`` ships (the last epoch's, or the average of the last ones) to ``shipped/``."""
        if record["policy"] == "swa":
            self.swa.apply(self.model)
            recompute_batchnorm(self.model, train_loader(self.train_set, None, self.config, 0, 0, 1,
                                                         self.data.collate, self.epoch_size),
                                self.precision, self.mean, self.std)
        save_checkpoint(self.fold_dir / "shipped", self.model, make_card(self.config, self.data, self.model, {}))
        return "shipped"


# -- building blocks -------------------------------------------------------------------------------------------
def build_model(config: TrainConfig, data: DataBundle) -> nn.Module:
    if config.data.source == "slide_labels":
        return mil_head_for(config, data)
    if config.data.encoder in ENCODERS:  # a tile head on the frozen encoder's cached embeddings
        weights = str(resolve_weights(ENCODERS[config.data.encoder], config.data.encoder_weights or ""))
        model = create_model(config.data.encoder, data.labels, head="tile", dropout=config.model.dropout,
                             encoder_weights=weights, tile_hidden_dim=config.model.hidden_dim)
        model.backbone.requires_grad_(False)
        return model
    model = create_model(config.model.backbone, data.labels, weights=config.model.weights, head=config.model.head,
                         dropout=config.model.dropout)
    if config.model.init:
        init_from_checkpoint(model, config.model.init)
    return model


def init_from_checkpoint(model: nn.Module, spec: str) -> None:
    """Copy a checkpoint's weights into ``model`` (fine-tuning); its backbone, head and labels must match."""
    source, card = load_checkpoint(resolve_model(spec))
    mine = (getattr(model, "backbone_name", None), getattr(model, "head_kind", None), list(getattr(model, "labels", [])))
    if (card.backbone, card.head, list(card.labels)) != mine:
        raise CalciscopeError(f"model.init {spec}: its backbone/head/labels ({card.backbone}, {card.head}, "
                              f"{card.labels}) differ from this run's ({mine[0]}, {mine[1]}, {mine[2]})")
    model.load_state_dict(source.state_dict())


def _tensorboard(fold_dir: Path):
    """A TensorBoard writer when the ``tensorboard`` package is installed (optional), else None."""
    try:  # imported here: optional, and slow to import (it is not a dependency)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(fold_dir / "tensorboard"))


def _printer(show: bool):
    return (lambda line: print(line, flush=True)) if show else None
