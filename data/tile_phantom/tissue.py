"""The second renderer's tissue: background (fat, dermis, septum), one vessel as a warped signed-distance field,
and what its wall and lumen carry. Everything here is drawn per pixel from distance fields and value noise (the
phantom draws vector polygons instead); lengths are um.

Findings (each with its own shapes here): calcium as noise-thresholded deposits in a sector of the media, cut by
Voronoi cracks, or a dark crust over the whole thin wall of a small vessel; thrombus as a swirl of fibrin streaks
with clumped red cells; vasculitis as clustered (Neyman-Scott) neutrophils, dust and lymphocytes in and around a
wall smudged by fibrinoid. Confounders: a lymphocyte cuff outside an intact wall, a lumen packed with red cells, a
glassy hyalinised wall, basophilic debris away from the vessel.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from scipy import ndimage

from calciscope.data.tile_phantom.canvas import Canvas, dust, lymphocyte, neutrophil, red_cell, spindle, value_noise


# ----------------------------------------------------------------------------------------------- background
def background(cv: Canvas, kind: str) -> None:
    """Fat (adipocytes 45-120 um, membranes ~1.5 um), dermis (collagen bundles with clefts) or a septum."""
    rng = cv.rng
    if kind in ("fat", "septum"):
        spacing = cv.px(rng.uniform(45, 120))
        k = max(int((cv.n / spacing) ** 2 * 1.3), 2)
        seeds = np.ones((cv.n, cv.n), bool)
        seeds[rng.integers(0, cv.n, k), rng.integers(0, cv.n, k)] = False
        _, (iy, ix) = ndimage.distance_transform_edt(seeds, return_indices=True)
        label = iy * cv.n + ix
        edge = np.zeros_like(seeds)
        edge[:, 1:] |= label[:, 1:] != label[:, :-1]
        edge[1:, :] |= label[1:, :] != label[:-1, :]
        edge = cv2.dilate(edge.astype(np.uint8), np.ones((2, 2), np.uint8)).astype(np.float32)
        cv.add("eosin", edge, rng.uniform(0.5, 0.9))
        if kind == "fat":
            return
        angle, width = rng.uniform(0, np.pi), rng.uniform(15, 45)
        dist = np.abs((cv.X - cv.X.mean()) * math.sin(angle) - (cv.Y - cv.Y.mean()) * math.cos(angle)
                      + rng.uniform(-20, 20))
        band = (dist < width).astype(np.float32)
        cv.dens["eosin"][band > 0] = 0
        cv.add("eosin", band * (0.5 + 0.4 * _streaks(cv, np.degrees(angle))))
        _scatter_spindles(cv, band, np.degrees(angle), 22.0)
        return
    angle = rng.uniform(0, 180)
    cv.add("eosin", 0.25 + 0.75 * _streaks(cv, angle))
    _scatter_spindles(cv, np.ones((cv.n, cv.n), np.float32), angle, 26.0)


def _streaks(cv: Canvas, angle_deg: float) -> np.ndarray:
    """Collagen bundles in [0, 1]: noise stretched ~6x along angle_deg, thresholded softly into bands and clefts."""
    n = cv.n
    big = int(n * 1.5)
    raw = value_noise(cv.rng, big, cv.px(3.0), octaves=2)
    raw = cv2.resize(cv2.resize(raw, (big // 6, big)), (big, big), interpolation=cv2.INTER_CUBIC)
    rot = cv2.getRotationMatrix2D((big / 2, big / 2), angle_deg + 90, 1.0)
    raw = cv2.warpAffine(raw, rot, (big, big), borderMode=cv2.BORDER_REFLECT)
    off = (big - n) // 2
    raw = raw[off:off + n, off:off + n]
    return 1 / (1 + np.exp(-6 * (raw + cv.rng.uniform(-0.1, 0.25))))


def _scatter_spindles(cv: Canvas, where: np.ndarray, angle_deg: float, spacing_um: float) -> None:
    k = int(where.sum() * cv.um_per_px**2 / spacing_um**2)
    ys, xs = np.nonzero(where > 0.5)
    if not len(xs):
        return
    for j in cv.rng.integers(0, len(xs), k):
        spindle(cv, (xs[j] + 0.5) * cv.um_per_px, (ys[j] + 0.5) * cv.um_per_px, angle_deg + cv.rng.normal(0, 15))


# ----------------------------------------------------------------------------------------------- the vessel
class VesselField:
    """Signed distance (um, negative inside) to a warped elliptic outer wall; the wall is ``wall_um`` thick."""

    def __init__(self, cv: Canvas, cx: float, cy: float, radius_um: float, wall_um: float):
        rng = cv.rng
        self.cx, self.cy, self.r, self.wall = cx, cy, radius_um, wall_um
        a, b = radius_um, radius_um * rng.uniform(0.55, 1.0)
        t = rng.uniform(0, np.pi)
        dx, dy = cv.X - cx, cv.Y - cy
        u, v = dx * math.cos(t) + dy * math.sin(t), -dx * math.sin(t) + dy * math.cos(t)
        rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        warp = value_noise(rng, cv.n, cv.px(max(radius_um, 8.0)), octaves=2) * 0.1 * radius_um
        self.sdf = (rho - 1) * math.sqrt(a * b) + warp
        self.theta = np.arctan2(dy, dx)

    def band(self, d0: float, d1: float) -> np.ndarray:
        """Pixels with signed distance in [d0, d1)."""
        return ((self.sdf >= d0) & (self.sdf < d1)).astype(np.float32)

    def points(self, rng, d0: float, d1: float, k: int) -> np.ndarray:
        ys, xs = np.nonzero((self.sdf >= d0) & (self.sdf < d1))
        if not len(xs) or k <= 0:
            return np.zeros((0, 2))
        j = rng.integers(0, len(xs), k)
        return np.stack([xs[j], ys[j]], 1) + rng.random((k, 2))


def vessel(cv: Canvas, vf: VesselField, kind: str, *, hyaline: bool = False) -> None:
    """Clear the vessel's area, then paint its collar, wall (muscular media for arterioles), endothelium."""
    rng, w = cv.rng, vf.wall
    inside = vf.band(-1e9, 0.0)
    collar = vf.band(0.0, rng.uniform(4, 14))
    for layer in cv.dens.values():
        layer *= 1 - np.clip(inside + collar, 0, 1)
    cv.add("eosin", collar, rng.uniform(0.35, 0.6))
    wall = vf.band(-w, 0.0)
    if kind == "arteriole":
        rings = 0.5 + 0.5 * np.cos(2 * np.pi * vf.sdf / rng.uniform(2.5, 4.0))
        cv.add("eosin", wall * ((1.1 if hyaline else 0.7) + (0.05 if hyaline else 0.25) * rings))
        cv.add("eosin", vf.band(-w - 0.8, -w + 0.6), 0.9)  # internal elastic lamina
        k = int(wall.sum() * cv.um_per_px**2 / (60.0 if not hyaline else 200.0))
        for x, y in vf.points(rng, -w + 1.0, -0.25 * w, k) * cv.um_per_px:
            spindle(cv, x, y, math.degrees(math.atan2(y - vf.cy, x - vf.cx)) + 90 + rng.normal(0, 10))
    else:
        cv.add("eosin", wall, rng.uniform(0.45, 0.8))
    lumen_edge = vf.points(rng, -w - 0.9, -w - 0.3, max(int(2 * np.pi * max(vf.r - w, 2) / 14), 1))
    for x, y in lumen_edge * cv.um_per_px:
        ang = math.degrees(math.atan2(y - vf.cy, x - vf.cx)) + 90
        cv.disc("haem", x, y, rng.uniform(3.0, 4.5), 0.9, ang, rng.uniform(1.3, 1.8))


