"""Vessel instances from a low-resolution vessel-wall probability map → outer polygons in level-0 px.

A vessel is a ring: wall pixels around a lumen. The map is thresholded into wall pixels and closed (walls
thinner than a map pixel break into fragments when downsampled); every connected wall region is filled (its
lumens become part of the vessel); a filled region that encloses two or more lumens is several touching
vessels and is split by a watershed by immersion of its distance transform, seeded by the lumens, so the cut
falls on the neck between the vessels. A filled map (a "whole vessel" segmentation) also works, but touching
vessels then stay merged, as do touching vessels with no visible lumen (capillaries whose lumen is under a
map pixel). Specks below ``min_area_um2`` are dropped.

Why not a library watershed: cv2.watershed floods along colour differences of an 8-bit image, which a binary
mask does not have (on 73 touching phantom pairs with two visible lumens, lumen-seeded cv2.watershed gave
both vessels IoU ≥ 0.5 in 74 % of pairs on the distance image, 90 % on a flat one);
scipy.ndimage.watershed_ift let a small vessel's basin wrap around its neighbour; scikit-image is not
installed. The immersion loop (cv2.dilate per level) is short and deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

from calciscope.data.vessels.frames import mask_px_to_level0

UPSAMPLE = 4  # instance masks are traced at 4× the map's resolution, so outlines sit ≤ 1/8 map pixel inside


@dataclass(frozen=True)
class InstanceConfig:
    """Threshold on the probability map; areas in µm² (level-0 mpp × downsample gives the map's pixel size)."""

    threshold: float = 0.5
    close_um: float = 4.0  # closing diameter: reconnects walls thinner than a map pixel (capillaries, venules)
    min_area_um2: float = 20.0  # a 6 µm capillary is ~28 µm²
    min_lumen_um2: float = 2.0  # smaller holes are noise in the wall, not lumens that seed a split
    # maps path (vessel + lumen maps): a lumen-map patch seeds a split only from this size, after a closing of
    # lumen_close_um; a thrombus or red cells make the lumen map patchy, and a patchy lumen is still one lumen
    split_min_lumen_um2: float = 60.0
    lumen_close_um: float = 8.0
    split_max_solidity: float = 0.9  # ... and only a region this far from convex (area / convex hull area) is split
    grow_threshold: float = 0.3  # maps path: a vessel (seeded at ``threshold``) extends over pixels ≥ this
    # maps path: a vessel's mean probability (the higher of the vessel and lumen maps, over its outline) must reach
    # this; specks grown from a few confident pixels in lymphocytes, debris and folds stay well below it
    # a segmenter card's ``instance`` settings override these defaults; the demo's 0.6 gave the highest
    # min(recall, precision) on 4 unseen 4096² phantoms (synth --seed 700)
    min_mean_probability: float = 0.6


def vessel_instances(prob: np.ndarray, downsample: float, mpp: float,
                     config: InstanceConfig = InstanceConfig()) -> list[np.ndarray]:
    """Outer polygons ((N, 2) level-0 x, y px) of the vessels in an H×W map in [0, 1] at ``downsample``.

    ``mpp`` is the slide's level-0 µm per pixel. Order: connected regions in raster order of their first
    pixel, the parts of a split region in the order of their lumens; deterministic.
    """
    prob = np.asarray(prob, np.float32)
    if prob.ndim != 2 or downsample <= 0 or mpp <= 0:
        raise ValueError(f"need an H×W map, downsample > 0 and mpp > 0; got shape {prob.shape}, "
                         f"downsample {downsample}, mpp {mpp}")
    px_um2 = (mpp * downsample) ** 2
    wall = close(prob >= config.threshold, config.close_um / (mpp * downsample))
    labels = label_instances(wall, min_lumen_px=config.min_lumen_um2 / px_um2)
    return _polygons(labels, downsample, px_um2, config.min_area_um2)[0]


def _polygons(labels: np.ndarray, downsample: float, px_um2: float, min_area_um2: float,
              keep: np.ndarray | None = None) -> tuple[list[np.ndarray], list[int]]:
    """Outlines of the labelled regions at least ``min_area_um2`` large (and, with ``keep``, a bool per label
    from 1, those it marks), in label order, and their labels."""
    polygons, kept = [], []
    for sl, k in _objects(labels):
        crop = labels[sl] == k
        if (keep is not None and not keep[k - 1]) or np.count_nonzero(crop) * px_um2 < min_area_um2:
            continue
        polygons.append(_outline(crop, downsample, (sl[1].start * downsample, sl[0].start * downsample)))
        kept.append(k)
    return polygons, kept


def vessel_instances_from_maps(vessel: np.ndarray, lumen: np.ndarray, downsample: float, mpp: float,
                               config: InstanceConfig = InstanceConfig()) -> list[np.ndarray]:
    """Outer polygons from a whole-vessel map and a lumen map (both H×W in [0, 1], as the segmenter gives them).

    Vessels are the closed, hole-filled regions of ``vessel ≥ threshold`` or ``lumen ≥ threshold`` (a lumen is
    inside its vessel, and the lumen map fills a large vessel whose wall map left its middle open); a region
    holding two or more lumens
    (``lumen ≥ threshold`` inside it) is split between them as in :func:`label_instances`. Same order and
    speck filter as :func:`vessel_instances`. Only instances whose mean probability reaches
    ``config.min_mean_probability`` are kept (see :func:`scored_vessel_instances`).
    """
    polygons, mean = scored_vessel_instances(vessel, lumen, downsample, mpp, config, config.min_mean_probability)
    return [p for p, m in zip(polygons, mean) if m >= config.min_mean_probability]


def scored_vessel_instances(vessel: np.ndarray, lumen: np.ndarray, downsample: float, mpp: float,
                            config: InstanceConfig = InstanceConfig(), floor: float = 0.0
                            ) -> tuple[list[np.ndarray], np.ndarray]:
    """Every instance of :func:`vessel_instances_from_maps` whose mean probability (the higher of the two maps,
    over its region) reaches ``floor``, and those means (N,). The instances do not depend on
    ``config.min_mean_probability``: filter the means to apply it, or several values of it, without cutting the
    maps again."""
    vessel, lumen = np.asarray(vessel, np.float32), np.asarray(lumen, np.float32)
    if vessel.shape != lumen.shape or vessel.ndim != 2 or downsample <= 0 or mpp <= 0:
        raise ValueError(f"need two H×W maps of one shape, downsample > 0 and mpp > 0; got {vessel.shape}, "
                         f"{lumen.shape}, downsample {downsample}, mpp {mpp}")
    px_um2 = (mpp * downsample) ** 2
    seeds = (vessel >= config.threshold) | (lumen >= config.threshold)
    grown = (vessel >= config.grow_threshold) | (lumen >= config.grow_threshold) | seeds
    _, comp = cv2.connectedComponents(grown.astype(np.uint8), connectivity=8)
    inside = np.isin(comp, np.unique(comp[seeds])) & (comp > 0)  # hysteresis: regions holding a seed pixel
    filled = fill_holes(close(inside, config.close_um / (mpp * downsample)))
    lumen_mask = close(lumen >= config.threshold, config.lumen_close_um / (mpp * downsample)).astype(bool)
    lumens = _lumens(filled & lumen_mask, config.split_min_lumen_um2 / px_um2)
    labels = _label_filled(filled, lumens, config.split_max_solidity)
    index = np.arange(1, labels.max() + 1)
    if not len(index):
        return [], np.zeros(0)
    means = np.asarray(ndimage.mean(np.maximum(vessel, lumen), labels, index), np.float64).reshape(-1)
    polygons, kept = _polygons(labels, downsample, px_um2, config.min_area_um2, keep=means >= floor)
    return polygons, means[np.asarray(kept, int) - 1]


def label_instances(wall: np.ndarray, min_lumen_px: float = 1.0) -> np.ndarray:
    """int32 instance labels (0 = background) of filled vessels, touching ones split at their lumens."""
    filled = fill_holes(wall)
    lumens = _lumens(filled & ~wall.astype(bool), min_lumen_px)
    return _label_filled(filled, lumens)


def _label_filled(filled: np.ndarray, lumens: np.ndarray, max_solidity: float = 1.0) -> np.ndarray:
    """Instance labels of a filled vessel mask, a region with several labelled lumens split between them (only a
    region whose solidity is below ``max_solidity``: two touching round vessels make a waisted, non-convex shape)."""
    _, comp = cv2.connectedComponents(filled.astype(np.uint8), connectivity=8)
    out = np.zeros(filled.shape, np.int32)
    next_label = 1
    for sl, k in _objects(comp):
        region = comp[sl] == k
        seeds = np.unique(lumens[sl][region])
        seeds = seeds[seeds > 0]
        if len(seeds) < 2 or (max_solidity < 1.0 and _solidity(region) >= max_solidity):
            out[sl][region] = next_label
            next_label += 1
            continue
        parts = _split(region, lumens[sl], seeds)
        out[sl][region] = parts[region] + (next_label - 1)
        next_label += len(seeds)
    return out


def _solidity(region: np.ndarray) -> float:
    contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    c = max(contours, key=cv2.contourArea)
    hull = cv2.contourArea(cv2.convexHull(c))
    return float(cv2.contourArea(c) / hull) if hull > 0 else 1.0


def close(mask: np.ndarray, diameter_px: float) -> np.ndarray:
    """uint8 mask after a morphological closing with an elliptical kernel of ~``diameter_px`` (odd, ≥ 1)."""
    k = max(int(round(diameter_px)), 1) | 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    return cv2.morphologyEx(np.asarray(mask, np.uint8), cv2.MORPH_CLOSE, kernel)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """bool mask with every region enclosed by foreground filled (the lumens of rings)."""
    contours, _ = cv2.findContours(np.asarray(mask, np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros(mask.shape, np.uint8)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return filled.astype(bool) | np.asarray(mask, bool)


def _lumens(holes: np.ndarray, min_px: float) -> np.ndarray:
    """int32 labels of holes with at least ``min_px`` pixels (0 elsewhere)."""
    _, lab, stats, _ = cv2.connectedComponentsWithStats(holes.astype(np.uint8), connectivity=4)
    small = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] < min_px)
    lab[np.isin(lab, small)] = 0
    return lab


def _split(region: np.ndarray, lumens: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Labels 1..len(seeds) over ``region``: watershed by immersion of the distance-to-edge, seeded by lumens.

    Levels go from the deepest distance down in 1-pixel steps; at each level every label grows (3×3
    geodesic dilation) into unlabelled region pixels at least that deep, so two vessels meet at their neck.
    """
    region = region.astype(bool)
    dist = cv2.distanceTransform(np.pad(region, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
    labels = np.zeros(region.shape, np.int32)
    for i, s in enumerate(seeds, start=1):
        labels[(lumens == s) & region] = i
    kernel = np.ones((3, 3), np.uint8)
    for level in np.arange(np.ceil(dist.max()), -1.0, -1.0):
        allowed = region & (dist >= level)
        grown = True
        while grown:
            grown = False
            for i in range(1, len(seeds) + 1):
                new = cv2.dilate((labels == i).astype(np.uint8), kernel).astype(bool) & allowed & (labels == 0)
                if new.any():
                    labels[new] = i
                    grown = True
    return labels


def _objects(labels: np.ndarray):
    """(bounding slices, label) of each nonzero label, in label order."""
    return [(sl, k) for k, sl in enumerate(ndimage.find_objects(labels), start=1) if sl is not None]


def _outline(crop: np.ndarray, downsample: float, origin_xy: tuple[float, float]) -> np.ndarray:
    """Largest external contour of a bool crop, traced at UPSAMPLE× resolution, as level-0 (x, y) px."""
    up = cv2.resize(crop.astype(np.uint8), None, fx=UPSAMPLE, fy=UPSAMPLE, interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    best = max(contours, key=cv2.contourArea)
    return mask_px_to_level0(best, downsample / UPSAMPLE, origin_xy)
