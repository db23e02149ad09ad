"""Smooth random fields the phantom is painted from: blurred noise, the collagen texture, and their sampling.

Fields are held at low resolution (LR_DS, MR_DS) and upsampled per strip, seamlessly, by the renderer.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

LR_DS = 16  # downsample of the smooth layout fields
MR_DS = 2  # downsample of the texture fields (collagen fibres, blotches)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-blurred white noise (float32)."""
    n = rng.standard_normal(shape, dtype=np.float32)
    if sigma_px > 0.3:
        n = cv2.GaussianBlur(n, (0, 0), sigma_px, borderType=cv2.BORDER_REFLECT)
    n -= n.mean()
    n /= n.std() + 1e-6
    return n


def upsample_rows(lowres: np.ndarray, ds: int, y0: int, y1: int, width: int) -> np.ndarray:
    """Rows [y0, y1) x [0, width) of `lowres` bilinearly upsampled by `ds`; seamless across calls."""
    a = max(y0 // ds - 2, 0)
    b = min(-(-y1 // ds) + 2, lowres.shape[0])
    sub = np.ascontiguousarray(lowres[a:b])
    big = cv2.resize(sub, (sub.shape[1] * ds, (b - a) * ds), interpolation=cv2.INTER_LINEAR)
    off = y0 - a * ds
    return big[off : off + (y1 - y0), :width]


def sample_points(lowres: np.ndarray, ds: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear value of an upsampled low-res field at level-0 points (same convention as upsample_rows)."""
    mx = ((np.asarray(x, np.float32) + 0.5) / ds - 0.5).reshape(-1, 1)
    my = ((np.asarray(y, np.float32) + 0.5) / ds - 0.5).reshape(-1, 1)
    return cv2.remap(lowres, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE).reshape(-1)


def collagen_field(rng: np.random.Generator, shape: tuple[int, int], mpp_mr: float, angle: float) -> np.ndarray:
    """Wavy collagen-bundle texture in [0, 1] at MR resolution: streaks ~2 um wide, ~25 um long, with clefts."""
    hm, wm = shape
    d = int(math.ceil(math.hypot(hm, wm))) + 8
    streak = smooth_noise(rng, (d, d), 0.0)
    streak = cv2.GaussianBlur(streak, (0, 0), sigmaX=7.0 / mpp_mr, sigmaY=0.9 / mpp_mr)
    streak /= streak.std() + 1e-6
    yy, xx = np.mgrid[0:hm, 0:wm].astype(np.float32)
    xx -= wm / 2
    yy -= hm / 2
    amp = 18.0 / mpp_mr
    dx = smooth_noise(rng, (hm // 8 + 2, wm // 8 + 2), 50.0 / mpp_mr / 8) * amp
    dy = smooth_noise(rng, (hm // 8 + 2, wm // 8 + 2), 50.0 / mpp_mr / 8) * amp
    dx = cv2.resize(dx, (wm, hm))[:hm, :wm]
    dy = cv2.resize(dy, (wm, hm))[:hm, :wm]
    ca, sa = math.cos(angle), math.sin(angle)
    mx = xx * ca + yy * sa + d / 2 + dx
    my = -xx * sa + yy * ca + d / 2 + dy
    del xx, yy, dx, dy
    out = cv2.remap(streak, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return (1.0 / (1.0 + np.exp(-4.0 * (out + 0.3)))).astype(np.float32)

