"""The one training engine: every trainer (tile CNN / attention-MIL, vessel segmenter, vessel classifier) runs on it.

A trainer is a :class:`Trainer` that fills in hooks, as in nnU-Net's trainer; the engine owns the rest:

- device and precision: :func:`choose_precision` (``model.precision``) and :func:`grad_scaler` (fp16 on CUDA only);
- the step: :func:`run_steps` (forward under autocast in the trainer's ``loss`` function, backward, gradient
  accumulation, optimiser and schedule step, per-step losses, a progress callback);
- the loop, :func:`run_epochs`: per epoch ``on_epoch_start`` → ``train_epoch`` → ``validate`` (a metrics row, and a
  ``score`` to select on) → ``on_improved`` (a new best) → the run state saved → ``on_epoch_end``; early stopping on
  ``patience`` epochs without a better score; DDP (rank 0 validates and writes, the others follow);
- checkpoint and exact resume: ``last/state.pt`` holds the trainer's ``state()`` (weights, optimiser, schedule,
  random generators) and the loop's counters, written with ``torch.save`` and read back only with
  ``torch.load(..., weights_only=True)``: nothing is unpickled;
- the run folder (:class:`RunFolder`): ``config.yaml`` (the resolved config, written when the run starts),
  ``metrics.csv`` (one row per epoch), ``last/state.pt``, and the deliverable the trainer names (``model/`` for the
  tile trainer, the segmenter or classifier folder itself for the vessel networks);
- progress: one line per epoch (``epoch N: ...``) and, within an epoch, :class:`StepLines` or a tqdm bar.

A batch of the tile trainer is ``(inputs, targets, indices)``; ``inputs`` is a uint8 image batch (normalised here) or
``(embeddings, mask)`` (attention-MIL on cached embeddings). Models return logits, or ``(logits, attention)``.
"""

from __future__ import annotations

import csv
import itertools
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from calciscope.errors import CalciscopeError
from calciscope.io import save_yaml
from calciscope.model.precision import Precision, choose_precision, prepare_inputs, resolve_device

__all__ = ["EpochBar", "EpochStats", "RunFolder", "StepLines", "Trainer", "choose_precision", "count_lines", "forward",
           "grad_scaler", "load_state", "open_run", "predict_logits", "random_state", "resolve_device", "run_epochs",
           "run_steps", "save_state", "set_random_state", "train_one_epoch", "warmup_cosine"]


# -- the step ----------------------------------------------------------------------------------------------------
def forward(model: nn.Module, inputs) -> torch.Tensor:
    out = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    return out[0] if isinstance(out, tuple) else out


def warmup_cosine(total_steps: int, warmup_steps: int):
    """LR multiplier: linear warm-up to 1, then cosine decay to 0 (a plain function: its state is just the step)."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def grad_scaler(precision: Precision) -> torch.amp.GradScaler | None:
    """A gradient scaler where the autocast dtype needs one (fp16), else None."""
    return torch.amp.GradScaler("cuda") if precision.dtype == torch.float16 else None


@dataclass
class EpochStats:
    loss: float  # mean over samples
    samples: int
    seconds: float
    losses: list[float] = field(default_factory=list)  # per batch

    @property
    def samples_per_s(self) -> float:
        return self.samples / max(self.seconds, 1e-9)


def run_steps(batches: Iterable, loss: Callable[[Any], tuple[torch.Tensor, int]], optimizer, scheduler, *,
              scaler=None, accumulate: int = 1, n_batches: int | None = None,
              on_batch: Callable[[int, EpochStats], None] | None = None) -> EpochStats:
    """Train on ``batches`` (at most ``n_batches``): ``loss(batch)`` gives (the loss, computed under the trainer's
    autocast; the batch size); the optimizer and the schedule step every ``accumulate`` batches (the last partial
    group too). ``on_batch(i, stats so far)`` follows each batch."""
    stats, start = EpochStats(0.0, 0, 0.0), time.perf_counter()
    total = 0.0
    optimizer.zero_grad(set_to_none=True)
    if n_batches is not None:
        batches = itertools.islice(batches, n_batches)
    for i, batch in enumerate(batches):
        value, size = loss(batch)
        (scaler.scale(value / accumulate) if scaler else value / accumulate).backward()
        if (i + 1) % accumulate == 0 or (n_batches is not None and i + 1 == n_batches):
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        stats.losses.append(float(value.detach()))
        total += stats.losses[-1] * size
        stats.samples += size
        stats.seconds = time.perf_counter() - start
        stats.loss = total / stats.samples
        if on_batch is not None:
            on_batch(i, stats)
    stats.seconds = time.perf_counter() - start
    return stats


def train_one_epoch(model, loader, criterion, optimizer, scheduler, precision: Precision, mean, std, *,
                    accumulate: int = 1, scaler=None, max_steps: int | None = None, progress=None) -> EpochStats:
    """One pass of a tile (or bag) model over ``loader``; ``progress(samples, mean loss, samples/s)`` per batch."""
    model.train()
    n_batches = len(loader) if max_steps is None else min(len(loader), max_steps * accumulate)

    def loss(batch):
        inputs, targets, _ = batch
        x = prepare_inputs(inputs, mean, std, precision)
        y = targets.to(precision.device, dtype=torch.float32)
        with precision.autocast():
            logits = forward(model, x)
        return criterion(logits.float(), y), len(y)

    def report(_, stats: EpochStats) -> None:
        progress(stats.samples, stats.loss, stats.samples_per_s)

    return run_steps(loader, loss, optimizer, scheduler, scaler=scaler, accumulate=accumulate, n_batches=n_batches,
                     on_batch=report if progress is not None else None)


@torch.inference_mode()
def predict_logits(model, loader, precision: Precision, mean, std) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits (N, L) float32, targets (N, L), dataset positions (N,)) over a loader, in loader order."""
    model.eval()
    logits, targets, positions = [], [], []
    for inputs, y, idx in loader:
        x = prepare_inputs(inputs, mean, std, precision)
        with precision.autocast():
            out = forward(model, x)
        logits.append(out.float().cpu().numpy())
        targets.append(np.asarray(y, np.float32))
        positions.append(np.asarray(idx))
    if not logits:
        raise CalciscopeError("nothing to evaluate: the split is empty")
    return np.concatenate(logits), np.concatenate(targets), np.concatenate(positions)


