"""Where ``predict`` is on one slide: segmenter windows run, vessels judged, grid tiles scored, and the share of the
slide's work that is done, so a progress bar can show an ETA from the start.

Each unit of work is weighted by its network's multiply-accumulates (a window of the segmenter costs far more than a
tile of a small tile model), counted once per network on a small input with forward hooks (``forward_macs``); the
share done is then close to the share of the time spent, whatever the networks are.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn


@dataclass(frozen=True)
class SlideProgress:
    """Counts of the work ``predict`` does on one slide (done, total) and each unit's cost (multiply-accumulates)."""

    windows: tuple[int, int] = (0, 0)  # vessel segmenter windows
    vessels: tuple[int, int] = (0, 0)  # vessel crops judged by the classifiers (or vessels whose tiles were scored)
    tiles: tuple[int, int] = (0, 0)  # grid tiles scored
    costs: tuple[float, float, float] = (1.0, 1.0, 1.0)  # per window, vessel and tile

    @property
    def done(self) -> float:
        return sum(d * c for (d, _), c in zip(self._counts(), self.costs))

    @property
    def total(self) -> float:
        return sum(t * c for (_, t), c in zip(self._counts(), self.costs))

    @property
    def fraction(self) -> float:
        """Share of the slide's work done (0 to 1)."""
        return min(self.done / self.total, 1.0) if self.total > 0 else 0.0

    def describe(self) -> str:
        """e.g. ``vessels: 111/111 windows, 40/230 judged · tiles 0/1385``."""
        parts = []
        if self.windows[1] or self.vessels[1]:
            parts.append(f"vessels: {self.windows[0]}/{self.windows[1]} windows, "
                         f"{self.vessels[0]}/{self.vessels[1]} judged")
        parts.append(f"tiles {self.tiles[0]}/{self.tiles[1]}")
        return " · ".join(parts)

    def _counts(self):
        return self.windows, self.vessels, self.tiles

    def step(self, what: str, done: int, total: int) -> SlideProgress:
        """This record with ``what`` ("windows", "vessels" or "tiles") at (done, total)."""
        return replace(self, **{what: (int(done), int(total))})


def forward_macs(network: nn.Module, *inputs: torch.Tensor) -> float:
    """Multiply-accumulates of one forward pass of ``network`` on ``inputs`` (convolutions, transposed convolutions and
    linear layers; what dominates a CNN's cost)."""
    total = 0.0

    def count(module, args, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += output.numel() * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, nn.ConvTranspose2d):
            total += args[0].numel() * module.out_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(count) for m in network.modules()
               if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    try:
        with torch.inference_mode():
            network(*inputs)
    finally:
        for h in handles:
            h.remove()
    return total
