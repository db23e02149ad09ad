"""Vessel-centred tiles (``sampling: vessels``): tiles at the model's mpp centred on vessels instead of a grid.

A vessel that fits in a tile (major axis ≤ ``FIT_FRACTION`` of the tile side) gets one tile centred on it. A larger
one gets that centre tile (its lumen: thrombus) plus tiles centred on points spaced about ``RING_SPACING`` tile sides
apart along its outer outline (its wall: calcification, inflammation), at most ``MAX_TILES_PER_VESSEL`` in all.
Tiles come back as a :class:`calciscope.data.tiling.TileGrid` (``colrow`` = (vessel index, tile number within the
vessel)), so every reader of grids (training datasets, ``predict``'s tile stream) reads them unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from calciscope.data.slides import Slide
from calciscope.data.tiling import TileGrid, TilingConfig, plan_read

FIT_FRACTION = 0.6
RING_SPACING = 0.75
MAX_TILES_PER_VESSEL = 16


def vessel_tile_centres(polygon: np.ndarray, tile_side0: float) -> np.ndarray:
    """(K, 2) level-0 tile centres for one vessel outline ((N, 2) level-0 px); the first is the centroid."""
    poly = np.asarray(polygon, np.float64).reshape(-1, 2)
    m = cv2.moments(poly.astype(np.float32))
    centre = np.array([m["m10"] / m["m00"], m["m01"] / m["m00"]]) if m["m00"] > 0 else poly.mean(axis=0)
    (_, _), (a, b), _ = cv2.minAreaRect(poly.astype(np.float32))
    if max(a, b) <= FIT_FRACTION * tile_side0:
        return centre[None]
    closed = np.vstack([poly, poly[:1]])
    seg = np.hypot(*np.diff(closed, axis=0).T)
    perimeter = float(seg.sum())
    n = int(min(MAX_TILES_PER_VESSEL - 1, max(3, np.ceil(perimeter / (RING_SPACING * tile_side0)))))
    at = np.concatenate([[0.0], np.cumsum(seg)])
    s = np.arange(n) * perimeter / n
    ring = np.stack([np.interp(s, at, closed[:, 0]), np.interp(s, at, closed[:, 1])], axis=1)
    return np.vstack([centre, ring])


def vessel_grid(slide: Slide, polygons: Sequence[np.ndarray], config: TilingConfig) -> tuple[TileGrid, np.ndarray]:
    """(grid of vessel-centred tiles, (M,) index of the vessel each tile belongs to)."""
    level, read_px, size0 = plan_read(slide, config)
    centres, owner, number = [], [], []
    for i, poly in enumerate(polygons):
        c = vessel_tile_centres(poly, size0)
        centres.append(c)
        owner += [i] * len(c)
        number += list(range(len(c)))
    xy = (np.round(np.vstack(centres) - size0 / 2).astype(np.int64) if centres else np.zeros((0, 2), np.int64))
    owner_arr = np.asarray(owner, np.int64)
    grid = TileGrid(slide_id=slide.slide_id, slide_mpp=slide.mpp, config=config, level=level, read_px=read_px,
                    size0_px=size0, xy=xy, colrow=np.stack([owner_arr, np.asarray(number, np.int64)], axis=1)
                    .astype(np.int32).reshape(-1, 2), tissue_fraction=np.ones(len(xy), np.float32),
                    n_candidates=len(xy))
    return grid, owner_arr
