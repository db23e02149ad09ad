"""Plane geometry of the phantom: polygon helpers and the Vessel cross-section (outline as a function of angle).

All coordinates and radii are level-0 px; angles in radians unless a name says _deg.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

TWO_PI = 2.0 * math.pi


def chaikin(poly: np.ndarray) -> np.ndarray:
    """One round of corner cutting on a closed polygon (rounds adipocyte corners)."""
    nxt = np.roll(poly, -1, axis=0)
    return np.stack([0.75 * poly + 0.25 * nxt, 0.25 * poly + 0.75 * nxt], 1).reshape(-1, 2)


def clip_halfplane(poly: np.ndarray, normal: np.ndarray, c: float) -> np.ndarray:
    """Sutherland-Hodgman: the part of a closed polygon where dot(p, normal) >= c."""
    out = []
    d = poly @ normal - c
    n = len(poly)
    for i in range(n):
        j = (i + 1) % n
        if d[i] >= 0:
            out.append(poly[i])
        if (d[i] >= 0) != (d[j] >= 0):
            t = d[i] / (d[i] - d[j])
            out.append(poly[i] + t * (poly[j] - poly[i]))
    return np.asarray(out, dtype=np.float64).reshape(-1, 2)


def stroke_outline(pts: np.ndarray, width: float) -> np.ndarray:
    """Polygon around a polyline drawn `width` px thick (for artifact GeoJSON)."""
    d = np.gradient(pts, axis=0)
    nrm = np.stack([-d[:, 1], d[:, 0]], 1)
    nrm /= np.linalg.norm(nrm, axis=1, keepdims=True) + 1e-9
    return np.concatenate([pts + nrm * width / 2, (pts - nrm * width / 2)[::-1]])


@dataclass
class Vessel:
    """One vessel cross-section; radii in level-0 px; the outline is an ellipse with a few harmonics."""

    vid: int
    kind: str
    compartment: str
    cx: float
    cy: float
    ro: float  # outer radius (adventitia)
    rl: float  # lumen radius
    aspect: float
    angle: float
    harm: np.ndarray  # (K, 2): amplitude, phase of harmonics k = 2..K+1
    findings: list[str] = field(default_factory=list)
    rl_eff: float = 0.0  # lumen after intimal narrowing
    cuff: float = 0.0  # perivascular infiltrate width (vasculitis / lymphocytic cuff), px
    lumen: np.ndarray | None = None  # the drawn lumen outline (N, 2) px, set by draw_vessel
    calc_arc: tuple[float, float, float, float] | None = None  # calcified arc: th0, span (rad), r_in, r_out px
    looks: dict[str, str] = field(default_factory=dict)  # style "random": finding (or "confounder") -> appearance

    def rho(self, th: np.ndarray) -> np.ndarray:
        r = np.ones_like(th)
        for k, (a, p) in enumerate(self.harm, start=2):
            r += a * np.cos(k * th + p)
        return r

    def xy(self, r: np.ndarray | float, th: np.ndarray) -> np.ndarray:
        th = np.asarray(th, np.float64)
        rr = np.asarray(r, np.float64) * self.rho(th)
        x, y = rr * np.cos(th), rr * np.sin(th) * self.aspect
        ca, sa = math.cos(self.angle), math.sin(self.angle)
        return np.stack([self.cx + x * ca - y * sa, self.cy + x * sa + y * ca], -1)

    def tangent_deg(self, th: np.ndarray) -> np.ndarray:
        return np.degrees(np.arctan2(np.cos(th) * self.aspect, -np.sin(th)) + self.angle)

    def ring(self, r: float, th0: float = 0.0, th1: float = TWO_PI) -> np.ndarray:
        n = int(np.clip(r * abs(th1 - th0) / 3.0, 20, 240))
        full = abs(th1 - th0) >= TWO_PI - 1e-6
        th = np.linspace(th0, th1, n, endpoint=not full)
        return self.xy(r, th)

    def band(self, r_in: float, r_out: float, th0: float, th1: float) -> np.ndarray:
        return np.concatenate([self.ring(r_out, th0, th1), self.ring(r_in, th0, th1)[::-1]])

