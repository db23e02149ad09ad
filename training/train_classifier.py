"""Train the vessel classifier (``calciscope train-vessel-classifier --config vessel_classifier.yaml``).

The recipe: config → every slide's vessel crops (``training.classifier_data``: the annotated outlines and the
segmenter's detections, jittered copies for training, one crop each for validation) → patient split → the
classifier → ``epochs`` × (training crops / batch size) steps on the training engine (``training.engine``: seeded
draws and augmentation from one numpy generator, an epoch per resume point and ``metrics.csv`` row) → validation on
the segmenter's detections of the validation slides, which also fits the card's temperatures, thresholds and slide
map (``training.classifier_validation``) → ``classifier.safetensors`` + ``classifier.json`` in ``out``, beside
``config.yaml`` and ``metrics.csv``.

    train_classifier(load_config("vessel_classifier.yaml"))
    train_classifier(None, resume="runs/vessel_classifier")   # continue a stopped run
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch

from calciscope.errors import CalciscopeError
from calciscope.model.demo import resolve_segmenter
from calciscope.model.precision import resolve_device
from calciscope.model.segmenter import for_inference, load_segmenter
from calciscope.model.vessel_classifier import (
    ARTIFACT,
    VESSEL,
    ClassifierCard,
    CropConfig,
    VesselClassifier,
    save_classifier,
    to_input,
)
from calciscope.training.classifier_data import (
    ClassifierTrainConfig,
    VesselCrops,
    augment_crops,
    check_config,
    extract_vessels,
    load_config,
    manifest_slides,
)
from calciscope.training.classifier_validation import output_columns, validate
from calciscope.training.engine import (
    EpochStats,
    StepLines,
    Trainer,
    open_run,
    random_state,
    run_epochs,
    run_steps,
    set_random_state,
)
from calciscope.training.ood_reference import as_card_field, classifier_reference
from calciscope.training.segmenter_data import split_patients

__all__ = ["ClassifierTrainConfig", "ClassifierTrainer", "load_config", "train_classifier", "validate"]


def train_classifier(config: ClassifierTrainConfig | None, progress: Callable[[str], None] | None = None, *,
                     resume: str | Path | None = None) -> Path:
    """Train, validate, calibrate and save the classifier into ``config.out`` (or finish the stopped run in
    ``resume``); returns that folder."""
    config, run = open_run(config, resume, load_config, "train-vessel-classifier")
    crop = check_config(config)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    device = resolve_device(config.device)
    segmenter = None
    if config.segmenter:
        model, seg_card = load_segmenter(resolve_segmenter(config.segmenter))
        segmenter = (for_inference(model).to(device), seg_card)
    rows = manifest_slides(config)
    train_ids, val_ids = split_patients([SimpleNamespace(slide_id=k, patient_id=p) for k, p, *_ in rows],
                                        config.val_fraction, config.seed)
    if not train_ids:
        raise CalciscopeError("no training slides left after the validation split")
    start = time.perf_counter()
    train, val, val_slide_y = _cut_crops(config, rows, val_ids, crop, segmenter, rng, progress)
    judge = bool(config.judge_vessels and segmenter is not None)
    card = ClassifierCard(labels=list(config.labels), crop=dataclasses.asdict(crop), widths=list(config.widths),
                          hidden=config.hidden, synthetic_demo=config.synthetic_demo,
                          candidate_min_mean_probability=config.candidate_min_mean_probability if segmenter else None,
                          vessel_output=judge, artifact_output=config.judge_artifacts)
    trainer = ClassifierTrainer(config, card, train, val, rng, device, progress)
    run.save_config(config)
    history = run_epochs(trainer, run, progress=progress)["history"]
    trainer.model.eval()
    card.metrics = trainer.loss_summary()
    card.metrics["validation"] = validate(trainer.model, card, val, np.stack(val_slide_y), judge,
                                          config.artifact_max_false_rate)
    run.write_history(history + [{"step": trainer.steps, **_summary(card.metrics["validation"])}])
    card.ood_reference = as_card_field(classifier_reference(trainer.model, card, trainer.x, trainer.e, val,
                                                            [rows[i][0] for i in val_ids]))
    card.training = {"description": config.description,
                     "manifests": [str(Path(m).parent.name) + "/" + Path(m).name for m in config.manifests],
                     "segmenter": config.segmenter,
                     "slides": {"train": [rows[i][0] for i in train_ids], "validation": [rows[i][0] for i in val_ids]},
                     "config": dataclasses.asdict(config) | {"manifests": [Path(m).name for m in config.manifests]},
                     "seconds": round(time.perf_counter() - start, 1)}
    folder = save_classifier(run.root, trainer.model.to(memory_format=torch.contiguous_format), card)
    run.drop_state()
    return folder


def _cut_crops(config: ClassifierTrainConfig, rows: list, val_ids: list[int], crop: CropConfig, segmenter,
               rng: np.random.Generator, progress: Callable[[str], None] | None):
    """(training crops per slide, validation crops per slide, validation slide labels), slides in manifest order:
    the training slides' jitter draws come from ``rng`` in that order."""
    train, val, val_slide_y = [], [], []
    for n, (key, _, path, outlines, slide_y, artifacts) in enumerate(rows, start=1):
        is_val = n - 1 in val_ids
        data, from_outlines = extract_vessels(path, outlines, list(config.labels), crop, segmenter, config.copies,
                                              None if is_val else rng, config,
                                              artifacts if config.judge_artifacts else None)
        if is_val:
            val.append(data)
            val_slide_y.append(slide_y if slide_y is not None else from_outlines)
        else:
            train.append(data)
        if progress is not None:
            progress(f"cut {len(data.targets)} vessel crops from {key} ({n}/{len(rows)})")
    return train, val, val_slide_y


