"""Vessel detection on a slide: the segmenter's maps cut into outlined, measured and placed vessels (no findings
yet). Training (the vessel classifier's crops) and inference (the vessel stage of ``predict``) both start here.

    segmenter (model.segmenter) → vessel and lumen maps → instances (data.vessels.instances) → outline, lumen,
    diameters, wall thickness (data.vessels.measure) → dermis or subcutaneous fat (data.vessels.compartment)

Size bands (outer diameter = minor axis, µm): ``capillary`` < 20, ``arteriole`` 20–100, ``artery`` ≥ 100.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch

from calciscope.data.slides import Slide
from calciscope.data.tissue import TissueMask
from calciscope.data.vessels.compartment import compartment_map
from calciscope.data.vessels.frames import level0_to_mask_px, mask_px_to_level0
from calciscope.data.vessels.instances import InstanceConfig, fill_holes, scored_vessel_instances
from calciscope.data.vessels.measure import VesselGeometry, measure_vessel
from calciscope.model.segmenter import SegmenterCard, VesselMaps, segment_slide

VESSEL_POSITIVE = 0.5  # calibrated per-vessel probability at which a vessel counts as positive for a finding
SIZE_BANDS = (("capillary", 0.0, 20.0), ("arteriole", 20.0, 100.0), ("artery", 100.0, float("inf")))
COMPARTMENTS = ("fat", "dermis", "unknown")
_SHIFT = 4


def size_band(diameter_um: float) -> str:
    return next(name for name, lo, hi in SIZE_BANDS if lo <= diameter_um < hi)


@dataclass(frozen=True)
class AdequacyConfig:
    min_small_fat_vessels: int = 3
    small_max_um: float = 100.0


@dataclass(frozen=True)
class VesselConfig:
    """Settings of the vessel analysis (instances, adequacy, QC); the segmenter brings its own mpp."""

    instance: InstanceConfig | None = None  # None: the segmenter card's (SegmenterCard.instance_config)
    adequacy: AdequacyConfig = field(default_factory=AdequacyConfig)
    artifact_threshold: float | None = None  # None: the segmenter card's thresholds["calcium_artifact"]
    min_artifact_um2: float = 150.0
    artifact_near_um: float = 15.0
    batch_size: int = 64


@dataclass
class VesselRecord:
    """One detected vessel: level-0 outline (and lumen), size, compartment, findings, QC flags."""

    vessel_id: int
    polygon: np.ndarray  # (N, 2) level-0 px, outer wall
    lumen_polygon: np.ndarray | None
    geometry: VesselGeometry
    compartment: str  # fat | dermis | unknown
    probabilities: dict[str, float] = field(default_factory=dict)  # calibrated per-vessel (the vessel head's)
    tile_probabilities: dict[str, float] = field(default_factory=dict)  # highest of its tiles, per finding
    vessel_probability: float | None = None  # the vessel classifier's, when it judges vessel-ness
    artifact_probability: float | None = None  # the vessel classifier's calcium-artifact one, when it judges those
    n_tiles: int = 0
    flags: list[str] = field(default_factory=list)

    @property
    def centroid(self) -> tuple[float, float]:
        c = self.polygon.mean(axis=0)
        return float(c[0]), float(c[1])

    @property
    def size_band(self) -> str:
        return size_band(self.geometry.outer_diameter_um)

    def to_dict(self, thresholds: dict[str, float] | None = None) -> dict[str, Any]:
        g = self.geometry
        out = {"id": self.vessel_id, "centroid": [round(v, 1) for v in self.centroid],
               "outer_diameter_um": round(g.outer_diameter_um, 2),
               "lumen_diameter_um": None if g.lumen_diameter_um is None else round(g.lumen_diameter_um, 2),
               "wall_thickness_um": None if g.wall_thickness_um is None else round(g.wall_thickness_um, 2),
               "area_um2": round(g.area_um2, 1), "compartment": self.compartment, "size_band": self.size_band,
               "n_tiles": self.n_tiles, "probabilities": {k: round(v, 6) for k, v in self.probabilities.items()},
               "flags": list(self.flags)}
        if self.vessel_probability is not None:
            out["vessel_probability"] = round(self.vessel_probability, 6)
        if self.artifact_probability is not None:
            out["calcium_artifact_probability"] = round(self.artifact_probability, 6)
        if thresholds:
            out["positive"] = [k for k, v in self.probabilities.items() if v >= thresholds.get(k, 0.5)]
        return out


def detect_vessels(slide: Slide, tissue: TissueMask, segmenter: torch.nn.Module, seg_card: SegmenterCard,
                   config: VesselConfig = VesselConfig(), candidates_at: float | None = None
                   ) -> tuple[list[VesselRecord], list[VesselRecord], VesselMaps]:
    """(vessels, candidates, the segmenter's maps) of ``slide``: outlined, measured and placed, no findings yet.

    Vessels pass the instance settings' ``min_mean_probability``; with ``candidates_at`` below it, the outlines that
    pass only that lower filter come back as candidates (a calcified or occluded vessel can look unlike the vessels
    the segmenter is sure of; the vessel classifier decides whether one is kept). Candidates number on after the
    vessels."""
    maps = segment_slide(slide, segmenter, seg_card, tissue)
    on_tissue = _tissue_at(tissue, maps)
    lumen_map = maps.probability("lumen") * on_tissue
    vessel_map = maps.probability("vessel") * on_tissue
    instance = config.instance if config.instance is not None else seg_card.instance_config()
    floor = instance.min_mean_probability if candidates_at is None else min(candidates_at,
                                                                             instance.min_mean_probability)
    outlines, mean = scored_vessel_instances(vessel_map, lumen_map, maps.downsample, slide.mpp, instance, floor)
    polygons = [p for p, m in zip(outlines, mean) if m >= instance.min_mean_probability]
    faint = [p for p, m in zip(outlines, mean) if m < instance.min_mean_probability]
    comps = compartment_map(tissue)
    records = []
    for i, poly in enumerate(polygons + faint):
        lumen = _lumen(poly, lumen_map >= instance.threshold, maps.downsample)
        geometry = measure_vessel(poly, slide.mpp, lumen)
        c = poly.mean(axis=0)
        records.append(VesselRecord(i + 1, poly, lumen, geometry, comps.compartment_at(*c) or "unknown"))
    return records[: len(polygons)], records[len(polygons) :], maps


def _tissue_at(tissue: TissueMask, maps: VesselMaps, grow_um: float = 40.0) -> np.ndarray:
    """Where vessels are looked for, on the segmenter's maps (float 0/1): the tissue mask plus pen ink (ink lies on
    the coverslip, and vessels under it are still there to read) with holes filled (the mask leaves out dark
    calcified walls and pale lumina), grown by ``grow_um``; glass and the slide border stay out."""
    h, w = next(iter(maps.maps.values())).shape
    k = max(int(round(2 * grow_um / tissue.mask_mpp)), 1) | 1
    mask = cv2.dilate(fill_holes(tissue.tissue | tissue.pen).astype(np.uint8),
                      cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    return cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST).astype(np.float32)


def _lumen(poly: np.ndarray, lumen: np.ndarray, downsample: float) -> np.ndarray | None:
    """The vessel's lumen: the largest lumen-map region inside its outline (level-0 px), or None."""
    pts = level0_to_mask_px(poly, downsample)
    x0, y0 = np.floor(pts.min(axis=0)).astype(int) - 1
    x1, y1 = np.ceil(pts.max(axis=0)).astype(int) + 2
    h, w = lumen.shape
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if x1 - x0 < 3 or y1 - y0 < 3:
        return None
    inside = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillPoly(inside, [np.round((pts - [x0, y0]) * (1 << _SHIFT)).astype(np.int32)], 1, shift=_SHIFT)
    region = (lumen[y0:y1, x0:x1] & inside.astype(bool)).astype(np.uint8)
    contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    contours = [c for c in contours if len(c) >= 3]
    if not contours:
        return None
    best = max(contours, key=cv2.contourArea).reshape(-1, 2)
    return mask_px_to_level0(best, downsample, (x0 * downsample, y0 * downsample))
