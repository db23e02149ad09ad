"""The second renderer's canvas: value noise, dye layers composited over glass, and cell stamps.

Its own colour model (not the phantom's Beer-Lambert sum of stain optical densities): each dye is an RGB colour
drawn per tile in HSV ranges, and a layer of dye density ``d`` is laid over what is below it like paint,
``rgb = rgb * (1 - a) + colour * a`` with ``a = 1 - exp(-d)``, in a fixed order (eosin, red cells, fibrin,
haematoxylin, calcium). Coordinates are in um on a square canvas of ``n`` px at ``um_per_px``.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, field

import cv2
import numpy as np

LAYERS = ("eosin", "rbc", "fibrin", "haem", "calcium")
# (hue range in degrees, saturation range, value range) of each dye at full strength
DYE_HSV = {
    "eosin": ((318, 350), (0.32, 0.65), (0.8, 0.95)),
    "rbc": ((340, 368), (0.55, 0.85), (0.72, 0.9)),
    "fibrin": ((320, 345), (0.35, 0.6), (0.82, 0.95)),
    "haem": ((245, 285), (0.35, 0.7), (0.3, 0.55)),
    "calcium": ((235, 290), (0.25, 0.65), (0.12, 0.38)),
}


def value_noise(rng: np.random.Generator, n: int, cell_px: float, octaves: int = 3) -> np.ndarray:
    """Fractal value noise in about [-1, 1]: random lattices of spacing cell_px, cell_px/2, ... bicubically
    enlarged and summed with halving weights."""
    out = np.zeros((n, n), np.float32)
    amp, total = 1.0, 0.0
    for k in range(octaves):
        step = max(cell_px / 2**k, 1.0)
        m = int(np.ceil(n / step)) + 3
        grid = rng.uniform(-1, 1, (m, m)).astype(np.float32)
        big = cv2.resize(grid, (int(m * step), int(m * step)), interpolation=cv2.INTER_CUBIC)
        out += amp * big[:n, :n]
        total += amp
        amp *= 0.5
    return out / total


@dataclass
class Canvas:
    """Dye densities of one tile, composited to RGB by :meth:`rgb`."""

    n: int
    um_per_px: float
    rng: np.random.Generator
    dens: dict = field(default_factory=dict)
    colours: dict = field(default_factory=dict)
    glass: np.ndarray | None = None

    def __post_init__(self):
        self.dens = {k: np.zeros((self.n, self.n), np.float32) for k in LAYERS}
        for name, (h, s, v) in DYE_HSV.items():
            rgb = colorsys.hsv_to_rgb((self.rng.uniform(*h) % 360) / 360, self.rng.uniform(*s), self.rng.uniform(*v))
            self.colours[name] = np.array(rgb, np.float32) * 255
        self.glass = np.clip(self.rng.uniform(236, 252) + self.rng.normal(0, 3, 3), 220, 255).astype(np.float32)
        c = (np.arange(self.n, dtype=np.float32) + 0.5) * self.um_per_px
        self.X, self.Y = np.meshgrid(c, c)

    def px(self, um: float) -> float:
        return um / self.um_per_px

    def add(self, layer: str, mask_or_values, amount: float | np.ndarray = 1.0) -> None:
        self.dens[layer] += np.asarray(mask_or_values, np.float32) * amount

    def disc(self, layer: str, x: float, y: float, rx: float, ry: float, angle_deg: float, value: float) -> None:
        """Add dye density `value` over an anti-aliased ellipse (centre and radii in um)."""
        cx, cy, r = self.px(x), self.px(y), self.px(max(rx, ry)) + 2
        x0, y0 = max(int(cx - r), 0), max(int(cy - r), 0)
        x1, y1 = min(int(cx + r) + 2, self.n), min(int(cy + r) + 2, self.n)
        if x1 <= x0 or y1 <= y0:
            return
        win = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.ellipse(win, (int(round((cx - x0) * 16)), int(round((cy - y0) * 16))),
                    (max(int(self.px(rx) * 16), 6), max(int(self.px(ry) * 16), 6)), angle_deg, 0, 360, 255, -1,
                    cv2.LINE_AA, 4)
        self.dens[layer][y0:y1, x0:x1] += win.astype(np.float32) * (float(value) / 255.0)

    def rgb(self) -> np.ndarray:
        """Composite the layers over the glass, add a slight optical blur and sensor noise; uint8 HWC."""
        img = np.broadcast_to(self.glass, (self.n, self.n, 3)).copy()
        for name in LAYERS:
            d = cv2.GaussianBlur(self.dens[name], (0, 0), 0.7)
            a = (1.0 - np.exp(-np.clip(d, 0, None)))[..., None]
            img = img * (1 - a) + self.colours[name] * a
        img += self.rng.normal(0, 2.0, img.shape).astype(np.float32)
        return np.clip(img + 0.5, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- cell stamps
def lymphocyte(cv: Canvas, x, y) -> None:
    r = cv.rng.uniform(2.8, 3.8)
    cv.disc("haem", x, y, r, r * cv.rng.uniform(0.85, 1.0), cv.rng.uniform(0, 180), cv.rng.uniform(1.6, 2.4))


def neutrophil(cv: Canvas, x, y) -> None:
    """Three or four lobes of ~2.4 um joined in an arc, in pale cytoplasm ~10 um."""
    cv.disc("eosin", x, y, 5.0, 4.6, 0, 0.35)
    a0, k = cv.rng.uniform(0, 2 * np.pi), int(cv.rng.integers(3, 5))
    for j in range(k):
        a = a0 + j * cv.rng.uniform(0.9, 1.5)
        cv.disc("haem", x + 2.2 * np.cos(a), y + 2.2 * np.sin(a), 1.3, 1.0, np.degrees(a), cv.rng.uniform(1.6, 2.3))


def dust(cv: Canvas, x, y) -> None:
    cv.disc("haem", x, y, cv.rng.uniform(0.4, 0.9), cv.rng.uniform(0.4, 0.9), 0, cv.rng.uniform(1.8, 2.8))


def spindle(cv: Canvas, x, y, angle_deg: float) -> None:
    cv.disc("haem", x, y, cv.rng.uniform(4.0, 6.5), cv.rng.uniform(1.0, 1.6), angle_deg, cv.rng.uniform(1.0, 1.6))


def red_cell(cv: Canvas, x, y, value: float = 1.6) -> None:
    r = cv.rng.uniform(3.3, 3.9)
    ang = cv.rng.uniform(0, 180)
    squash = cv.rng.uniform(0.6, 1.0)
    cv.disc("rbc", x, y, r, r * squash, ang, value)
    cv.disc("rbc", x, y, r * 0.4, r * 0.4 * squash, ang, -0.35 * value)  # the paler biconcave centre