class ClassifierTrainer(Trainer):
    """The classifier's hooks on the engine: ``config.epochs`` epochs of steps that each draw a batch of training
    crops (with replacement) and augment it, all from one numpy generator; fp32 on ``device``."""

    def __init__(self, config: ClassifierTrainConfig, card: ClassifierCard, train: list[VesselCrops],
                 val: list[VesselCrops], rng: np.random.Generator, device: torch.device,
                 progress: Callable[[str], None] | None):
        self.config, self.card, self.rng, self.device, self.progress = config, card, rng, device, progress
        self.x = np.concatenate([d.crops for d in train])
        self.e = np.concatenate([d.extras for d in train])
        self.y = np.ascontiguousarray(np.concatenate([d.targets for d in train])[:, output_columns(card)])
        self.positives = self.y.sum(axis=0)
        _check_data(card, self.positives, val)
        self.pos_weight = torch.tensor(np.minimum((len(self.y) - self.positives) / np.maximum(self.positives, 1),
                                                  config.max_pos_weight), dtype=torch.float32, device=device)
        model = VesselClassifier(len(card.outputs), tuple(config.widths), config.hidden, config.dropout)
        self.model = model.to(device, memory_format=torch.channels_last)
        self.steps = max(1, config.epochs * len(self.x) // config.batch_size)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(self.optimizer, max_lr=config.lr, total_steps=self.steps,
                                                             pct_start=0.1)
        self.epochs = min(config.epochs, self.steps)
        self.losses: list[float] = []

    def steps_of(self, epoch: int) -> range:
        return range(self.steps * epoch // self.epochs, self.steps * (epoch + 1) // self.epochs)

    def train_epoch(self, epoch: int) -> EpochStats:
        self.model.train()
        steps = self.steps_of(epoch)
        lines = StepLines(self.progress, self.steps, every=100, first_step=steps.start)
        stats = run_steps(steps, self.loss, self.optimizer, self.scheduler, on_batch=lines)
        self.losses += stats.losses
        return stats

    def loss(self, step: int) -> tuple[torch.Tensor, int]:
        """A batch drawn with replacement, flipped, rotated and stain-jittered: BCE with capped positive weights."""
        idx = self.rng.integers(0, len(self.x), self.config.batch_size)
        logits = self.model(to_input(augment_crops(self.x[idx], self.rng, self.config.hed_jitter), self.card)
                            .to(self.device), torch.from_numpy(self.e[idx]).to(self.device))
        target = torch.from_numpy(self.y[idx]).to(self.device)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, target, pos_weight=self.pos_weight), \
            len(idx)

    def validate(self, epoch: int, stats: EpochStats) -> dict:
        return {"epoch": epoch + 1, "step": self.steps_of(epoch).stop,
                "train_loss": round(float(np.mean(stats.losses)), 5) if stats.losses else None,
                "lr": self.optimizer.param_groups[0]["lr"], "crops_per_s": round(stats.samples_per_s, 1),
                "seconds": round(stats.seconds, 1)}

    def loss_summary(self) -> dict:
        """The training loss at the start and the end and what the training crops held, for the card."""
        window = max(1, min(100, self.steps // 5))
        return {"train_loss_start": float(np.mean(self.losses[:window])),
                "train_loss_end": float(np.mean(self.losses[-window:])),
                "train_vessels": {"crops": int(len(self.y)),
                                  "positive_crops": {k: int(p) for k, p in zip(self.card.outputs, self.positives)}}}

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "random": random_state(self.rng), "losses": self.losses}

    def load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_random_state(state["random"], self.rng)
        self.losses = list(state["losses"])


def _summary(validation: dict) -> dict:
    """The validation figures that fit in a row of metrics.csv (macro AUROC per vessel and per slide)."""
    return {f"val_{level}_auroc_macro": validation[level]["macro"]["auroc"]
            for level in ("vessels", "slides") if level in validation}


def _check_data(card: ClassifierCard, positives: np.ndarray, val: list[VesselCrops]) -> None:
    """Refuse training crops without a positive for an output (but the vessel one) and an empty validation set."""
    missing = [k for k, p in zip(card.outputs, positives) if p == 0 and k != VESSEL]
    if missing:
        raise CalciscopeError(f"no training vessel has {', '.join(missing)}: the classifier cannot learn it"
                              + (" (judge_artifacts needs calcium_artifact regions in the slides' artifact "
                                 "annotations)" if ARTIFACT in missing else ""))
    if not val or not sum(len(d.targets) for d in val):
        raise CalciscopeError("no validation vessels: the classifier's temperatures and slide map are fit on "
                              "validation slides, so val_fraction must leave at least one patient with vessels")
