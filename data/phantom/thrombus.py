"""Intraluminal thrombus in the appearances it has on H&E (style "random"; looks.THROMBUS_LOOKS):

- ``fresh``: red-cell rich, cells packed and merged into a red mass, fine fibrin strands, a few neutrophils;
- ``layered``: lines of Zahn, curved alternating laminae (8-25 um) of pale fibrin-platelet and dark red cells;
- ``fibrin``: pale-pink homogeneous fibrin and platelets, finely granular, few red cells;
- ``organising``: loose pale connective tissue with spindle fibroblasts and 1-4 recanalised channels lined by
  endothelium, often pulled away from the wall.

Each fills (or, mural, partly fills) the lumen and appends its polygon as a ``thrombosis`` lesion.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from calciscope.data.phantom.cells import histiocytes, neutrophils, points_in_poly, rbcs, spindles
from calciscope.data.phantom.geometry import TWO_PI, Vessel, clip_halfplane
from calciscope.data.phantom.raster import Scene


def thrombus(scene: Scene, rng, v: Vessel, lumen: np.ndarray, look: dict, kind: str) -> None:
    """Draw a thrombus of `kind` in the lumen outline (px) and record it."""
    c = lumen.mean(0)
    shrink = rng.uniform(0.8, 0.92) if kind == "organising" and rng.random() < 0.6 else (
        0.92 if rng.random() < 0.3 else 1.0)
    poly = c + (lumen - c) * shrink  # retraction gap
    if rng.random() < 0.35:  # mural, non-occlusive
        nrm = np.array([math.cos(a := rng.uniform(0, TWO_PI)), math.sin(a)])
        proj = poly @ nrm
        poly = clip_halfplane(poly, nrm, proj.min() + rng.uniform(0.15, 0.5) * (proj.max() - proj.min()))
    if len(poly) < 3:
        return
    area = float(cv2.contourArea(poly.astype(np.float32)))
    {"fresh": _fresh, "layered": _layered, "fibrin": _fibrin, "organising": _organising}[kind](
        scene, rng, poly, area, look)
    scene.lesions.append(("thrombosis", poly, {"appearance": kind}))


def _strands(scene: Scene, rng, poly, n: int, value: float) -> None:
    """Wavy fibrin threads 0.6-1.2 um thick across the thrombus."""
    px = scene.px
    lo, hi = poly.min(0), poly.max(0)
    for _ in range(n):
        p0 = lo + rng.random(2) * (hi - lo)
        head = rng.uniform(0, TWO_PI) + np.cumsum(rng.normal(0, 0.35, 6))
        pts = p0 + np.concatenate([[[0, 0]], np.cumsum(px(rng.uniform(3, 7)) * np.stack([np.cos(head),
                                                                                           np.sin(head)], 1), 0)])
        inside = np.array([cv2.pointPolygonTest(poly.astype(np.float32), (float(x), float(y)), False) > 0
                           for x, y in pts])
        if inside.sum() >= 2:
            scene.line("E", pts[inside], value, px(rng.uniform(0.6, 1.2)))


def _fresh(scene: Scene, rng, poly, area, look) -> None:
    rv = look["rbc_value"]
    scene.fill("E", poly, 0.85 * rv, 0.4, "mid")
    scene.fill("H", poly, 0.06)
    rbc_r = scene.px(3.7)
    pts = points_in_poly(rng, poly, int(area / rbc_r**2 * rng.uniform(0.6, 1.0)))
    rbcs(scene, rng, pts[:, 0], pts[:, 1], value=(0.85 * rv, 1.05 * rv))
    _strands(scene, rng, poly, int(area / scene.px(15.0) ** 2) + 2, look["fibrin_value"] * 1.1)
    pts = points_in_poly(rng, poly, int(area / scene.px(rng.uniform(25, 45)) ** 2) + 1)
    neutrophils(scene, rng, pts[:, 0], pts[:, 1])


def _layered(scene: Scene, rng, poly, area, look) -> None:
    """Laminae curved about a centre outside the thrombus (the direction of flow)."""
    px, fv = scene.px, look["fibrin_value"]
    scene.fill("E", poly, fv, 0.8, "mid")
    scene.fill("H", poly, 0.14)
    c = poly.mean(0)
    size = float(np.ptp(poly, 0).max())
    a = rng.uniform(0, TWO_PI)
    centre = c + (size * rng.uniform(0.8, 3.0)) * np.array([math.cos(a), math.sin(a)])
    lam = px(rng.uniform(8, 25))
    duty = rng.uniform(0.35, 0.65)
    rbc_r = px(3.7)
    pts = points_in_poly(rng, poly, int(area / rbc_r**2 * 0.9))
    if len(pts):
        phase = (np.hypot(*(pts - centre).T) / lam + rng.uniform(0, 1)) % 1.0
        keep = rng.random(len(pts)) < np.where(phase < duty, 0.9, 0.05)
        rbcs(scene, rng, pts[keep, 0], pts[keep, 1], value=(0.9 * look["rbc_value"], 1.1 * look["rbc_value"]))
    pts = points_in_poly(rng, poly, int(area / px(30.0) ** 2) + 1)
    neutrophils(scene, rng, pts[:, 0], pts[:, 1])


def _fibrin(scene: Scene, rng, poly, area, look) -> None:
    scene.fill("E", poly, look["fibrin_value"] * rng.uniform(0.9, 1.2), 1.0, "mid")
    scene.fill("H", poly, rng.uniform(0.12, 0.25), 0.2, "mid")  # platelets: a faint violet granularity
    pts = points_in_poly(rng, poly, int(area / scene.px(3.7) ** 2 * rng.uniform(0.03, 0.12)))
    rbcs(scene, rng, pts[:, 0], pts[:, 1], value=(0.9 * look["rbc_value"], 1.1 * look["rbc_value"]))
    pts = points_in_poly(rng, poly, int(area / scene.px(35.0) ** 2) + 1)
    neutrophils(scene, rng, pts[:, 0], pts[:, 1])
    _strands(scene, rng, poly, int(area / scene.px(20.0) ** 2) + 1, look["fibrin_value"] * 1.3)


def _organising(scene: Scene, rng, poly, area, look) -> None:
    px = scene.px
    scene.fill("E", poly, rng.uniform(0.45, 0.75), 0.7, "coll")
    scene.fill("H", poly, rng.uniform(0.1, 0.18))
    pts = points_in_poly(rng, poly, int(area / px(rng.uniform(9, 14)) ** 2) + 1)
    spindles(scene, rng, pts[:, 0], pts[:, 1], rng.uniform(0, 180, len(pts)), (1.0, 1.5))
    pts = points_in_poly(rng, poly, int(area / px(40.0) ** 2) + 1)
    histiocytes(scene, rng, pts[:, 0], pts[:, 1])
    centres = points_in_poly(rng, poly, int(rng.integers(1, 5)))
    for cx, cy in centres:  # recanalised channels: small lumens with endothelium and a red cell or two
        r = px(rng.uniform(2.5, 6.0))
        th = np.linspace(0, TWO_PI, 16, endpoint=False)
        ch = np.stack([cx + r * np.cos(th), cy + r * rng.uniform(0.6, 1.0) * np.sin(th)], 1)
        scene.fill("E", ch, 0.03)
        scene.fill("H", ch, 0.0)
        k = int(rng.integers(2, 5))
        t = rng.uniform(0, TWO_PI, k)
        scene.ellipses("nuc", cx + r * np.cos(t), cy + r * np.sin(t), px(3.0), px(0.9), np.degrees(t) + 90, 1.7)
        if rng.random() < 0.5:
            rbcs(scene, rng, [cx], [cy], value=(0.9 * look["rbc_value"], 1.1 * look["rbc_value"]))
