"""Level-0 pixels ↔ pixels of a mask at a downsample: one convention for every vessel module.

Pixel (col, row) of a mask at downsample ``d`` whose top-left pixel sits at level-0 ``origin_xy`` covers
level-0 x in [origin_x + col·d, origin_x + (col+1)·d); its centre is at origin + (col + 0.5, row + 0.5)·d.
"""

from __future__ import annotations

import numpy as np


def mask_px_to_level0(xy, downsample: float, origin_xy=(0.0, 0.0)) -> np.ndarray:
    """(N, 2) mask pixel coordinates (pixel centres at integers) → level-0 (x, y) px, float64."""
    return (np.asarray(xy, np.float64).reshape(-1, 2) + 0.5) * downsample + np.asarray(origin_xy, np.float64)


def level0_to_mask_px(xy, downsample: float, origin_xy=(0.0, 0.0)) -> np.ndarray:
    """Inverse of :func:`mask_px_to_level0`: level-0 (x, y) → mask pixel coordinates (centres at integers)."""
    return (np.asarray(xy, np.float64).reshape(-1, 2) - np.asarray(origin_xy, np.float64)) / downsample - 0.5
