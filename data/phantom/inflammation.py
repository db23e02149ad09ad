"""Inflammation and its look-alikes in the several appearances they have on H&E (style "random").

Vasculitis (a finding; looks.VASCULITIS_LOOKS), always with cells *in* the wall and around it:
- ``leukocytoclastic``: neutrophils with nuclear dust (0.7-1.6 um fragments), extravasated red cells, fibrinoid
  in part of the wall;
- ``fibrinoid``: the wall replaced by smudgy bright pink fibrinoid without nuclei, dust and a few neutrophils;
- ``lymphocytic``: lymphocytes through the whole wall and around it, plump endothelium, no dust.
The infiltrate may cover only a sector (40-100 %) of the circumference.

Confounders outside the wall (drawn in every slide): perivascular cuffs (looks.CUFF_LOOKS: lymphocytes,
lymphocytes with plasma cells, histiocytes) around an intact wall, and basophilic debris (looks.DEBRIS_LOOKS:
``granular`` clusters, a ``floater`` (an angular cracked fragment 10-40 um on the section), haematoxylin
``precipitate`` (fine crystals), ``karyorrhectic`` apoptotic dust with histiocytes).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from calciscope.data.phantom.cells import (
    granules,
    histiocytes,
    lymphocytes,
    neutrophils,
    nuclear_dust,
    plasma_cells,
    rbcs,
)
from calciscope.data.phantom.extravascular import debris
from calciscope.data.phantom.geometry import TWO_PI, Vessel
from calciscope.data.phantom.raster import Scene


def _sector_points(rng, v: Vessel, r0: float, r1: float, n: int, th0: float, span: float, power: float = 1.0):
    th = th0 + span * rng.random(n)
    r = r0 + (r1 - r0) * rng.random(n) ** power
    return v.xy(r, th)


def fibrinoid_wall(scene: Scene, rng, v: Vessel, look: dict, th0: float, span: float) -> None:
    """Smudgy bright pink fibrinoid over an arc of the wall (drawn before the wall's nuclei, which it replaces)."""
    band = v.band(max(v.rl - scene.px(0.5), 0.5), v.ro, th0, th0 + span)
    scene.fill("E", band, look["fibrin_value"] * rng.uniform(1.05, 1.35), 1.1, "mid")
    scene.fill("H", band, rng.uniform(0.18, 0.4), 0.3, "mid")


def vasculitis(scene: Scene, rng, v: Vessel, look: dict, kind: str, th0: float, span: float) -> None:
    """The infiltrate of `kind` in and around the wall over the sector (th0, span); records the lesion."""
    px, dens = scene.px, look["cell_density"]
    v.cuff = v.cuff or px(rng.uniform(12, 28))
    r1 = v.ro + v.cuff
    area = 0.5 * span * (r1**2 - v.rl**2) * v.aspect
    n = int(area / px(9.0) ** 2 * rng.uniform(0.7, 1.1) * dens)
    pts = lambda k, power=1.4: _sector_points(rng, v, v.rl, r1, k, th0, span, power)  # noqa: E731
    wall = lambda k: _sector_points(rng, v, v.rl + px(0.5), v.ro, k, th0, span)  # noqa: E731
    wall_n = int(0.5 * span * (v.ro**2 - v.rl**2) * v.aspect / px(7.0) ** 2 * dens) + 2
    if kind == "lymphocytic":
        p = wall(wall_n)
        lymphocytes(scene, rng, p[:, 0], p[:, 1])
        p = pts(n, 1.5)
        lymphocytes(scene, rng, p[:, 0], p[:, 1])
        p = pts(n // 6 + 1)
        histiocytes(scene, rng, p[:, 0], p[:, 1])
        k = max(int(TWO_PI * v.rl / px(9)), 3)  # plump (activated) endothelium
        t = rng.uniform(0, TWO_PI, k)
        q = v.xy(v.rl + px(1.5), t)
        scene.ellipses("nuc", q[:, 0], q[:, 1], px(3.5), px(2.2), v.tangent_deg(t), rng.uniform(1.3, 1.7, k))
    else:
        frac = 0.4 if kind == "fibrinoid" else 1.0
        p = wall(int(wall_n * 0.6 * frac) + 1)
        neutrophils(scene, rng, p[:, 0], p[:, 1])
        p = pts(int(n * frac) + 1, 1.6)
        neutrophils(scene, rng, p[:, 0], p[:, 1])
        p = pts(n // 4 + 1)
        lymphocytes(scene, rng, p[:, 0], p[:, 1])
        p = pts(int(n * rng.uniform(0.8, 2.0)), 1.2)
        nuclear_dust(scene, rng, p[:, 0], p[:, 1])
    p = _sector_points(rng, v, v.ro + px(2), r1, int(n * rng.uniform(0.1, 0.5)) + 1, th0, span)
    rbcs(scene, rng, p[:, 0], p[:, 1])
    lesion = v.band(max(v.rl - px(1.0), 0.5), r1 + px(2.0), th0, th0 + span) if span < TWO_PI - 1e-6 \
        else v.ring(r1 + px(2.0))
    scene.lesions.append(("vasculitis", lesion, {"appearance": kind}))


def cuff(scene: Scene, rng, v: Vessel, look: dict, kind: str) -> np.ndarray:
    """Confounder: cells OUTSIDE an intact wall, over 40-100 % of its circumference. Returns the cuff outline."""
    px = scene.px
    v.cuff = v.cuff or px(rng.uniform(10, 30))
    r0, r1 = v.ro + px(3.0), v.ro + v.cuff
    th0, span = rng.uniform(0, TWO_PI), TWO_PI * (1.0 if rng.random() < 0.5 else rng.uniform(0.4, 1.0))
    n = int(0.5 * span * (r1**2 - r0**2) * v.aspect / px(10.0) ** 2 * rng.uniform(0.4, 0.9) * look["cell_density"])
    p = _sector_points(rng, v, r0, r1, n, th0, span, 1.5)
    if kind == "histiocytic":
        histiocytes(scene, rng, p[:, 0], p[:, 1], foamy=rng.random() < 0.5)
    else:
        lymphocytes(scene, rng, p[:, 0], p[:, 1])
    if kind == "lymphoplasmacytic":
        p = _sector_points(rng, v, r0, r1, n // 3 + 1, th0, span, 1.3)
        plasma_cells(scene, rng, p[:, 0], p[:, 1])
    p = _sector_points(rng, v, r0, r1, n // 8 + 1, th0, span)
    histiocytes(scene, rng, p[:, 0], p[:, 1])
    return v.ring(r1 + px(2.0))


def debris_varied(scene: Scene, rng, cx: float, cy: float, r: float, look: dict, kind: str) -> np.ndarray:
    """Confounder: basophilic material outside vessels, of `kind`. Returns its outline."""
    px, val = scene.px, look["calc_value"]
    if kind == "granular":
        return debris(scene, rng, cx, cy, r)
    if kind == "floater":
        rad = min(r, px(rng.uniform(5, 20)))
        a = np.sort(rng.uniform(0, TWO_PI, int(rng.integers(5, 10))))
        rr = rad * rng.uniform(0.5, 1.2, len(a))
        poly = np.stack([cx + rr * np.cos(a), cy + rr * np.sin(a)], 1)
        scene.fill("C", poly, rng.uniform(2.2, 3.4) * val, 1.0, "mid")
        for _ in range(int(rng.integers(1, 4))):
            t = rng.uniform(0, math.pi)
            d = np.array([math.cos(t), math.sin(t)]) * rad
            scene.line("C", np.array([[cx, cy] - d, [cx, cy] + d]), 0.2, px(rng.uniform(0.6, 1.5)))
        pts = poly
    else:
        n = int(math.pi * r * r / px(rng.uniform(3.0, 6.0)) ** 2) + 5
        pts = np.stack([cx + rng.normal(0, r / 2, n), cy + rng.normal(0, r / 2 * rng.uniform(0.5, 1.0), n)], 1)
        if kind == "precipitate":
            granules(scene, rng, pts[:, 0], pts[:, 1], r_um=(0.2, 0.6), value=(2.0, 3.2))
        else:  # karyorrhectic: apoptotic dust and a few tingible-body histiocytes
            nuclear_dust(scene, rng, pts[:, 0], pts[:, 1])
            k = max(n // 25, 1)
            histiocytes(scene, rng, pts[:k, 0], pts[:k, 1], foamy=True)
    hull = cv2.convexHull(pts.astype(np.float32)).reshape(-1, 2).astype(np.float64)
    c = hull.mean(0)
    return c + (hull - c) * 1.08 + np.sign(hull - c) * px(2.0)
