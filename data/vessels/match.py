"""Detected vessel polygons vs true ones: one-to-one matching, recall, precision, size error.

A true vessel is found when a detection, in a one-to-one (Hungarian) matching, overlaps it at IoU ≥ 0.5 or, for
true vessels under ``SMALL_UM`` (20 µm minor axis), has its centroid within ``CENTROID_UM`` (4 µm): IoU is a harsh
bar for point-like objects (a 1 µm error in radius puts a 5 µm capillary at IoU 0.36), and the field matches small
objects by centroid distance (MONKEY 2024: 4 µm for lymphocytes; HoVer-Net: 12 px at 0.25 µm/px; MITOS 2012: 8 µm).
The assignment maximises the number of matches first, then their total IoU. ``MatchResult.recall_iou`` is the
IoU-only recall (the earlier criterion), reported beside it.

IoU is computed by rasterising both polygons on a shared local canvas (their joint bounding box, sampled so
the longer side is CANVAS_PX cells, sub-pixel vertices via cv2.fillPoly's ``shift``). Polygons are (N, 2) level-0
(x, y) px.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from scipy.optimize import linear_sum_assignment

from calciscope.data.vessels.measure import shape_of

CANVAS_PX = 128
SMALL_UM = 20.0  # true vessels under this minor-axis diameter may also be found by centroid distance ...
CENTROID_UM = 4.0  # ... within this many µm
# a vessel "touches" a calcium artifact (a hole, tear or chatter where calcium was cut) this close: training's
# artifact targets and evaluate's artifact QC share it
ARTIFACT_TOUCH_UM = 5.0
_SHIFT = 4  # fillPoly fractional bits


@dataclass(frozen=True)
class MatchResult:
    """Matching summary. ``pairs`` are (detected index, true index, IoU); errors are relative (fractions)."""

    pairs: list[tuple[int, int, float]]
    n_detected: int
    n_true: int
    diameter_errors: list[float]  # |d_det − d_true| / d_true per pair, same order as pairs
    n_pairs_iou: int = 0  # matches of an IoU-only matching (IoU ≥ the threshold, no centroid rule)

    @property
    def recall(self) -> float:
        return len(self.pairs) / self.n_true if self.n_true else float("nan")

    @property
    def precision(self) -> float:
        return len(self.pairs) / self.n_detected if self.n_detected else float("nan")

    @property
    def recall_iou(self) -> float:
        """Recall under IoU alone (the criterion before small vessels could match by centroid)."""
        return self.n_pairs_iou / self.n_true if self.n_true else float("nan")

    @property
    def median_diameter_error(self) -> float:
        return float(np.median(self.diameter_errors)) if self.diameter_errors else float("nan")

    @property
    def count_error(self) -> float:
        """(detected − true) / true: +0.1 means 10 % too many vessels."""
        return (self.n_detected - self.n_true) / self.n_true if self.n_true else float("nan")


def polygon_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two level-0 polygons, rasterised on their joint bounding box."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    lo = np.minimum(a.min(0), b.min(0))
    hi = np.maximum(a.max(0), b.max(0))
    step = max(float((hi - lo).max()), 1e-6) / (CANVAS_PX - 2)
    shape = tuple(int(np.ceil(s / step)) + 2 for s in (hi - lo)[::-1])  # (h, w)
    ma, mb = (_fill(p, lo, step, shape) for p in (a, b))
    union = np.count_nonzero(ma | mb)
    return np.count_nonzero(ma & mb) / union if union else 0.0


def iou_matrix(detected: Sequence[np.ndarray], truth: Sequence[np.ndarray]) -> np.ndarray:
    """(n_detected, n_true) IoU; pairs whose bounding boxes do not overlap are 0 without rasterising."""
    boxes_d = [_box(p) for p in detected]
    boxes_t = [_box(p) for p in truth]
    out = np.zeros((len(detected), len(truth)))
    for i, bd in enumerate(boxes_d):
        for j, bt in enumerate(boxes_t):
            if bd[0] < bt[2] and bt[0] < bd[2] and bd[1] < bt[3] and bt[1] < bd[3]:
                out[i, j] = polygon_iou(detected[i], truth[j])
    return out


def match_vessels(detected: Sequence[np.ndarray], truth: Sequence[np.ndarray], mpp: float,
                  iou_threshold: float = 0.5, true_diameters_um: Sequence[float] | None = None, *,
                  small_um: float = SMALL_UM, centroid_um: float = CENTROID_UM) -> MatchResult:
    """Match detections to truth one-to-one (see the module docstring; ``centroid_um=0`` is IoU alone); diameter
    error compares measure.shape_of minor axes.

    ``true_diameters_um`` (one per true polygon) replaces the diameters measured on the true polygons,
    e.g. with annotated values; it must then be the same kind of diameter (minor axis) to be meaningful.
    """
    if true_diameters_um is not None and len(true_diameters_um) != len(truth):
        raise ValueError(f"{len(true_diameters_um)} true diameters for {len(truth)} true polygons")
    true_d = (np.asarray(true_diameters_um, np.float64) if true_diameters_um is not None
              else np.array([shape_of(t, mpp).diameter_um for t in truth]))
    iou = iou_matrix(detected, truth)
    by_iou = iou >= iou_threshold
    near = np.zeros_like(by_iou)
    if centroid_um > 0 and iou.size and (true_d < small_um).any():
        dist_um = np.linalg.norm(_centroids(detected)[:, None, :] - _centroids(truth)[None, :, :], axis=2) * mpp
        near = (dist_um <= centroid_um) & (true_d < small_um)[None, :]
    pairs = _assign(iou, by_iou | near)
    errors = [abs(shape_of(detected[i], mpp).diameter_um - true_d[j]) / true_d[j] for i, j, _ in pairs]
    n_iou = len(pairs) if not near.any() else len(_assign(iou, by_iou))
    return MatchResult(pairs=pairs, n_detected=len(detected), n_true=len(truth), diameter_errors=errors,
                       n_pairs_iou=n_iou)


def _assign(iou: np.ndarray, valid: np.ndarray) -> list[tuple[int, int, float]]:
    """(detected, true, IoU) of a one-to-one assignment of the ``valid`` pairs: as many as possible, then the most
    total IoU (a valid pair scores 2 + IoU, so one more match always outweighs any IoU)."""
    if not valid.any():
        return []
    rows, cols = linear_sum_assignment(np.where(valid, 2.0 + iou, 0.0), maximize=True)
    return [(int(i), int(j), float(iou[i, j])) for i, j in zip(rows, cols) if valid[i, j]]


def _centroids(polygons: Sequence[np.ndarray]) -> np.ndarray:
    """(N, 2) area centroids (level-0 px) of polygons (the vertex mean for a degenerate one)."""
    out = np.zeros((len(polygons), 2))
    for k, poly in enumerate(polygons):
        p = np.asarray(poly, np.float32).reshape(-1, 2)
        m = cv2.moments(p)
        out[k] = (m["m10"] / m["m00"], m["m01"] / m["m00"]) if m["m00"] > 0 else p.mean(axis=0)
    return out


def _fill(poly: np.ndarray, lo: np.ndarray, step: float, shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    pts = np.round(((poly - lo) / step + 1) * (1 << _SHIFT)).astype(np.int32)
    cv2.fillPoly(mask, [pts], 1, lineType=cv2.LINE_8, shift=_SHIFT)
    return mask.astype(bool)


def _box(poly: np.ndarray) -> tuple[float, float, float, float]:
    p = np.asarray(poly, np.float64)
    return (*p.min(0), *p.max(0))


def polygon_distance(a: np.ndarray, b: np.ndarray) -> float:
    """0 when the outlines overlap, else the smallest vertex-to-outline distance (level-0 px)."""
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    da = [cv2.pointPolygonTest(b32, (float(x), float(y)), True) for x, y in a[:: max(1, len(a) // 64)]]
    db = [cv2.pointPolygonTest(a32, (float(x), float(y)), True) for x, y in b[:: max(1, len(b) // 64)]]
    best = max(max(da), max(db))  # positive inside
    return 0.0 if best >= 0 else -best


def near_artifact(polygon: np.ndarray, regions: list[np.ndarray], mpp: float,
                  near_um: float = ARTIFACT_TOUCH_UM) -> bool:
    """Whether one of ``regions`` (level-0 outlines) comes within ``near_um`` of ``polygon`` (only outlines whose
    boxes come that near are measured)."""
    near = near_um / mpp
    lo, hi = polygon.min(axis=0) - near, polygon.max(axis=0) + near
    return any((r.max(axis=0) >= lo).all() and (r.min(axis=0) <= hi).all() and polygon_distance(polygon, r) <= near
               for r in regions)
