"""Vessel detection on a slide: the segmenter's maps cut into outlined, measured and placed vessels (no findings
yet). Training (the vessel classifier's crops) and inference (the vessel stage of ``predict``) both start here.

    segmenter (model.segmenter) → vessel and lumen maps → instances (data.vessels.instances) → outline, lumen,
    diameters, wall thickness (data.vessels.measure) → dermis or subcutaneous fat (data.vessels.compartment)

The maps are streamed: the segmenter hands them over one row of windows at a time (``segment_bands``), each band is
cut with the rows carried over from the last (``data.vessels.instances.cut_band``), and only what a band settles is
kept, as outlines and small per-vessel records, with the calcium-artifact regions; no whole-slide map is ever held.
A vessel is settled once everything its cut depends on lies inside the band, so the vessels, their order and their
numbers are exactly those of a cut of the whole map.

Size bands (outer diameter = minor axis, µm): ``capillary`` < 20, ``arteriole`` 20–100, ``artery`` ≥ 100.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import cv2
import numpy as np
import torch

from calciscope.data.slides import Slide
from calciscope.data.tissue import TissueMask
from calciscope.data.vessels.compartment import compartment_map
from calciscope.data.vessels.frames import level0_to_mask_px, mask_px_to_level0
from calciscope.data.vessels.instances import (
    Instance,
    InstanceConfig,
    byte_threshold,
    cut_band,
    fill_holes,
    settled_clusters,
)
from calciscope.data.vessels.measure import VesselGeometry, measure_vessel
from calciscope.model.precision import Precision
from calciscope.model.segmenter import (
    MapBand,
    SegmenterCard,
    VesselMaps,
    WindowPlan,
    WindowsSeen,
    plan_windows,
    segment_bands,
)

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
    batch_size: int = 64  # vessel crops (or tiles) per forward pass
    window_batch: int = 4  # segmenter windows per forward pass


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


@dataclass
class StreamedMaps:
    """What the segmenter's maps leave behind once a slide is streamed through them: their scale, the calcium-artifact
    regions (level-0 outlines), how many windows ran, and the most map rows a band held at once."""

    downsample: float  # level-0 px per map px
    mpp: float  # µm per map px
    artifact_polygons: list[np.ndarray]
    n_windows: int
    peak_rows: int


def detect_vessels(slide: Slide, tissue: TissueMask, segmenter: torch.nn.Module, seg_card: SegmenterCard,
                   config: VesselConfig = VesselConfig(), candidates_at: float | None = None, *,
                   precision: Precision | None = None, progress: Callable[[int, int], None] | None = None,
                   on_windows: WindowsSeen | None = None
                   ) -> tuple[list[VesselRecord], list[VesselRecord], StreamedMaps]:
    """(vessels, candidates, what the maps leave behind) of ``slide``: outlined, measured and placed, no findings yet.

    Vessels pass the instance settings' ``min_mean_probability``; with ``candidates_at`` below it, the outlines that
    pass only that lower filter come back as candidates (a calcified or occluded vessel can look unlike the vessels
    the segmenter is sure of; the vessel classifier decides whether one is kept). Candidates number on after the
    vessels. The segmenter runs in ``precision`` (default: as the tile model would, ``inference_precision``);
    ``progress(windows done, windows total)``; ``on_windows`` sees each batch of decoded windows (``segment_bands``)."""
    plan = plan_windows(slide, seg_card, tissue)
    detector = BandDetector(slide, tissue, seg_card, plan, config, candidates_at)
    for band in segment_bands(slide, segmenter, seg_card, plan, precision=precision, batch_size=config.window_batch,
                              progress=progress, on_windows=on_windows):
        detector.push(band)
    return detector.finish()


class BandDetector:
    """Cuts vessels and calcium-artifact regions out of the segmenter's maps as they arrive, one band of rows at a
    time (``push``), holding only the rows a vessel still open at the band's bottom needs; ``finish`` numbers them."""

    def __init__(self, slide: Slide, tissue: TissueMask, seg_card: SegmenterCard, plan: WindowPlan,
                 config: VesselConfig = VesselConfig(), candidates_at: float | None = None):
        self.slide, self.plan, self.channels = slide, plan, list(seg_card.channels)
        self.instance = config.instance if config.instance is not None else seg_card.instance_config()
        floor = self.instance.min_mean_probability
        self.floor = floor if candidates_at is None else min(candidates_at, floor)
        self.artifact_threshold = (config.artifact_threshold if config.artifact_threshold is not None
                                   else seg_card.thresholds.get("calcium_artifact", 0.5))
        self.min_artifact_um2 = config.min_artifact_um2
        self.on_tissue = OnTissue(tissue, plan.width, plan.height)
        self.compartments = compartment_map(tissue)
        self.map_mpp = seg_card.mpp
        self.buffer = np.zeros((len(self.channels), 0, plan.width), np.uint8)  # map rows [row0, row0 + len)
        self.row0 = 0
        self.found: dict[tuple[int, int, int], tuple[Instance, np.ndarray | None, VesselGeometry]] = {}
        self.artifacts: dict[tuple[int, int], np.ndarray] = {}
        self.peak_rows = 0

    def push(self, band: MapBand) -> None:
        """Add the next band (map rows from where the last ended) and keep what it settles."""
        if band.y != self.row0 + self.buffer.shape[1]:
            raise ValueError(f"bands must come in order: expected map row {self.row0 + self.buffer.shape[1]}, "
                             f"got {band.y}")
        self.buffer = np.concatenate([self.buffer, band.maps], axis=1) if self.buffer.shape[1] else band.maps
        self.peak_rows = max(self.peak_rows, self.buffer.shape[1])
        top, bottom = self.row0, self.row0 + self.buffer.shape[1]
        cut_top, cut_bottom = top > 0, bottom < self.plan.height
        on = self.on_tissue.rows(top, bottom)
        vessel = self._channel("vessel") * on
        lumen = self._channel("lumen") * on
        found, next_row = cut_band(vessel, lumen, self.plan.downsample, self.slide.mpp, self.instance, self.floor,
                                   row0=top, cut_top=cut_top, cut_bottom=cut_bottom)
        lumen_mask = lumen >= byte_threshold(self.instance.threshold)
        for inst in found:
            if inst.order not in self.found:
                lumen_poly = _lumen(inst.polygon, lumen_mask, self.plan.downsample, top)
                self.found[inst.order] = (inst, lumen_poly, measure_vessel(inst.polygon, self.slide.mpp, lumen_poly))
        starts = [next_row]
        if "calcium_artifact" in self.channels:
            starts.append(self._artifacts(top, cut_top, cut_bottom))
        starts = [row for row in starts if row is not None]
        next_row = min(max(min(starts), top), bottom) if starts else bottom  # none: the last band, nothing left open
        self.buffer = self.buffer[:, next_row - top :].copy()
        self.row0 = next_row

    def _channel(self, channel: str) -> np.ndarray:
        return self.buffer[self.channels.index(channel)]

    def _artifacts(self, top: int, cut_top: bool, cut_bottom: bool) -> int | None:
        """Keep the calcium-artifact regions (connected regions of the map at its threshold, at least
        ``min_artifact_um2``) the band settles; the first row the next band must start at."""
        mask = (self._channel("calcium_artifact") >= byte_threshold(self.artifact_threshold)).astype(np.uint8)
        cols = np.flatnonzero(mask.any(axis=0))  # the columns holding artifact pixels, and glass either side
        c0, c1 = (max(int(cols[0]) - 2, 0), min(int(cols[-1]) + 3, mask.shape[1])) if len(cols) else (0, 1)
        mask = np.ascontiguousarray(mask[:, c0:c1])
        settled, next_row = settled_clusters(mask, 2, cut_top, cut_bottom)
        px_um2 = self.map_mpp**2
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        for c in contours:
            c = c.reshape(-1, 2)
            first = c[np.lexsort((c[:, 0], c[:, 1]))[0]]  # where the trace starts: its first pixel in raster order
            key = (int(first[1]) + top, int(first[0]) + c0)
            if key in self.artifacts or not settled[first[1], first[0]]:
                continue
            if len(c) >= 3 and cv2.contourArea(c) * px_um2 >= self.min_artifact_um2:
                self.artifacts[key] = mask_px_to_level0(c + np.array([c0, top]), self.plan.downsample)
        return None if next_row is None else next_row + top

    def finish(self) -> tuple[list[VesselRecord], list[VesselRecord], StreamedMaps]:
        """(vessels, candidates, what the maps leave behind), numbered in the order of a whole-map cut."""
        if self.row0 < self.plan.height:
            raise ValueError(f"the maps stopped at row {self.row0} of {self.plan.height}")
        ordered = [self.found[k] for k in sorted(self.found)]
        strong = [f for f in ordered if f[0].mean >= self.instance.min_mean_probability]
        faint = [f for f in ordered if f[0].mean < self.instance.min_mean_probability]
        records = []
        for i, (inst, lumen, geometry) in enumerate(strong + faint):
            c = inst.polygon.mean(axis=0)
            records.append(VesselRecord(i + 1, inst.polygon, lumen, geometry,
                                        self.compartments.compartment_at(*c) or "unknown"))
        artifacts = [self.artifacts[k] for k in sorted(self.artifacts, reverse=True)]  # OpenCV's contour order
        maps = StreamedMaps(self.plan.downsample, self.map_mpp, artifacts, self.plan.n_windows, self.peak_rows)
        return records[: len(strong)], records[len(strong) :], maps


