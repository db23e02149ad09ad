"""Train the vessel segmenter (``calciscope train-vessels --config vessels.yaml``) on slides with vessel outlines.

The recipe: config → slides (``training.segmenter_data``: read whole at the segmenter's mpp, with their targets) →
patient split → U-Net (fresh, or ``init``'s weights) → ``steps`` of seeded random crops, half of them centred near a
vessel, on the training engine (``training.engine``; a chunk of ``checkpoint_every`` steps is its epoch: a resume
point and a row of ``metrics.csv``) → validation: each validation slide segmented whole, its wall map turned into
vessel instances, detection recall and precision at IoU 0.5, diameter and count error (``training.segmenter_eval``)
→ ``segmenter.safetensors`` + ``segmenter.json`` (the card, with those figures) in ``out``, beside ``config.yaml``
and ``metrics.csv``.

    train_segmenter(load_config("vessels.yaml"))      # or: calciscope train-vessels --config vessels.yaml
    train_segmenter(None, resume="runs/vessels")       # continue a stopped run; it ends where an unbroken one would
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from calciscope.errors import CalciscopeError
from calciscope.model.precision import Precision, choose_precision, resolve_device
from calciscope.model.segmenter import CHANNELS, SegmenterCard, VesselUNet, load_segmenter, normalise, save_segmenter
from calciscope.training.engine import (
    EpochStats,
    StepLines,
    Trainer,
    grad_scaler,
    open_run,
    random_state,
    run_epochs,
    run_steps,
    set_random_state,
    warmup_cosine,
)
from calciscope.training.ood_reference import as_card_field, segmenter_reference
from calciscope.training.segmenter_data import (
    SegmenterTrainConfig,
    SlideData,
    load_config,
    load_slides,
    random_crop,
    split_patients,
    validation_of,
)
from calciscope.training.segmenter_eval import (
    best_min_mean_probability,
    evaluate_detection,
    evaluate_segmenter,
    set_instance_setting,
)

__all__ = ["SegmenterTrainConfig", "SegmenterTrainer", "best_min_mean_probability", "evaluate_segmenter",
           "load_config", "set_instance_setting", "train_segmenter"]


def train_segmenter(config: SegmenterTrainConfig | None, progress: Callable[[str], None] | None = None, *,
                    resume: str | Path | None = None) -> Path:
    """Train, validate and save the segmenter into ``config.out`` (or finish the stopped run in ``resume``);
    returns that folder."""
    config, run = open_run(config, resume, load_config, "train-vessels")
    torch.manual_seed(config.seed)
    slides = load_slides(config, progress)
    model = VesselUNet(tuple(config.widths), len(CHANNELS))
    start_card = _init_from(model, config)
    train_ids, val_ids = split_patients(slides, config.val_fraction, config.seed,
                                        validation_of(start_card) if config.keep_init_validation else None)
    if not train_ids:
        raise CalciscopeError("no training slides left after the validation split")
    card = SegmenterCard(mpp=config.mpp, widths=list(config.widths), synthetic_demo=config.synthetic_demo)
    precision = choose_precision(config.amp, channels_last=True, device=resolve_device(config.device))
    run.save_config(config)
    trainer = SegmenterTrainer(config, slides, train_ids, model, card, precision, progress)
    history = run_epochs(trainer, run, progress=progress)["history"]
    start, metrics = time.perf_counter(), trainer.loss_summary()
    model.eval()
    if val_ids:
        metrics["validation"] = evaluate_detection(model.to(memory_format=torch.contiguous_format), card,
                                                   [slides[i] for i in val_ids])
        run.write_history(history + [{"step": config.steps, **{f"val_{k}": v for k, v in metrics["validation"].items()
                                                               if k != "per_slide"}}])
        card.ood_reference = as_card_field(segmenter_reference(model, card, slides, train_ids, val_ids))
    seconds = trainer.seconds + time.perf_counter() - start
    card = dataclasses.replace(card, metrics=metrics,
                               training=_provenance(config, slides, train_ids, val_ids, seconds))
    folder = save_segmenter(run.root, model.to(memory_format=torch.contiguous_format), card)
    run.drop_state()
    return folder


def _init_from(model: VesselUNet, config: SegmenterTrainConfig) -> SegmenterCard | None:
    """Load ``config.init``'s weights into ``model`` (same widths and mpp); returns its card (None without init)."""
    if not config.init:
        return None
    start_model, start_card = load_segmenter(config.init)
    if list(start_card.widths) != list(config.widths) or start_card.mpp != config.mpp:
        raise CalciscopeError(f"init {config.init}: widths {start_card.widths} at {start_card.mpp} µm/px differ "
                              f"from this config's {config.widths} at {config.mpp} µm/px")
    model.load_state_dict(start_model.state_dict())
    return start_card


