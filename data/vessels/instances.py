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
              keep: np.ndarray | None = None, origin: tuple[int, int] = (0, 0), objects: list | None = None
              ) -> tuple[list[np.ndarray], list[int]]:
    """Outlines of the labelled regions at least ``min_area_um2`` large (and, with ``keep``, a bool per label
    from 1, those it marks), in label order, and their labels; ``labels``' first pixel is map pixel ``origin``
    (column, row) (``objects``: ``labels``' bounding slices, when known)."""
    polygons, kept = [], []
    found = _objects(labels) if objects is None else [(sl, k) for k, sl in enumerate(objects, 1) if sl is not None]
    for sl, k in found:
        if keep is not None and not keep[k - 1]:
            continue
        crop = labels[sl] == k
        if np.count_nonzero(crop) * px_um2 < min_area_um2:
            continue
        polygons.append(_outline(crop, downsample, ((sl[1].start + origin[0]) * downsample,
                                                    (sl[0].start + origin[1]) * downsample)))
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
    masks = _Masks.of_probabilities(vessel, lumen, config)
    labels, _, objects = _instance_labels(masks, downsample * mpp, config)
    if not objects:
        return [], np.zeros(0)
    means = masks.means(labels, len(objects))
    polygons, kept = _polygons(labels, downsample, (mpp * downsample) ** 2, config.min_area_um2, keep=means >= floor,
                               objects=objects)
    return polygons, means[np.asarray(kept, int) - 1]


class _Masks:
    """What the cut reads of the vessel and lumen maps: seed pixels (either map ≥ ``threshold``), grown pixels (≥
    ``grow_threshold``, or seeds), lumen pixels (lumen ≥ ``threshold``), and each pixel's strength (the higher of the
    two maps, as float32 probabilities) where instances are measured."""

    def __init__(self, seeds: np.ndarray, grown: np.ndarray, lumen: np.ndarray, strength):
        self.seeds, self.grown, self.lumen, self._strength = seeds, grown, lumen, strength

    @classmethod
    def of_probabilities(cls, vessel: np.ndarray, lumen: np.ndarray, config: InstanceConfig) -> _Masks:
        seeds = (vessel >= config.threshold) | (lumen >= config.threshold)
        grown = (vessel >= config.grow_threshold) | (lumen >= config.grow_threshold) | seeds
        return cls(seeds, grown, lumen >= config.threshold, lambda where: np.maximum(vessel, lumen)[where])

    @classmethod
    def of_bytes(cls, vessel: np.ndarray, lumen: np.ndarray, config: InstanceConfig) -> _Masks:
        """From uint8 maps (probability × 255): the same masks and strengths as from ``map / 255.0`` in float32."""
        seeds = (vessel >= byte_threshold(config.threshold)) | (lumen >= byte_threshold(config.threshold))
        grow = byte_threshold(config.grow_threshold)
        grown = (vessel >= grow) | (lumen >= grow) | seeds
        return cls(seeds, grown, lumen >= byte_threshold(config.threshold),
                   lambda where: BYTE_PROBABILITY[np.maximum(vessel[where], lumen[where])])

    def means(self, labels: np.ndarray, n: int) -> np.ndarray:
        """(n,) float64 mean strength of labels 1..n, summed in raster order (as scipy.ndimage.mean sums)."""
        where = labels > 0
        index = labels[where]
        sums = np.bincount(index, weights=self._strength(where), minlength=n + 1)[1:]
        return sums / np.bincount(index, minlength=n + 1)[1:].astype(np.float64)


BYTE_PROBABILITY = np.arange(256, dtype=np.float32) / 255.0  # a uint8 map value as the float32 probability


def byte_threshold(threshold: float) -> int:
    """The least uint8 map value whose probability (``value / 255.0`` in float32) reaches ``threshold`` (256:
    none)."""
    hits = np.flatnonzero(BYTE_PROBABILITY >= threshold)
    return int(hits[0]) if len(hits) else 256


