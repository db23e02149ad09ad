"""Lesions and confounders outside vessels, each drawn where the builder puts it: basophilic debris,
calcified adipocyte membranes, calcified elastic fibres (dermal calcification without fat), necrosis.

Lesions append their ground-truth polygon to scene.lesions; debris, a confounder, returns its outline.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from calciscope.data.phantom.cells import granules, histiocytes, neutrophils, nuclear_dust, points_in_poly
from calciscope.data.phantom.geometry import TWO_PI, stroke_outline
from calciscope.data.phantom.raster import Scene


def debris(scene: Scene, rng, cx: float, cy: float, r: float) -> np.ndarray:
    """Confounder: basophilic granular debris outside vessels. Returns its outline (convex hull)."""
    n = int(math.pi * r * r / scene.px(4.0) ** 2 * rng.uniform(0.3, 0.7)) + 5
    p = np.stack([cx + rng.normal(0, r / 2, n), cy + rng.normal(0, r / 2 * rng.uniform(0.4, 1.0), n)], 1)
    granules(scene, rng, p[:, 0], p[:, 1], r_um=(0.5, 2.2), value=(1.8, 3.2))
    for _ in range(rng.integers(0, 4)):
        c = p[rng.integers(n)]
        a = np.sort(rng.uniform(0, TWO_PI, 6))
        rr = scene.px(rng.uniform(2, 6, 6))
        scene.fill("C", c + np.stack([rr * np.cos(a), rr * np.sin(a)], 1), 2.2, 1.2, "mid")
    hull = cv2.convexHull(p.astype(np.float32)).reshape(-1, 2).astype(np.float64)
    c = hull.mean(0)
    return c + (hull - c) * 1.08 + np.sign(hull - c) * scene.px(2.0)



def calcified_membrane(scene: Scene, rng: np.random.Generator, cell: np.ndarray) -> None:
    """Calcium along 25-70 % of one adipocyte's membrane (`cell`, its outline in px), 1-2.5 um thick."""
    px = scene.px
    m = len(cell)
    j0, span = int(rng.integers(m)), int(m * rng.uniform(0.25, 0.7))
    arc = cell[(j0 + np.arange(span)) % m]
    thick = px(rng.uniform(1.2, 2.5))
    scene.line("C", arc, 2.3, thick, slope=1.2, src="mid")
    g = arc[rng.integers(0, len(arc), len(arc))] + rng.normal(0, thick, (len(arc), 2))
    granules(scene, rng, g[:, 0], g[:, 1], r_um=(0.6, 1.8))
    scene.lesions.append(("extravascular_calcification", stroke_outline(arc, thick + px(5))))


def calcified_fibres(scene: Scene, rng: np.random.Generator, c: np.ndarray, r: float) -> None:
    """A cluster of calcified, fragmented elastic fibres around `c` (spread r / 2 px; pseudoxanthoma-elasticum-
    like change): 8-25 curly basophilic fibres 10-35 um long, 1-2 um thick; one lesion polygon (hull + 5 um)."""
    px = scene.px
    ends = []
    for _ in range(int(rng.integers(8, 26))):
        p0 = c + rng.normal(0, r / 2, 2)
        n = int(rng.integers(4, 9))
        head = rng.uniform(0, TWO_PI) + np.cumsum(rng.normal(0, 0.6, n))
        step = px(rng.uniform(10, 35)) / n
        pts = p0 + np.concatenate([[[0, 0]], np.cumsum(step * np.stack([np.cos(head), np.sin(head)], 1), 0)])
        thick = px(rng.uniform(1.0, 2.0))
        scene.line("C", pts, 2.2, thick, slope=1.2, src="mid")
        g = pts[rng.integers(0, len(pts), n)] + rng.normal(0, thick, (n, 2))
        granules(scene, rng, g[:, 0], g[:, 1], r_um=(0.5, 1.2))
        ends.append(pts)
    hull = cv2.convexHull(np.concatenate(ends).astype(np.float32)).reshape(-1, 2).astype(np.float64)
    m = hull.mean(0)
    d = np.linalg.norm(hull - m, axis=1, keepdims=True)
    scene.lesions.append(("extravascular_calcification", m + (hull - m) * (1 + px(5.0) / np.maximum(d, 1e-6))))


def necrosis(scene: Scene, rng: np.random.Generator, c: np.ndarray, r: float, in_fat: bool) -> None:
    """A necrotic focus of radius r px at c: nuclear dust, histiocytes (foamy in fat) and neutrophils; in the
    dermis (not in_fat) also smudged hypereosinophilic collagen with a feathered edge (ischaemic necrosis)."""
    px = scene.px
    area = math.pi * r * r
    th = np.linspace(0, TWO_PI, 40, endpoint=False)
    rr = r * (1 + 0.08 * np.sin(3 * th + rng.uniform(0, TWO_PI)))
    poly = np.stack([c[0] + rr * np.cos(th), c[1] + rr * np.sin(th)], 1)
    if not in_fat:  # ischaemic dermal necrosis: smudged hypereosinophilic collagen, feathered edge
        for k, (e, slope) in enumerate(((0.62, 0.6), (0.7, 0.5), (0.78, 0.4))):
            ring_k = c + (poly - c) * (1 - 0.12 * k)
            scene.fill("E", ring_k, e, slope, "coll")
            scene.fill("H", ring_k, 0.13)
    pts = points_in_poly(rng, poly, int(area / px(14) ** 2))
    nuclear_dust(scene, rng, pts[:, 0], pts[:, 1])
    pts = points_in_poly(rng, poly, int(area / px(45) ** 2))
    histiocytes(scene, rng, pts[:, 0], pts[:, 1], foamy=in_fat)
    pts = points_in_poly(rng, poly, int(area / px(55) ** 2))
    neutrophils(scene, rng, pts[:, 0], pts[:, 1])
    scene.lesions.append(("necrosis", poly))