def _provenance(config: SegmenterTrainConfig, slides: list[SlideData], train_ids: list[int], val_ids: list[int],
                seconds: float) -> dict:
    extra = [f"{Path(m).parent.name}/{Path(m).name}" for m in config.extra_manifests]
    return {"description": config.description, "manifest": Path(config.manifest).name, "extra_manifests": extra,
            "slides": {"train": [slides[i].slide_id for i in train_ids],
                       "validation": [slides[i].slide_id for i in val_ids]},
            "config": dataclasses.asdict(config) | {"manifest": Path(config.manifest).name, "extra_manifests": extra},
            "seconds": round(seconds, 1)}


class SegmenterTrainer(Trainer):
    """The segmenter's hooks on the engine: an epoch is ``checkpoint_every`` steps of seeded random crops (one
    numpy generator draws them all, in the same order whether or not the run was resumed). Validation follows the
    last epoch (``train_segmenter``)."""

    def __init__(self, config: SegmenterTrainConfig, slides: list[SlideData], train_ids: list[int],
                 model: VesselUNet, card: SegmenterCard, precision: Precision,
                 progress: Callable[[str], None] | None):
        self.config, self.slides, self.train_ids = config, slides, train_ids
        self.card, self.precision, self.progress = card, precision, progress
        self.epochs = max(1, math.ceil(config.steps / config.checkpoint_every))
        device = precision.device
        self.model = model.to(device, memory_format=torch.channels_last)
        self.scaler = grad_scaler(precision)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           warmup_cosine(config.steps, max(config.steps // 20, 1)))
        self.pos_weight = torch.tensor(config.pos_weight, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.rng = np.random.default_rng(config.seed)
        self.blur_px = (config.blur_sigma_um[0] / config.mpp, config.blur_sigma_um[1] / config.mpp)
        self.losses: list[float] = []
        self.seconds = 0.0

    def steps_of(self, epoch: int) -> range:
        every = self.config.checkpoint_every
        return range(epoch * every, min(self.config.steps, (epoch + 1) * every))

    def train_epoch(self, epoch: int) -> EpochStats:
        self.model.train()
        steps = self.steps_of(epoch)
        lines = StepLines(self.progress, self.config.steps, every=50, first_step=steps.start)
        stats = run_steps(steps, self.loss, self.optimizer, self.scheduler, scaler=self.scaler, on_batch=lines)
        self.losses += stats.losses
        self.seconds += stats.seconds
        return stats

    def loss(self, step: int) -> tuple[torch.Tensor, int]:
        """One batch of crops: weighted BCE over the channels (each slide's annotated ones, small vessels weighing
        more) plus soft Dice on the vessel channel."""
        config, device = self.config, self.precision.device
        picks = self.rng.choice(self.train_ids, config.batch_size)
        crops = [random_crop(self.slides[i], self.rng, config.crop_px, config.vessel_crop_fraction,
                             config.hard_crop_fraction, config.blur_fraction, self.blur_px) for i in picks]
        x = normalise(np.stack([c[0] for c in crops]), self.card).to(device).contiguous(memory_format=torch.channels_last)
        yw = torch.from_numpy(np.stack([c[1] for c in crops])).to(device).float()
        y, pixel_w = yw[:, :-1], yw[:, -1:]
        w = torch.from_numpy(np.stack([self.slides[i].weight for i in picks])).to(device).view(len(picks), -1, 1, 1) \
            * pixel_w
        with self.precision.autocast():
            logits = self.model(x)
        logits = logits.float()
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, pos_weight=self.pos_weight,
                                                                   reduction="none")
        loss = (bce * w).sum() / w.sum().clamp(min=1)
        p = torch.sigmoid(logits[:, 0])
        dice = 1 - (2 * (p * y[:, 0]).sum() + 1) / (p.sum() + y[:, 0].sum() + 1)
        return loss + dice, len(picks)

    def validate(self, epoch: int, stats: EpochStats) -> dict:
        return {"epoch": epoch + 1, "step": self.steps_of(epoch).stop,
                "train_loss": round(float(np.mean(stats.losses)), 5) if stats.losses else None,
                "lr": self.optimizer.param_groups[0]["lr"], "crops_per_s": round(stats.samples_per_s, 1),
                "seconds": round(stats.seconds, 1)}

    def loss_summary(self) -> dict:
        """The training loss at the start and at the end (means over a window of steps), for the card."""
        window = max(1, min(50, self.config.steps // 5))
        return {"train_loss_start": float(np.mean(self.losses[:window])),
                "train_loss_end": float(np.mean(self.losses[-window:]))}

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else {},
                "random": random_state(self.rng), "losses": self.losses, "seconds": self.seconds}

    def load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        set_random_state(state["random"], self.rng)
        self.losses, self.seconds = list(state["losses"]), state["seconds"]
