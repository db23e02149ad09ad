"""The pieces of a training loop: precision, one epoch of training, predictions, schedule and run state.

A batch is ``(inputs, targets, indices)``; ``inputs`` is a uint8 image batch (tile models, normalised here) or
``(embeddings, mask)`` (attention-MIL on cached embeddings). Models return logits, or ``(logits, attention)``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from calciscope.errors import CalciscopeError
from calciscope.model.precision import Precision, prepare_inputs


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


@dataclass
class EpochStats:
    loss: float
    samples: int
    seconds: float

    @property
    def samples_per_s(self) -> float:
        return self.samples / max(self.seconds, 1e-9)


def train_one_epoch(model, loader, criterion, optimizer, scheduler, precision: Precision, mean, std, *,
                    accumulate: int = 1, scaler=None, max_steps: int | None = None, progress=None) -> EpochStats:
    """One pass over ``loader``; the optimizer steps every ``accumulate`` batches (the last partial group too)."""
    model.train()
    total_loss, samples, start = 0.0, 0, time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    n_batches = len(loader) if max_steps is None else min(len(loader), max_steps * accumulate)
    for step, (inputs, targets, _) in enumerate(loader):
        if step >= n_batches:
            break
        x = prepare_inputs(inputs, mean, std, precision)
        y = targets.to(precision.device, dtype=torch.float32)
        with precision.autocast():
            logits = forward(model, x)
        loss = criterion(logits.float(), y)
        (scaler.scale(loss / accumulate) if scaler else loss / accumulate).backward()
        if (step + 1) % accumulate == 0 or step + 1 == n_batches:
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        batch = len(y)
        total_loss += float(loss.detach()) * batch
        samples += batch
        if progress is not None:
            progress(samples, total_loss / samples, samples / (time.perf_counter() - start))
    return EpochStats(total_loss / max(samples, 1), samples, time.perf_counter() - start)


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


def save_state(path: Path, **state) -> None:
    """Run state for resume (tensors, numbers, lists, dicts only: loads with ``weights_only=True``)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_state(path: Path) -> dict:
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:
        raise CalciscopeError(f"{path}: cannot read the run state to resume ({type(exc).__name__}: {exc})") from None