class OnTissue:
    """Where vessels are looked for, on the segmenter's maps, a band of rows at a time (float 0/1): the tissue mask
    plus pen ink (ink lies on the coverslip, and vessels under it are still there to read) with holes filled (the
    mask leaves out dark calcified walls and pale lumina), grown by ``grow_um``; glass and the slide border stay out.
    Each map pixel takes its nearest mask pixel, exactly as ``cv2.resize`` (INTER_NEAREST) of the whole mask would."""

    def __init__(self, tissue: TissueMask, width: int, height: int, grow_um: float = 40.0):
        k = max(int(round(2 * grow_um / tissue.mask_mpp)), 1) | 1
        self.mask = cv2.dilate(fill_holes(tissue.tissue | tissue.pen).astype(np.uint8),
                               cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
        h, w = self.mask.shape
        # OpenCV's nearest-neighbour source index per output row and column (resizing index vectors gives them)
        self.cols = cv2.resize(np.arange(w, dtype=np.float32)[None, :], (width, 1),
                               interpolation=cv2.INTER_NEAREST)[0].astype(np.intp)
        self.row_of = cv2.resize(np.arange(h, dtype=np.float32)[:, None], (1, height),
                                 interpolation=cv2.INTER_NEAREST)[:, 0].astype(np.intp)

    def rows(self, top: int, bottom: int) -> np.ndarray:
        """uint8 0/1 for map rows [top, bottom)."""
        return self.mask[self.row_of[top:bottom]][:, self.cols]


def _tissue_at(tissue: TissueMask, maps: VesselMaps, grow_um: float = 40.0) -> np.ndarray:
    """:class:`OnTissue` over the whole of ``maps`` (float 0/1)."""
    h, w = next(iter(maps.maps.values())).shape
    return OnTissue(tissue, w, h, grow_um).rows(0, h).astype(np.float32)


def _lumen(poly: np.ndarray, lumen: np.ndarray, downsample: float, row0: int = 0) -> np.ndarray | None:
    """The vessel's lumen: the largest lumen-map region inside its outline (level-0 px), or None. ``lumen`` is a band
    of the map from map row ``row0`` on, holding the outline's rows and two more on each side."""
    pts = level0_to_mask_px(poly, downsample)
    x0, y0 = np.floor(pts.min(axis=0)).astype(int) - 1
    x1, y1 = np.ceil(pts.max(axis=0)).astype(int) + 2
    h, w = lumen.shape
    x0, y0, x1, y1 = max(x0, 0), max(y0, row0), min(x1, w), min(y1, row0 + h)
    if x1 - x0 < 3 or y1 - y0 < 3:
        return None
    inside = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillPoly(inside, [np.round((pts - [x0, y0]) * (1 << _SHIFT)).astype(np.int32)], 1, shift=_SHIFT)
    region = (lumen[y0 - row0 : y1 - row0, x0:x1] & inside.astype(bool)).astype(np.uint8)
    contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    contours = [c for c in contours if len(c) >= 3]
    if not contours:
        return None
    best = max(contours, key=cv2.contourArea).reshape(-1, 2)
    return mask_px_to_level0(best, downsample, (x0 * downsample, y0 * downsample))
