"""Device and precision: where a network runs and in which dtype, for training and inference alike.

On CPUs with native bf16 (AVX512-BF16 or AMX) ``auto`` means bf16 autocast, fp16 on CUDA, fp32 elsewhere;
``prepare_inputs`` turns uint8 tiles into the normalised float a network reads, channels_last when asked.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

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
