"""The pieces of a training loop: precision, one epoch of training, predictions, schedule and run state.

A batch is ``(inputs, targets, indices)``; ``inputs`` is a uint8 image batch (tile models, normalised here) or
``(embeddings, mask)`` (attention-MIL on cached embeddings). Models return logits, or ``(logits, attention)``.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from calciscope.errors import CalciscopeError


@dataclass(frozen=True)
class Precision:
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype; None = full precision
    channels_last: bool

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def describe(self) -> str:
        dtype = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        return f"{self.device.type} {dtype}{' channels_last' if self.channels_last else ''}"


def cpu_has_bf16() -> bool:
    """True where the CPU runs bf16 matrix work natively (AVX512-BF16 or AMX); elsewhere autocast is slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(spec: str = "auto") -> torch.device:
    """A ``device`` setting as a torch device: ``auto`` is CUDA when there is one, else the CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def choose_precision(amp: str, channels_last: bool, device: torch.device | None = None) -> Precision:
    device = device or resolve_device()
    if amp == "off":
        dtype = None
    elif amp == "bf16":
        dtype = torch.bfloat16
    elif amp == "fp16":
        if device.type != "cuda":
            raise CalciscopeError("optim.amp 'fp16' needs a CUDA device; use 'bf16' or 'auto' on CPU")
        dtype = torch.float16
    else:  # auto
        dtype = torch.float16 if device.type == "cuda" else (torch.bfloat16 if cpu_has_bf16() else None)
    return Precision(device, dtype, channels_last)


def check_device(spec: str, source: object = None) -> None:
    """Refuse a ``device`` setting this machine cannot honour (``source``, when given, names the config)."""
    where = f"{source}: " if source is not None else ""
    if spec == "auto":
        return
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise CalciscopeError(f"{where}device {spec!r} is not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise CalciscopeError(f"{where}device {spec!r} is not supported (auto, cpu, cuda or cuda:N)")
    if not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count():
        raise CalciscopeError(f"{where}device {spec!r} is not available here (CUDA devices: "
                              f"{torch.cuda.device_count()}); use auto or cpu")


def device_of(module: nn.Module) -> torch.device:
    """The device of a module's parameters (the CPU for one without any)."""
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def prepare_inputs(inputs, mean: torch.Tensor, std: torch.Tensor, precision: Precision):
    """uint8 images → normalised float on the device (channels_last if asked); MIL inputs → device."""
    if isinstance(inputs, (tuple, list)):
        return tuple(t.to(precision.device, non_blocking=True) for t in inputs)
    x = inputs.to(precision.device, non_blocking=True).float().div_(255.0)
    x = (x - mean.to(x.device)) / std.to(x.device)
    if precision.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


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