def red_cells_in_lumen(cv: Canvas, vf: VesselField, fraction: float) -> None:
    area = float(vf.band(-1e9, -vf.wall).sum()) * cv.um_per_px**2
    for x, y in vf.points(cv.rng, -1e9, -vf.wall - 2.5, int(fraction * area / 40.0)) * cv.um_per_px:
        red_cell(cv, x, y, cv.rng.uniform(1.3, 1.9))


# ----------------------------------------------------------------------------------------------- findings
def calcium_media(cv: Canvas, vf: VesselField) -> str:
    """Deposits in a sector (120-360 deg) of the media: thresholded noise blobs (2-6 um), sometimes a fused
    crust cut by Voronoi cracks. Returns the appearance."""
    rng, w = cv.rng, vf.wall
    span = rng.uniform(2.1, 2 * np.pi)
    start = rng.uniform(-np.pi, np.pi)
    sector = (((vf.theta - start) % (2 * np.pi)) < span).astype(np.float32)
    media = vf.band(-w + 0.5, -rng.uniform(0.15, 0.5) * w) * sector
    crust = rng.random() < 0.5
    blobs = value_noise(rng, cv.n, cv.px(rng.uniform(2, 6)), octaves=2)
    mask = media * (1.0 if crust else (blobs > rng.uniform(-0.1, 0.3)).astype(np.float32))
    if crust:
        k = max(int(mask.sum() * cv.um_per_px**2 / rng.uniform(60, 200)), 2)
        seeds = np.ones_like(mask, bool)
        seeds[rng.integers(0, cv.n, k * 20), rng.integers(0, cv.n, k * 20)] = False
        dist = ndimage.distance_transform_edt(seeds)
        cracks = (cv2.Laplacian(dist.astype(np.float32), cv2.CV_32F) < -0.6).astype(np.float32)
        mask = mask * (1 - cracks)
    cv.add("calcium", mask * (1.6 + 0.8 * blobs), rng.uniform(0.9, 1.5))
    return "crust" if crust else "blobs"