def _instance_labels(masks: _Masks, map_um: float, config: InstanceConfig
                     ) -> tuple[np.ndarray, list[_Part], list[tuple[slice, slice]]]:
    """(int32 instance labels, per label where its filled region starts and which part of it the label is, per label
    its bounding slices): the cut behind :func:`scored_vessel_instances`. Labels follow the filled regions in
    OpenCV's labelling order."""
    px_um2 = map_um**2
    n, comp = cv2.connectedComponents(masks.grown.astype(np.uint8), connectivity=8)
    holds_seed = np.zeros(n, bool)
    holds_seed[comp[masks.seeds]] = True  # hysteresis: regions holding a seed pixel
    holds_seed[0] = False
    filled = fill_holes(close(holds_seed[comp], config.close_um / map_um))
    lumen_mask = close(masks.lumen, config.lumen_close_um / map_um).astype(bool)
    lumens = _lumens(filled & lumen_mask, config.split_min_lumen_um2 / px_um2)
    labels, parts = _label_filled(filled, lumens, config.split_max_solidity, with_parts=True)
    return labels, parts, ndimage.find_objects(labels)


@dataclass(frozen=True)
class Instance:
    """A vessel instance cut from a band of the maps: its outline (level-0 px), its mean probability, the map rows it
    spans, and its place in a whole-map cut's order (OpenCV labels 8-connected regions in the raster order of their
    first 2 × 2 block; the parts of a split region follow their lumens)."""

    polygon: np.ndarray
    mean: float
    order: tuple[int, int, int]  # (block row, block column, part)
    rows: tuple[int, int]  # [top, bottom) in map rows


def reach_px(config: InstanceConfig, map_um: float) -> int:
    """How far (map px) the cut of one vessel depends on the maps around it: twice the larger closing radius (a
    closing's result depends on pixels within its diameter), with slack. Clusters of the grown mask farther apart
    than this cannot change each other's instances."""
    radius = max(max(int(round(d / map_um)), 1) | 1 for d in (config.close_um, config.lumen_close_um)) // 2
    return 2 * radius + 2


def cut_band(vessel: np.ndarray, lumen: np.ndarray, downsample: float, mpp: float,
             config: InstanceConfig = InstanceConfig(), floor: float = 0.0, *, row0: int = 0,
             cut_top: bool = False, cut_bottom: bool = False) -> tuple[list[Instance], int | None]:
    """The instances of a band of uint8 maps (probability × 255; map rows ``row0`` on, the slide's full width) that
    the band settles, and the first map row the next band must start at (None without ``cut_bottom``).

    ``cut_top`` / ``cut_bottom``: the maps go on above / below the band. An instance is settled when its cluster (a
    connected region of the grown mask dilated by :func:`reach_px`, holes filled) keeps ``reach_px`` + 2 rows away
    from every cut edge: everything its cut depends on is then inside the band, and it comes out exactly as
    :func:`scored_vessel_instances` on the whole map (of ``map / 255.0``) gives it: same outline, same mean, and
    ``order`` says where in that list. Clusters reaching the bottom edge are left to the next band, which starts
    above them; clusters reaching the top edge were settled by an earlier band."""
    map_um = mpp * downsample
    reach = reach_px(config, map_um)
    # only the columns that hold grown pixels, and a margin of glass either side, can hold or change an instance
    cols = np.flatnonzero((np.maximum(vessel, lumen) >= byte_threshold(config.grow_threshold)).any(axis=0))
    c0, c1 = (max(int(cols[0]) - 2 * reach - 4, 0), min(int(cols[-1]) + 2 * reach + 5, vessel.shape[1])) \
        if len(cols) else (0, 1)
    masks = _Masks.of_bytes(vessel[:, c0:c1], lumen[:, c0:c1], config)
    dilated = cv2.dilate(masks.grown.astype(np.uint8), np.ones((2 * reach + 1,) * 2, np.uint8))
    settled, next_row = settled_clusters(dilated, reach + 2, cut_top, cut_bottom)
    next_row = None if next_row is None else next_row + row0
    if not len(cols):
        return [], next_row
    labels, parts, objects = _instance_labels(masks, map_um, config)
    if not objects:
        return [], next_row
    wanted = np.array([bool(settled[sl][labels[sl] == k].any()) for k, sl in enumerate(objects, start=1)])
    means = masks.means(labels, len(objects))
    polygons, kept = _polygons(labels, downsample, map_um**2, config.min_area_um2, keep=wanted & (means >= floor),
                               origin=(c0, row0), objects=objects)
    return [Instance(poly, float(means[k - 1]), parts[k - 1].order(row0, c0),
                     (objects[k - 1][0].start + row0, objects[k - 1][0].stop + row0))
            for poly, k in zip(polygons, kept)], next_row


