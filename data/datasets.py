"""torch Datasets that stream tiles from slides without holding a slide in memory.

Items are uint8 CHW tensors (4× cheaper to pass between DataLoader workers than floats); normalise on the
batch. Each worker process opens its own slide handles (see :func:`calciscope.data.slides.cached_slide`).
"""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from calciscope.data.slides import cached_slide
from calciscope.data.tiling import TileGrid
from calciscope.data.tissue import tile_qc

Transform = Callable[[np.ndarray], np.ndarray]


def to_chw_uint8(tile: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(tile.transpose(2, 0, 1)))


class SlideTileDataset(Dataset):
    """The tiles of one slide's grid, optionally with an (N, L) label matrix.

    ``__getitem__`` returns ``(image, index)`` or ``(image, labels, index)`` where image is uint8 (3, H, W),
    after ``transform`` (an HWC uint8 → HWC uint8 function, e.g. an albumentations pipeline) when given.
    """

    def __init__(
        self,
        slide_path: str | Path,
        grid: TileGrid,
        *,
        slide_mpp: float | None = None,
        labels: np.ndarray | None = None,
        transform: Transform | None = None,
    ):
        if labels is not None and len(labels) != len(grid):
            raise ValueError(f"{len(labels)} label rows for {len(grid)} tiles")
        self.slide_path = Path(slide_path)
        self.slide_mpp = slide_mpp
        self.grid = grid
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.float32)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.grid)

    def read(self, i: int) -> np.ndarray:
        tile = self.grid.read(cached_slide(self.slide_path, self.slide_mpp), i)
        return self.transform(tile) if self.transform is not None else tile

    def __getitem__(self, i: int):
        image = to_chw_uint8(self.read(i))
        if self.labels is None:
            return image, i
        return image, self.labels[i], i


class MultiSlideTileDataset(Dataset):
    """Tiles of many slides as one dataset; items end with ``(slide_index, tile_index)``."""

    def __init__(self, datasets: Sequence[SlideTileDataset]):
        self.datasets = list(datasets)
        self.offsets = np.cumsum([0] + [len(d) for d in self.datasets]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = bisect.bisect_right(self.offsets, i) - 1
        return s, i - self.offsets[s]

    def __getitem__(self, i: int):
        s, t = self.locate(i)
        item = self.datasets[s][t]
        return (*item[:-1], s, t)


class GridTilesWithQC(Dataset):
    """(uint8 HWC tile, its ``tile_qc`` values, index) per tile of a grid, in grid order; decoded in DataLoader
    workers, each with its own slide handle. ``tile`` and ``predict`` read slides through it."""

    def __init__(self, path: Path, mpp: float | None, grid: TileGrid):
        self.path, self.mpp, self.grid = path, mpp, grid

    def __len__(self) -> int:
        return len(self.grid)

    def __getitem__(self, i: int):
        tile = self.grid.read(cached_slide(self.path, self.mpp), i)
        return tile, tile_qc(tile), i
