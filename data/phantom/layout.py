"""Where the tissue lies on the slide: a skin slab (epidermis, dermis, fat) rotated onto the square, and its
random draw. The slab frame (s along the surface, depth into the fat) is what the builder places things in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from calciscope.data.phantom.geometry import TWO_PI


@dataclass
class Layout:
    """Where the tissue is: a slab (epidermis side up in its own frame) rotated onto the slide.

    In the slab frame, s runs along the skin surface and depth runs from the surface (0) into the fat.
    `f` is a signed distance (px) to the tissue outline, positive inside.
    """

    cx: float
    cy: float
    ux: float
    uy: float
    half_w: float
    half_h: float
    top_amp: float
    top_lambda: float
    top_phase: float
    epidermis: bool
    epi_px: float
    corneum_px: float
    ridge_amp: float
    ridge_lambda: float
    ridge_phase: float
    derm_px: float
    border: tuple[int, int] | None
    size: int
    subcutis: bool = True  # False: dermis down to the deep edge, no fat anywhere

    def fields(self, X, Y, edge_noise):
        dx, dy = X - self.cx, Y - self.cy
        s = dx * self.ux + dy * self.uy
        t = -dx * self.uy + dy * self.ux
        top = -self.half_h + self.top_amp * np.sin(TWO_PI * s / self.top_lambda + self.top_phase)
        depth = t - top
        f = np.minimum(depth if self.epidermis else depth + edge_noise, self.half_h - t + edge_noise)
        f = np.minimum(f, self.half_w - np.abs(s) + edge_noise)
        if self.border is not None:
            side, width = self.border
            gap = width + 0.02 * self.size
            edge = {0: Y - gap, 1: (self.size - gap) - X, 2: (self.size - gap) - Y, 3: X - gap}[side]
            f = np.minimum(f, edge)
        return f, depth, s

    def to_xy(self, s, depth):
        """Level-0 (x, y) of slab coordinates."""
        top = -self.half_h + self.top_amp * np.sin(TWO_PI * s / self.top_lambda + self.top_phase)
        t = top + depth
        return self.cx + s * self.ux - t * self.uy, self.cy + s * self.uy + t * self.ux


def draw_layout(rng: np.random.Generator, size: int, mpp: float, border: tuple[int, int] | None,
                subcutis: bool) -> Layout:
    """A random slab that fits the `size` px square (clear of the black `border`, if any) at `mpp` um/px."""

    def px(um):
        return um / mpp

    ang = int(rng.integers(4)) * math.pi / 2 + rng.uniform(-0.3, 0.3)
    ux, uy = math.cos(ang), math.sin(ang)
    hw, hh = rng.uniform(0.3, 0.42) * size, rng.uniform(0.28, 0.4) * size
    margin = 0.05 * size + (border[1] if border else 0)
    ex, ey = abs(ux) * hw + abs(uy) * hh, abs(uy) * hw + abs(ux) * hh
    k = min(1.0, (size / 2 - margin) / ex, (size / 2 - margin) / ey)
    hw, hh, ex, ey = hw * k, hh * k, ex * k, ey * k
    cx = size / 2 + rng.uniform(-1, 1) * max(size / 2 - margin - ex, 0)
    cy = size / 2 + rng.uniform(-1, 1) * max(size / 2 - margin - ey, 0)
    epidermis = bool(rng.random() < 0.6) or not subcutis  # a shave / shallow punch has its epidermis
    epi = min(px(rng.uniform(50, 90)), 0.15 * hh) if epidermis else 0.0
    lay = Layout(cx, cy, ux, uy, hw, hh, px(rng.uniform(0, 30)), px(rng.uniform(400, 1500)),
                 rng.uniform(0, TWO_PI), epidermis, epi, min(px(rng.uniform(8, 18)), 0.3 * epi),
                 px(rng.uniform(5, 14)), px(rng.uniform(60, 130)), rng.uniform(0, TWO_PI),
                 epi + 2 * hh * rng.uniform(0.18, 0.42), border, size)
    if not subcutis:  # dermis down to the deep cut edge (depth ~2 hh)
        lay.derm_px, lay.subcutis = 2 * hh, False
    return lay
