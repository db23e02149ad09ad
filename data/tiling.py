"""A grid of tissue tiles at a target resolution, with coordinates at level 0.

A tile is ``tile_px`` × ``tile_px`` pixels at ``mpp`` µm/px (default 224 px at 0.5 µm/px = 112 µm). It is read
from the pyramid level closest to, but not coarser than, the target, and resized only when that level's
resolution differs from the target. Every coordinate is level-0 pixels (x, y, w, h).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator

import cv2
import numpy as np

from calciscope.data.slides import Slide
from calciscope.data.tissue import TissueMask
from calciscope.errors import CalciscopeError, SlideError


@dataclass(frozen=True)
class TilingConfig:
    """Where tiles are cut. ``mpp`` in µm/px of the output tile, sizes in output pixels."""

    mpp: float = 0.5
    tile_px: int = 224
    overlap_px: int = 0
    min_tissue: float = 0.5  # fraction of the tile the tissue mask must cover
    mpp_tolerance: float = 0.10  # a slide up to 10% coarser than ``mpp`` is upsampled; coarser is an error

    def __post_init__(self):
        if self.mpp <= 0:
            raise CalciscopeError(f"tile mpp must be positive, got {self.mpp}")
        if self.tile_px < 8:
            raise CalciscopeError(f"tile size must be at least 8 px, got {self.tile_px}")
        if not 0 <= self.overlap_px < self.tile_px:
            raise CalciscopeError(f"overlap must be in [0, tile_px), got {self.overlap_px}")
        if not 0 <= self.min_tissue <= 1:
            raise CalciscopeError(f"min tissue fraction must be in [0, 1], got {self.min_tissue}")


@dataclass(frozen=True)
class Tile:
    """One tile: level-0 top-left (x, y) and level-0 size (w, h) in pixels, and its grid position."""

    index: int
    x: int
    y: int
    w: int
    h: int
    col: int
    row: int
    tissue_fraction: float


@dataclass
class TileGrid:
    """The kept tiles of one slide and how to read them (which level, how many pixels there)."""

    slide_id: str
    slide_mpp: float
    config: TilingConfig
    level: int  # pyramid level tiles are read from
    read_px: int  # side of the region read at ``level``, before resizing to ``config.tile_px``
    size0_px: int  # side of a tile at level 0
    xy: np.ndarray  # (N, 2) int64, level-0 top-left of each tile
    colrow: np.ndarray  # (N, 2) int32 grid position
    tissue_fraction: np.ndarray  # (N,) float32
    n_candidates: int  # grid positions inspected before the tissue filter

    def __len__(self) -> int:
        return len(self.xy)

    def __getitem__(self, i: int) -> Tile:
        x, y = (int(v) for v in self.xy[i])
        col, row = (int(v) for v in self.colrow[i])
        return Tile(i, x, y, self.size0_px, self.size0_px, col, row, float(self.tissue_fraction[i]))

    def __iter__(self) -> Iterator[Tile]:
        return (self[i] for i in range(len(self)))

    def read(self, slide: Slide, i: int) -> np.ndarray:
        """Tile ``i`` as RGB uint8 (tile_px, tile_px, 3)."""
        x, y = self.xy[i]
        region = slide.read_region((int(x), int(y)), self.level, (self.read_px, self.read_px))
        return resize_to(region, self.config.tile_px)

    def describe(self) -> dict:
        return {
            "level": self.level,
            "read_px": self.read_px,
            "size0_px": self.size0_px,
            "n_tiles": len(self),
            "n_candidates": self.n_candidates,
            **{f"tiling_{k}": v for k, v in asdict(self.config).items()},
        }


def plan_read(slide: Slide, config: TilingConfig) -> tuple[int, int, int]:
    """(level, read_px, size0_px): the level to read a tile from, its side there, its side at level 0."""
    downsample = config.mpp / slide.mpp
    if downsample < 1 / (1 + config.mpp_tolerance):
        raise SlideError(
            slide.path,
            f"resolution {slide.mpp:g} µm/px is coarser than the {config.mpp:g} µm/px asked for "
            f"(tiles would be upsampled more than {config.mpp_tolerance:.0%})",
        )
    size0 = max(1, int(round(config.tile_px * downsample)))
    level = slide.best_level_for_downsample(downsample)
    read_px = max(1, int(round(size0 / slide.level_downsamples[level])))
    return level, read_px, size0


def make_grid(slide: Slide, mask: TissueMask | None, config: TilingConfig = TilingConfig()) -> TileGrid:
    """Tiles on a regular grid over the slide, kept where the tissue mask covers ≥ ``min_tissue`` of the tile."""
    level, read_px, size0 = plan_read(slide, config)
    stride0 = max(1, int(round((config.tile_px - config.overlap_px) * config.mpp / slide.mpp)))
    width, height = slide.dimensions
    n_cols = (width - size0) // stride0 + 1 if width >= size0 else 0
    n_rows = (height - size0) // stride0 + 1 if height >= size0 else 0
    cols, rows = np.meshgrid(np.arange(n_cols), np.arange(n_rows))  # row-major order: rows top to bottom
    colrow = np.stack([cols.ravel(), rows.ravel()], axis=1).astype(np.int32)
    xy = colrow.astype(np.int64) * stride0
    if mask is None:  # no mask: every grid position is a tile
        fraction = np.ones(len(xy), np.float32)
        keep = np.ones(len(xy), bool)
    else:
        fraction = coverage(mask.tissue, mask.downsample, xy, size0)
        keep = fraction >= config.min_tissue if config.min_tissue > 0 else fraction > 0
    return TileGrid(
        slide_id=slide.slide_id,
        slide_mpp=slide.mpp,
        config=config,
        level=level,
        read_px=read_px,
        size0_px=size0,
        xy=xy[keep],
        colrow=colrow[keep],
        tissue_fraction=fraction[keep].astype(np.float32),
        n_candidates=len(xy),
    )


def coverage(mask: np.ndarray, downsample: float, xy: np.ndarray, size0: int) -> np.ndarray:
    """Fraction of each level-0 square (x, y, size0) covered by ``mask`` (given at ``downsample`` of level 0).

    Uses an integral image, so the cost is one pass over the mask plus O(1) per tile.
    """
    if len(xy) == 0:
        return np.zeros(0, np.float32)
    integral = cv2.integral(mask.astype(np.uint8), sdepth=cv2.CV_64F)  # (h+1, w+1)
    h, w = mask.shape
    x0 = np.clip(np.round(xy[:, 0] / downsample).astype(np.int64), 0, w)
    y0 = np.clip(np.round(xy[:, 1] / downsample).astype(np.int64), 0, h)
    x1 = np.clip(np.round((xy[:, 0] + size0) / downsample).astype(np.int64), 0, w)
    y1 = np.clip(np.round((xy[:, 1] + size0) / downsample).astype(np.int64), 0, h)
    x1 = np.maximum(x1, np.minimum(x0 + 1, w))
    y1 = np.maximum(y1, np.minimum(y0 + 1, h))
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return (total / area).astype(np.float32)


def resize_to(region: np.ndarray, tile_px: int) -> np.ndarray:
    """Resize a square region to ``tile_px`` (area filter when shrinking); a no-op at the right size."""
    if region.shape[0] == tile_px and region.shape[1] == tile_px:
        return region
    shrink = region.shape[0] > tile_px
    return cv2.resize(region, (tile_px, tile_px), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