# -- run state ---------------------------------------------------------------------------------------------------
def save_state(path: Path, **state) -> None:
    """Run state for resume (tensors, numbers, strings, lists, dicts only: loads with ``weights_only=True``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_state(path: Path) -> dict:
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:
        raise CalciscopeError(f"{path}: cannot read the run state to resume ({type(exc).__name__}: {exc})") from None


def random_state(rng: np.random.Generator | None = None) -> dict:
    """The random generators a step trainer draws from (numpy ``rng``, torch's CPU and CUDA ones), for resume."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if rng is not None:
        state["numpy"] = rng.bit_generator.state
    return state


def set_random_state(state: dict, rng: np.random.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if rng is not None:
        rng.bit_generator.state = state["numpy"]


# -- the run folder ----------------------------------------------------------------------------------------------
@dataclass
class RunFolder:
    """Where a run writes: ``config.yaml``, ``metrics.csv``, ``last/state.pt`` and the trainer's deliverable."""

    root: Path

    @property
    def config_file(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics_csv(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def state_file(self) -> Path:
        return self.root / "last" / "state.pt"

    def save_config(self, config) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return save_yaml(config, self.config_file)

    def write_history(self, history: list[dict]) -> None:
        keys = list(dict.fromkeys(k for row in history for k in row))
        tmp = self.metrics_csv.with_name(self.metrics_csv.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(history)
        tmp.replace(self.metrics_csv)

    def drop_state(self) -> None:
        """Remove ``last/`` (a finished run whose deliverable is written needs no resume state)."""
        shutil.rmtree(self.root / "last", ignore_errors=True)


def open_run(config, resume: str | Path | None, load_config: Callable[[Path], Any], what: str):
    """(config, run folder) of a run that writes into its ``out`` folder: ``resume`` continues the stopped run there
    with the config.yaml it saved (read by ``load_config``); a fresh run drops any resume state an earlier run left
    in its folder. ``what`` names the command in errors."""
    if resume is not None:
        run = RunFolder(Path(resume))
        if not run.config_file.is_file():
            raise CalciscopeError(f"{run.root}: not a {what} run to resume (no config.yaml)")
        return load_config(run.config_file), run
    run = RunFolder(Path(config.out))
    run.drop_state()
    return config, run


# -- the loop ----------------------------------------------------------------------------------------------------
class Trainer:
    """The hooks :func:`run_epochs` calls; a trainer overrides what it needs (``train_epoch`` at least).

    ``epochs`` is the number of epochs (for the step trainers: chunks of steps between resume points);
    ``patience`` > 0 stops after that many epochs without a better validation ``score``.
    ``prefer_later_ties``: a score within ``tie_tolerance`` of the best also counts as improved (the later epoch of
    a tie is kept: validation cannot tell them apart, and the later one has trained longer); ``saturation``: an epoch
    scoring at least this never counts toward ``patience`` (a saturated validation cannot show progress).
    """

    epochs: int = 1
    patience: int = 0
    prefer_later_ties: bool = False
    tie_tolerance: float = 0.0
    saturation: float | None = None

    def on_train_start(self) -> None:
        """After a resume (or none), before the first epoch."""

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def train_epoch(self, epoch: int) -> EpochStats:
        raise NotImplementedError

    def validate(self, epoch: int, stats: EpochStats) -> dict:
        """The epoch's metrics row (``metrics.csv``); a ``score`` key (higher is better) is taken out to select on."""
        return {"epoch": epoch + 1, "train_loss": round(stats.loss, 5)}

    def on_improved(self, epoch: int) -> None:
        """The epoch's score is the best so far (e.g. save ``best/``)."""

    def on_epoch_end(self, epoch: int, row: dict) -> None:
        pass

    def epoch_line(self, epoch: int, row: dict) -> str | None:
        """The progress line of an epoch (None: none)."""
        return None

    def state(self) -> dict:
        """Everything an exact resume needs besides the loop's counters (tensors, numbers, lists, dicts)."""
        return {}

    def load_state(self, state: dict) -> None:
        pass


def run_epochs(trainer: Trainer, folder: RunFolder, *, rank: int = 0, world: int = 1,
               progress: Callable[[str], None] | None = None) -> dict:
    """Run ``trainer``'s epochs, resuming from ``folder.state_file`` when it exists; returns the loop's counters
    (``epoch`` last done, ``best`` score, ``bad_epochs``, ``history`` rows)."""
    state: dict[str, Any] = {"epoch": -1, "best": -np.inf, "bad_epochs": 0, "history": [], "best_epoch": -1}
    if folder.state_file.is_file():  # resume: the last completed epoch's weights, optimiser, schedule and counters
        saved = load_state(folder.state_file)
        trainer.load_state(saved)
        state = {k: saved.get(k, state[k]) for k in state}
    trainer.on_train_start()
    for epoch in range(state["epoch"] + 1, trainer.epochs):
        if state["bad_epochs"] >= trainer.patience > 0:
            break
        trainer.on_epoch_start(epoch)
        stats = trainer.train_epoch(epoch)
        if rank == 0:
            row = trainer.validate(epoch, stats)
            improved = _score_epoch(trainer, state, row.pop("score", None))
            state["history"].append(row)
            if improved:
                state["best_epoch"] = epoch
                trainer.on_improved(epoch)
            state["epoch"] = epoch
            save_state(folder.state_file, **trainer.state(), **state)
            folder.write_history(state["history"])
            trainer.on_epoch_end(epoch, row)
            line = trainer.epoch_line(epoch, row)
            if progress is not None and line:
                progress(line)
        if world > 1:
            _broadcast(state)
    return state


def _score_epoch(trainer: Trainer, state: dict, score: float | None) -> bool:
    """Update ``best`` and ``bad_epochs`` with an epoch's score; whether the epoch becomes the best one."""
    if score is None:
        state["bad_epochs"] += 1
        return False
    better = score > state["best"]
    tie = trainer.prefer_later_ties and not better and score >= state["best"] - trainer.tie_tolerance
    saturated = trainer.saturation is not None and score >= trainer.saturation
    state["bad_epochs"] = 0 if better or saturated else state["bad_epochs"] + 1
    state["best"] = max(state["best"], score)
    return better or tie


def _broadcast(state: dict) -> None:
    """Rank 0 decides early stopping; the others follow."""
    payload = [state["bad_epochs"], state["best"]]
    dist.broadcast_object_list(payload, src=0)
    state["bad_epochs"], state["best"] = payload


# -- progress ----------------------------------------------------------------------------------------------------
class StepLines:
    """``step N/total loss L (R crops/s)`` every ``every`` steps and at the last, L the mean of the last ``every``."""

    def __init__(self, progress: Callable[[str], None] | None, total: int, every: int, first_step: int = 0,
                 unit: str = "crops"):
        self.progress, self.total, self.every, self.first, self.unit = progress, total, every, first_step, unit

    def __call__(self, i: int, stats: EpochStats) -> None:
        step = self.first + i + 1
        if self.progress is None or (step % self.every and step != self.total):
            return
        self.progress(f"step {step}/{self.total} loss {np.mean(stats.losses[-self.every:]):.4f} "
                      f"({stats.samples_per_s:.1f} {self.unit}/s)")


class EpochBar:
    """A tqdm bar over an epoch's samples (``update(samples, mean loss, samples/s)``); silent when not shown."""

    def __init__(self, desc: str, total: int, show: bool, unit: str = "tile"):
        self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True) if show else None

    def update(self, samples: int, loss: float, rate: float) -> None:
        if self._bar is not None:
            self._bar.n = samples
            self._bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{rate:.0f}", refresh=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def count_lines(desc: str, show: bool) -> Callable[[int, int], None] | None:
    """``desc: done/total`` about every tenth (data preparation)."""
    if not show:
        return None

    def progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 10) == 0:
            print(f"{desc}: {done}/{total}", flush=True)

    return progress