def calcium_small_vessel(cv: Canvas, vf: VesselField) -> str:
    """The whole thin wall of a 10-35 um vessel crusted dark, with a granular rim (or only granules)."""
    rng = cv.rng
    ring = vf.band(-vf.wall - 0.5, 0.3)
    grains = value_noise(rng, cv.n, cv.px(1.5), octaves=1)
    if rng.random() < 0.6:
        cv.add("calcium", ring * (1.8 + 0.6 * grains), rng.uniform(0.9, 1.4))
        look = "crust"
    else:
        look = "grains"
    for x, y in vf.points(rng, -vf.wall, 2.5, int(rng.integers(8, 30))) * cv.um_per_px:
        r = rng.uniform(0.5, 1.4)
        cv.disc("calcium", x, y, r, r, 0, rng.uniform(1.8, 2.8))
    return look


def thrombus(cv: Canvas, vf: VesselField) -> str:
    """Fibrin streaks swirling about the lumen's centre, with red cells clumped in the streaks' gaps."""
    rng = cv.rng
    lumen = vf.band(-1e9, -vf.wall)
    rbc_rich = rng.random() < 0.5
    swirl = np.sin(vf.theta * rng.integers(1, 4) + vf.sdf / rng.uniform(2, 5)
                   + value_noise(rng, cv.n, cv.px(6), octaves=2) * 2.5)
    cv.add("fibrin", lumen * (0.9 + 0.5 * (swirl > 0.2)), rng.uniform(0.7, 1.2) * (0.7 if rbc_rich else 1.0))
    area = float(lumen.sum()) * cv.um_per_px**2
    pts = vf.points(rng, -1e9, -vf.wall - 2.0, int(area / 40.0 * (0.9 if rbc_rich else 0.35)))
    for x, y in pts * cv.um_per_px:
        red_cell(cv, x, y, rng.uniform(1.1, 1.7))
    for x, y in vf.points(rng, -1e9, -vf.wall - 2.0, int(area / 600) + 1) * cv.um_per_px:
        neutrophil(cv, x, y)
    return "red" if rbc_rich else "fibrin"


def vasculitis(cv: Canvas, vf: VesselField) -> str:
    """Clusters of neutrophils, dust and lymphocytes centred in the wall and up to ~25 um around it; the wall
    smudged pink in patches (fibrinoid)."""
    rng = cv.rng
    smudge = vf.band(-vf.wall, 0.5) * (value_noise(rng, cv.n, cv.px(8), 1) > rng.uniform(-0.5, 0.3))
    cv.add("fibrin", smudge, rng.uniform(0.8, 1.5))
    parents = vf.points(rng, -vf.wall, rng.uniform(6, 20), int(rng.integers(4, 10))) * cv.um_per_px
    lymph = rng.random() < 0.3
    for px_, py_ in parents:
        for _ in range(int(rng.integers(5, 16))):
            x, y = px_ + rng.normal(0, 6), py_ + rng.normal(0, 6)
            u = rng.random()
            if u < (0.6 if lymph else 0.15):
                lymphocyte(cv, x, y)
            elif u < 0.7:
                neutrophil(cv, x, y)
            else:
                for _ in range(3):
                    dust(cv, x + rng.normal(0, 2), y + rng.normal(0, 2))
    return "lymphocytic" if lymph else "neutrophilic"


def cuff(cv: Canvas, vf: VesselField) -> None:
    """Confounder: lymphocytes 3-20 um outside an intact wall."""
    for x, y in vf.points(cv.rng, 3.0, cv.rng.uniform(10, 20), int(cv.rng.integers(15, 50))) * cv.um_per_px:
        lymphocyte(cv, x, y)


def debris(cv: Canvas, away_from: VesselField | None) -> None:
    """Confounder: a cluster (10-35 um) of basophilic granules, away from the vessel."""
    rng = cv.rng
    far = np.ones((cv.n, cv.n), bool) if away_from is None else away_from.sdf > 15
    ys, xs = np.nonzero(far)
    if not len(xs):
        return
    j = int(rng.integers(len(xs)))
    cx, cy = (xs[j] + 0.5) * cv.um_per_px, (ys[j] + 0.5) * cv.um_per_px
    spread = rng.uniform(5, 17)
    for _ in range(int(rng.integers(15, 60))):
        r = rng.uniform(0.4, 1.8)
        cv.disc("calcium", cx + rng.normal(0, spread), cy + rng.normal(0, spread), r, r, 0, rng.uniform(1.5, 2.6))
