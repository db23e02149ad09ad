"""Cell and granule primitives: red cells, lymphocytes, neutrophils, nuclear dust, spindle nuclei, histiocytes,
calcium granules, and the random point sets they are scattered on. Sizes are drawn in um, placed in px.
"""

from __future__ import annotations

import cv2
import numpy as np

from calciscope.data.phantom.geometry import TWO_PI, Vessel
from calciscope.data.phantom.raster import SHIFT, Scene


def rbcs(scene: Scene, rng: np.random.Generator, x, y, value=(1.6, 2.1)) -> None:
    """Red cells, 7-8 um, biconcave (paler centre), seen at random tilts."""
    n = len(x)
    r = scene.px(rng.uniform(3.4, 3.9, n))
    b = r * rng.uniform(0.55, 1.0, n)
    ang = rng.uniform(0, 180, n)
    val = rng.uniform(value[0], value[1], n)
    scene.ellipses("rbc", x, y, r, b, ang, val)
    scene.ellipses("rbc_core", x, y, r * 0.45, b * 0.45, ang, val * 0.72)


def plasma_cells(scene: Scene, rng: np.random.Generator, x, y) -> None:
    """Plasma cells: oval purple-pink cytoplasm ~10 x 7 um, round nucleus ~5 um set off to one side."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    ang = rng.uniform(0, TWO_PI, n)
    scene.ellipses("cyto", x, y, scene.px(5.0), scene.px(3.6), np.degrees(ang), rng.uniform(0.9, 1.2, n))
    d = scene.px(1.6)
    r = scene.px(rng.uniform(2.3, 2.8, n))
    scene.ellipses("nuc", x + d * np.cos(ang), y + d * np.sin(ang), r, r * 0.92, 0.0, rng.uniform(1.5, 2.0, n))


def lymphocytes(scene: Scene, rng: np.random.Generator, x, y) -> None:
    """Small round dark nuclei, ~7 um."""
    n = len(x)
    r = scene.px(rng.uniform(2.9, 3.6, n))
    scene.ellipses("nuc", x, y, r, r * rng.uniform(0.82, 1.0, n), rng.uniform(0, 180, n), rng.uniform(1.6, 2.1, n))


def neutrophils(scene: Scene, rng: np.random.Generator, x, y) -> None:
    """Segmented nuclei: 3-4 small lobes within ~8 um, pale pink cytoplasm."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    scene.ellipses("cyto", x, y, scene.px(5.0), scene.px(4.5), rng.uniform(0, 180, n), 0.75)
    for _ in range(4):
        a = rng.uniform(0, TWO_PI, n)
        d = scene.px(rng.uniform(1.2, 2.4, n))
        keep = rng.random(n) < 0.85
        r = scene.px(rng.uniform(0.95, 1.35, n))
        scene.ellipses(
            "nuc", (x + d * np.cos(a))[keep], (y + d * np.sin(a))[keep], r[keep], (r * 0.8)[keep],
            rng.uniform(0, 180, n)[keep], rng.uniform(1.6, 2.1, n)[keep],
        )


def nuclear_dust(scene: Scene, rng: np.random.Generator, x, y) -> None:
    """Karyorrhectic nuclear dust: tiny dark dots, 0.7-1.6 um."""
    n = len(x)
    r = scene.px(rng.uniform(0.35, 0.8, n))
    scene.ellipses("nuc", x, y, r, r, 0.0, rng.uniform(1.8, 2.4, n))


def spindles(scene: Scene, rng: np.random.Generator, x, y, angle_deg, value=(1.0, 1.5)) -> None:
    """Fibroblast / smooth-muscle nuclei: elongated, 8-14 um long, 2-3 um wide."""
    n = len(x)
    a = scene.px(rng.uniform(3.5, 6.5, n))
    b = scene.px(rng.uniform(0.9, 1.5, n))
    scene.ellipses("nuc", x, y, a, b, angle_deg, rng.uniform(value[0], value[1], n))


def histiocytes(scene: Scene, rng: np.random.Generator, x, y, foamy: bool = False) -> None:
    """Oval, paler nuclei, 6-9 um; `foamy` adds a large pale cytoplasm (lipid-laden macrophages)."""
    n = len(x)
    if foamy:
        scene.ellipses("cyto", x, y, scene.px(8.0), scene.px(6.5), rng.uniform(0, 180, n), 0.35)
    a = scene.px(rng.uniform(3.2, 4.5, n))
    scene.ellipses("nuc", x, y, a, a * rng.uniform(0.6, 0.85, n), rng.uniform(0, 180, n), rng.uniform(0.9, 1.3, n))


def granules(scene: Scene, rng: np.random.Generator, x, y, r_um=(0.5, 1.4), value=(2.0, 3.2)) -> None:
    """Basophilic calcium granules (drawn on the calcium canvas)."""
    n = len(x)
    r = scene.px(rng.uniform(r_um[0], r_um[1], n))
    scene.ellipses("calc", x, y, r, r * rng.uniform(0.6, 1.0, n), rng.uniform(0, 180, n), rng.uniform(*value, n))


def points_in_poly(rng: np.random.Generator, poly: np.ndarray, n: int) -> np.ndarray:
    """About n uniform random points inside a polygon (rejection on its bounding box)."""
    lo, hi = poly.min(0), poly.max(0)
    if n <= 0 or np.any(hi - lo < 1):
        return np.zeros((0, 2))
    w, h = int(hi[0] - lo[0]) + 2, int(hi[1] - lo[1]) + 2
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [np.round((poly - lo) * 4).astype(np.int32)], 1, cv2.LINE_8, SHIFT)
    frac = max(mask.mean(), 0.05)
    pts = lo + rng.random((int(n / frac * 1.2) + 4, 2)) * (hi - lo)
    ij = np.clip((pts - lo).astype(int), 0, [w - 1, h - 1])
    return pts[mask[ij[:, 1], ij[:, 0]] > 0][:n]


def annulus_points(rng: np.random.Generator, v: Vessel, r0: float, r1: float, n: int, power: float = 1.0):
    """n random points between radii r0 and r1 (px) of a vessel's outline (power > 1 crowds them towards r0);
    returns (xy, angle, radius)."""
    th = rng.uniform(0, TWO_PI, n)
    r = r0 + (r1 - r0) * rng.random(n) ** power
    return v.xy(r, th), th, r

