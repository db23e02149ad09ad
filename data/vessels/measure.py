"""Vessel size in µm from outlines: diameters, wall thickness and area.

"The" diameter of a vessel (outer or lumen) is the **minor axis** of the ellipse cv2.fitEllipse fits to its
outline: a vessel cut obliquely shows an ellipse whose short axis is the true calibre, which is what a
pathologist measures. The major axis and the equivalent-circle diameter (ECD, from cv2.contourArea) are
reported next to it. Wall thickness = (outer diameter − lumen diameter) / 2, both minor axes.
Polygons are (N, 2) level-0 (x, y) pixels; ``mpp`` is the slide's µm per level-0 pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from calciscope.data.vessels.frames import mask_px_to_level0


@dataclass(frozen=True)
class Shape:
    """Size of one closed outline, in µm / µm²."""

    area_um2: float
    ecd_um: float  # diameter of the circle with the same area
    major_um: float  # fitted-ellipse major axis
    minor_um: float  # fitted-ellipse minor axis: "the" diameter

    @property
    def diameter_um(self) -> float:
        return self.minor_um


@dataclass(frozen=True)
class VesselGeometry:
    """Outer and (when known) lumen shape of one vessel; diameters are minor axes, in µm."""

    outer: Shape
    lumen: Shape | None = None

    @property
    def outer_diameter_um(self) -> float:
        return self.outer.diameter_um

    @property
    def lumen_diameter_um(self) -> float | None:
        return None if self.lumen is None else self.lumen.diameter_um

    @property
    def wall_thickness_um(self) -> float | None:
        return None if self.lumen is None else max(self.outer.diameter_um - self.lumen.diameter_um, 0.0) / 2

    @property
    def area_um2(self) -> float:
        """Area inside the outer wall, lumen included."""
        return self.outer.area_um2


def shape_of(polygon: np.ndarray, mpp: float) -> Shape:
    """Area, ECD and ellipse axes of a level-0 polygon (≥ 3 points); fewer than 5 points use cv2.minAreaRect."""
    pts = np.asarray(polygon, np.float32).reshape(-1, 2)
    if len(pts) < 3 or mpp <= 0:
        raise ValueError(f"need a polygon of >= 3 points and mpp > 0, got {len(pts)} points, mpp={mpp}")
    area_px = float(cv2.contourArea(pts))
    if len(pts) >= 5:
        _, axes, _ = cv2.fitEllipse(pts)
    else:
        _, axes, _ = cv2.minAreaRect(pts)
    major, minor = max(axes), min(axes)
    return Shape(area_um2=area_px * mpp**2, ecd_um=2 * math.sqrt(area_px / math.pi) * mpp,
                 major_um=float(major) * mpp, minor_um=float(minor) * mpp)


def measure_vessel(outer: np.ndarray, mpp: float, lumen: np.ndarray | None = None) -> VesselGeometry:
    """Geometry of a vessel from its outer polygon and, optionally, its lumen polygon (both level-0 px)."""
    return VesselGeometry(shape_of(outer, mpp), None if lumen is None else shape_of(lumen, mpp))


def measure_vessel_mask(wall: np.ndarray, mpp: float, downsample: float = 1.0,
                        origin_xy: tuple[float, float] = (0.0, 0.0)) -> VesselGeometry | None:
    """Geometry of the largest vessel in a binary crop where nonzero = wall (lumen and outside = 0).

    ``wall`` is at ``downsample`` of level 0 with its top-left pixel at level-0 ``origin_xy``. The outer
    outline is the wall's largest external contour; the lumen is the largest hole inside it (None if closed).
    Returns None when the crop holds no wall.
    """
    outer, lumen = outer_and_lumen(wall)
    if outer is None:
        return None
    to0 = lambda c: mask_px_to_level0(c, downsample, origin_xy)  # noqa: E731
    return measure_vessel(to0(outer), mpp, None if lumen is None else to0(lumen))


def outer_and_lumen(wall: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(largest external contour, its largest hole) of a binary mask, as (N, 2) pixel-centre arrays."""
    contours, hierarchy = cv2.findContours((np.asarray(wall) > 0).astype(np.uint8), cv2.RETR_CCOMP,
                                           cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None, None
    hierarchy = hierarchy[0]
    outers = [i for i, h in enumerate(hierarchy) if h[3] < 0 and len(contours[i]) >= 3]
    if not outers:
        return None, None
    best = max(outers, key=lambda i: cv2.contourArea(contours[i]))
    holes = [i for i, h in enumerate(hierarchy) if h[3] == best and len(contours[i]) >= 3]
    lumen = max(holes, key=lambda i: cv2.contourArea(contours[i]), default=None)
    return contours[best].reshape(-1, 2), None if lumen is None else contours[lumen].reshape(-1, 2)

