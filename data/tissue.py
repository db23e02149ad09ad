"""Tissue mask at low resolution and quality control (blur, pen marks, background, folds/dark areas).

The mask is computed once per slide on a downsampled image (default 8 µm/px): stained pixels are found by
saturation (Otsu, with a floor) or optical density against the slide's own glass colour; pen ink (green, blue)
and black (borders, black ink) are removed; a morphological closing bridges adipocyte membranes so fat counts as
tissue; holes smaller than ``max_hole_um2`` are filled and regions smaller than ``min_region_um2`` dropped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import cv2
import numpy as np

from calciscope.data.slides import Slide
from calciscope.errors import SlideError


@dataclass(frozen=True)
class TissueConfig:
    """How tissue is told from glass. Areas in µm², lengths in µm."""

    mask_mpp: float = 8.0
    min_saturation: int = 20  # floor under Otsu's saturation threshold (0-255)
    min_od: float = 0.12  # mean optical density that counts as stained even when unsaturated
    close_um: float = 96.0  # closing diameter: bridges adipocyte membranes and cells cut open at the edge
    max_hole_um2: float = 60_000.0  # holes smaller than this (adipocytes, lumina) are tissue
    min_region_um2: float = 25_000.0  # smaller islands (dust, debris on glass) are dropped


@dataclass(frozen=True)
class QCConfig:
    """Thresholds behind the QC flags. Fractions are of tissue area unless named otherwise."""

    blur_laplacian_var: float = 100.0  # a tile whose Laplacian variance (grey, tile at 2× reduced) is below this is blurry
    blur_tile_fraction: float = 0.10  # slide flag 'blur' when more than this fraction of tissue tiles is blurry
    pen_fraction: float = 0.005  # slide flag 'pen_marks' when ink covers more than this of tissue + ink
    dark_fraction: float = 0.02  # slide flag 'folds_or_dark' above this
    dark_od: float = 1.6  # mean optical density of a fold / very dark area (real epidermis reaches ~1.5)
    min_tissue_mm2: float = 0.25  # slide flag 'low_tissue' below this


@dataclass
class TissueMask:
    """A boolean tissue mask plus the masks QC needs, all at ``mask_mpp`` (downsample ``downsample`` of level 0)."""

    tissue: np.ndarray  # bool (h, w)
    pen: np.ndarray  # bool, ink anywhere on the slide
    rgb: np.ndarray  # uint8 (h, w, 3) low-resolution image the masks were computed on
    mask_mpp: float
    downsample: float

    @property
    def tissue_area_mm2(self) -> float:
        return float(self.tissue.sum()) * (self.mask_mpp / 1000.0) ** 2


@dataclass
class SlideQC:
    """Slide-level QC: measured values and the flags they raise (flags travel into every later output)."""

    tissue_area_mm2: float
    tissue_fraction: float
    pen_fraction: float
    dark_fraction: float
    blurry_tile_fraction: float | None = None
    flags: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def detect_tissue(slide: Slide, config: TissueConfig = TissueConfig()) -> TissueMask:
    """Compute the tissue mask of ``slide``; a slide with no tissue at all is a :class:`SlideError`."""
    downsample = config.mask_mpp / slide.mpp
    if downsample < 1:
        raise SlideError(slide.path, f"mask resolution {config.mask_mpp} µm/px is finer than the slide's {slide.mpp} µm/px")
    rgb = slide.read_downsampled(downsample)
    tissue, pen = tissue_from_rgb(rgb, config.mask_mpp, config)
    if not tissue.any():
        raise SlideError(slide.path, "no tissue found (the image looks like empty glass, ink or border only)")
    return TissueMask(tissue=tissue, pen=pen, rgb=rgb, mask_mpp=config.mask_mpp, downsample=downsample)


def tissue_from_rgb(rgb: np.ndarray, mpp: float, config: TissueConfig = TissueConfig()):
    """(tissue, pen) boolean masks for an RGB image at ``mpp`` µm/px."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    sat = hsv[..., 1]
    od = optical_density(rgb)
    black = black_mask(hsv)  # black ink, cover-slip edges, scanner borders: never tissue
    pen = pen_mask(hsv) | (black & ~_touching_edge(black))  # ink: coloured, or black away from the image edge

    otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    sat_threshold = max(float(config.min_saturation), min(float(otsu), 60.0))
    # Ink and its fringe (anti-aliased stroke edges) are never tissue: nothing under ink can be analysed.
    ink = cv2.dilate(pen.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool) | black
    stained = ((sat > sat_threshold) | (od > config.min_od)) & ~ink

    px_area = mpp * mpp
    mask = stained.astype(np.uint8)
    close_px = max(1, int(round(config.close_um / mpp)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (close_px | 1, close_px | 1))
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
    mask = _fill_small_holes(mask, config.max_hole_um2 / px_area)
    mask = _drop_small_regions(mask, config.min_region_um2 / px_area)
    return mask.astype(bool) & ~ink, pen


def optical_density(rgb: np.ndarray, background: float | None = None) -> np.ndarray:
    """Mean optical density over the three channels, against the glass brightness (99th percentile)."""
    flat = rgb.reshape(-1, 3)
    if background is None:
        background = float(np.percentile(flat.max(axis=1), 99)) if flat.size else 255.0
    background = max(background, 200.0)
    od = -np.log((rgb.astype(np.float32) + 1.0) / (background + 1.0))
    return np.clip(od, 0, None).mean(axis=2)


# HSV bands (OpenCV: hue 0-179, saturation and value 0-255) of green and blue ink.
_GREEN_INK = ((35, 51, 31), (90, 255, 255))
_BLUE_INK = ((95, 81, 31), (122, 255, 255))


def black_mask(hsv: np.ndarray) -> np.ndarray:
    """Very dark, or dark and grey: black ink and borders (dense haematoxylin stays brighter or more purple)."""
    very_dark = cv2.inRange(hsv, (0, 0, 0), (179, 255, 59))
    dark_grey = cv2.inRange(hsv, (0, 0, 0), (179, 49, 114))
    return cv2.bitwise_or(very_dark, dark_grey) > 0


def _touching_edge(mask: np.ndarray) -> np.ndarray:
    """The parts of ``mask`` connected to the image border (borders and cover-slip edges, not ink strokes)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    h, w = mask.shape
    x, y, bw, bh = (stats[:, i] for i in range(4))
    edge = (x == 0) | (y == 0) | (x + bw == w) | (y + bh == h)
    edge[0] = False
    return edge[labels]


def pen_mask(hsv: np.ndarray) -> np.ndarray:
    """Green and blue ink by hue; H&E's pinks and purples lie outside these bands."""
    green = cv2.inRange(hsv, *_GREEN_INK)
    blue = cv2.inRange(hsv, *_BLUE_INK)
    return cv2.bitwise_or(green, blue) > 0


def slide_qc(mask: TissueMask, qc: QCConfig = QCConfig(), blurry_tile_fraction: float | None = None) -> SlideQC:
    """Slide-level QC values and flags from the tissue mask (and, when tiles were read, their blur)."""
    tissue_px = int(mask.tissue.sum())
    pen_px = int(mask.pen.sum())
    pen_fraction = pen_px / max(1, tissue_px + pen_px)
    dark = optical_density(mask.rgb) > qc.dark_od
    dark_fraction = float(np.count_nonzero(dark & mask.tissue & ~mask.pen)) / max(1, tissue_px)
    result = SlideQC(
        tissue_area_mm2=round(mask.tissue_area_mm2, 4),
        tissue_fraction=round(tissue_px / mask.tissue.size, 4),
        pen_fraction=round(pen_fraction, 4),
        dark_fraction=round(dark_fraction, 4),
        blurry_tile_fraction=None if blurry_tile_fraction is None else round(blurry_tile_fraction, 4),
    )
    if pen_fraction > qc.pen_fraction:
        result.flags.append("pen_marks")
    if dark_fraction > qc.dark_fraction:
        result.flags.append("folds_or_dark")
    if mask.tissue_area_mm2 < qc.min_tissue_mm2:
        result.flags.append("low_tissue")
    if blurry_tile_fraction is not None and blurry_tile_fraction > qc.blur_tile_fraction:
        result.flags.append("blur")
    return result


QC_COLUMNS = ("blur_var", "background_fraction", "pen_fraction", "dark_fraction")  # what tile_qc measures


def tile_qc(tile_rgb: np.ndarray) -> dict[str, float]:
    """Per-tile QC on a 2× reduced copy (a quarter of the cost; focus loss of a few pixels still shows):
    blur (variance of the Laplacian of grey), background, ink and dark fractions."""
    h, w = tile_rgb.shape[:2]
    small = cv2.resize(tile_rgb, (max(1, w // 2), max(1, h // 2)), interpolation=cv2.INTER_AREA)
    grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    _, std = cv2.meanStdDev(cv2.Laplacian(grey, cv2.CV_16S))
    hsv = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)
    n = float(grey.size)
    ink = cv2.bitwise_or(cv2.inRange(hsv, *_GREEN_INK), cv2.inRange(hsv, *_BLUE_INK))
    return {
        "blur_var": float(std[0, 0]) ** 2,
        "background_fraction": cv2.countNonZero(cv2.inRange(hsv, (0, 0, 201), (179, 19, 255))) / n,
        "pen_fraction": cv2.countNonZero(ink) / n,
        "dark_fraction": cv2.countNonZero(cv2.inRange(hsv, (0, 0, 0), (179, 255, 59))) / n,
    }


def _fill_small_holes(mask: np.ndarray, max_hole_px: float) -> np.ndarray:
    n, labels, stats, _ = cv2.connectedComponentsWithStats((mask == 0).astype(np.uint8), connectivity=4)
    h, w = mask.shape
    x, y, bw, bh, area = (stats[:, i] for i in range(5))
    inner = (x > 0) & (y > 0) & (x + bw < w) & (y + bh < h)
    fill = inner & (area <= max_hole_px)
    fill[0] = False  # label 0 is the mask itself
    return (mask.astype(bool) | fill[labels]).astype(np.uint8)


def _drop_small_regions(mask: np.ndarray, min_region_px: float) -> np.ndarray:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = np.zeros(n, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_region_px
    return keep[labels].astype(np.uint8)
