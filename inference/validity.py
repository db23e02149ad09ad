"""Does the model look at the lesion? Top tiles and saliency peaks checked against annotated lesion polygons.

For each finding with at least one annotated lesion on the slide, and each of its top tiles:

- *hit*: the tile overlaps a lesion polygon of that finding (the heatmap's top tiles land on lesions);
- *point*: for a hit, the tile's saliency peak lies inside a lesion polygon of that finding (the pointing game of
  Zhang et al. 2016, strict: no tolerance band around the polygon).

    from calciscope.data.annotations import read_geojson
    counts = lesion_hits(predict_slide(path), read_geojson(annotations_geojson))

Works on any annotated slide (QuPath GeoJSON with finding classes), phantom or real.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from calciscope.data.annotations import Annotations


@dataclass
class HitCounts:
    """Counts for one finding, summed over slides with ``+``."""

    top_tiles: int = 0  # top tiles on slides that have a lesion of this finding
    hits: int = 0  # of those, tiles that overlap such a lesion
    pointed: int = 0  # of the hits with a saliency map, peaks inside such a lesion
    with_peak: int = 0  # hits that have a saliency peak

    def __add__(self, other: HitCounts) -> HitCounts:
        return HitCounts(*(a + b for a, b in zip(self.astuple(), other.astuple())))

    def astuple(self) -> tuple[int, int, int, int]:
        return self.top_tiles, self.hits, self.pointed, self.with_peak

    @property
    def hit_rate(self) -> float:
        return self.hits / self.top_tiles if self.top_tiles else float("nan")

    @property
    def pointing(self) -> float:
        return self.pointed / self.with_peak if self.with_peak else float("nan")


def _lesion_window(rings_by_polygon: list[list[np.ndarray]], x: int, y: int, size: int) -> np.ndarray:
    """(size, size) uint8 mask of the lesion polygons inside the level-0 square at (x, y); holes stay empty."""
    mask = np.zeros((size, size), np.uint8)
    for rings in rings_by_polygon:
        shifted = [np.round(np.asarray(r, np.float64) - (x, y)).astype(np.int32) for r in rings]
        cv2.fillPoly(mask, shifted, 1)  # one call per polygon: the outer ring filled, its holes cut out
    return mask


def lesion_hits(result, annotations: Annotations) -> dict[str, HitCounts]:
    """Per finding of ``result`` (a ``SlideResult``) that has lesions in ``annotations``: its ``HitCounts``."""
    out: dict[str, HitCounts] = {}
    for finding, tiles in result.top_tiles.items():
        polygons = annotations.polygons.get(finding) or []
        if not polygons:
            continue
        counts = HitCounts()
        for t in tiles:
            counts.top_tiles += 1
            window = _lesion_window(polygons, t.x, t.y, t.size)
            if not window.any():
                continue
            counts.hits += 1
            if t.saliency_peak is not None:
                counts.with_peak += 1
                px = min(max(int(t.saliency_peak[0] - t.x), 0), t.size - 1)
                py = min(max(int(t.saliency_peak[1] - t.y), 0), t.size - 1)
                counts.pointed += int(window[py, px])
        out[finding] = counts
    return out


def lesion_tile_fraction(result, annotations: Annotations, finding: str) -> float:
    """Fraction of the slide's scored tiles that overlap a lesion of ``finding``: the hit rate of top tiles chosen
    at random, the chance level ``HitCounts.hit_rate`` is compared with."""
    polygons = annotations.polygons.get(finding) or []
    grid = result.grid
    if not polygons or len(grid) == 0:
        return 0.0
    size = grid.size0_px
    hits = sum(_lesion_window(polygons, int(x), int(y), size).any() for x, y in grid.xy)
    return hits / len(grid)