def settled_clusters(mask: np.ndarray, margin: int, cut_top: bool, cut_bottom: bool) -> tuple[np.ndarray, int | None]:
    """(bool: pixels of ``mask``'s clusters the band settles, the first band row a cluster left to the next band
    reaches, minus ``margin`` + 1; None without ``cut_bottom``). A cluster is a connected region of ``mask`` with its holes
    filled; ``margin`` rows along each cut edge count as part of the mask, so a cluster near an edge, or enclosed by
    one that crosses it, is not settled."""
    h = mask.shape[0]
    marked = np.asarray(mask, np.uint8).copy()
    top, bottom = (margin if cut_top else 0), (margin if cut_bottom else 0)
    marked[:top] = 1
    if bottom:
        marked[h - bottom :] = 1
    n, lab, stats, _ = cv2.connectedComponentsWithStats(fill_holes(marked).astype(np.uint8), connectivity=8)
    edge_top = np.unique(lab[:top]) if top else np.zeros(0, np.int32)
    edge_bottom = np.unique(lab[h - bottom :]) if bottom else np.zeros(0, np.int32)
    open_ = np.zeros(n, bool)
    open_[0] = open_[edge_top] = open_[edge_bottom] = True
    settled = ~open_[lab]
    next_row = None
    if cut_bottom:
        edge_bottom = edge_bottom[edge_bottom > 0]
        # the next band's top edge rows must clear these clusters by a row, or they would touch them again
        next_row = max(int(stats[edge_bottom, cv2.CC_STAT_TOP].min()) - margin - 1, 0)
    return settled, next_row


def label_instances(wall: np.ndarray, min_lumen_px: float = 1.0) -> np.ndarray:
    """int32 instance labels (0 = background) of filled vessels, touching ones split at their lumens."""
    filled = fill_holes(wall)
    lumens = _lumens(filled & ~wall.astype(bool), min_lumen_px)
    return _label_filled(filled, lumens)


def _label_filled(filled: np.ndarray, lumens: np.ndarray, max_solidity: float = 1.0, with_parts: bool = False):
    """Instance labels of a filled vessel mask, a region with several labelled lumens split between them (only a
    region whose solidity is below ``max_solidity``: two touching round vessels make a waisted, non-convex shape).
    ``with_parts``: also, per label, where its filled region starts (``_Part``) and which part of it the label is."""
    _, comp = cv2.connectedComponents(filled.astype(np.uint8), connectivity=8)
    out = np.zeros(filled.shape, np.int32)
    parts: list[_Part] = []
    next_label = 1
    for sl, k in _objects(comp):
        region = comp[sl] == k
        seeds = np.unique(lumens[sl][region])
        seeds = seeds[seeds > 0]
        n = 1
        if len(seeds) < 2 or (max_solidity < 1.0 and _solidity(region) >= max_solidity):
            out[sl][region] = next_label
        else:
            split = _split(region, lumens[sl], seeds)
            out[sl][region] = split[region] + (next_label - 1)
            n = len(seeds)
        next_label += n
        if with_parts:
            starts = [int(np.argmax(row)) + sl[1].start if row.any() else 1 << 40 for row in region[:2]]
            parts += [_Part(sl[0].start, starts[0], starts[1] if len(starts) > 1 else 1 << 40, i) for i in range(n)]
    return (out, parts) if with_parts else out


@dataclass(frozen=True)
class _Part:
    """Where a label's filled region starts (its top row, the first column of that row and of the next) and which
    part of the region (split at its lumens) the label is."""

    top: int
    first_col: int
    next_col: int
    part: int

    def order(self, row0: int, col0: int = 0) -> tuple[int, int, int]:
        """(block row, block column, part) in whole-map coordinates, the labels starting at map pixel (``col0``,
        ``row0``): the region's first 2 × 2 block in raster order (a block pairs an even whole-map row with the odd
        one below, an even column with the odd one right of it)."""
        row = self.top + row0
        col = min(self.first_col, self.next_col) if row % 2 == 0 else self.first_col
        return row // 2, (col + col0) // 2, self.part


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
    keep = np.arange(len(stats), dtype=np.int32)
    keep[stats[:, cv2.CC_STAT_AREA] < min_px] = 0
    return keep[lab]


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
