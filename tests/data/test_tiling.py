"""calciscope.data.tiling and datasets: a micron-based grid with level-0 coordinates, streamed tiles."""

import cv2
import numpy as np
import openslide
import pytest
import torch
from helpers import true_tissue
from torch.utils.data import DataLoader

from calciscope.data.datasets import MultiSlideTileDataset, SlideTileDataset
from calciscope.data.slides import open_slide
from calciscope.data.tiling import TilingConfig, make_grid, plan_read
from calciscope.data.tissue import detect_tissue
from calciscope.errors import CalciscopeError, SlideError


@pytest.fixture(scope="module")
def phantom_grid(phantom):
    with open_slide(phantom.path) as slide:
        mask = detect_tissue(slide)
        grid = make_grid(slide, mask)
    return grid, mask


@pytest.mark.parametrize(
    "mpp, level, read_px, size0",
    [(0.5, 0, 224, 224), (1.0, 0, 448, 448), (2.0, 1, 224, 896), (3.0, 1, 336, 1344), (8.0, 2, 224, 3584)],
)
def test_tiles_are_read_from_the_finest_level_not_coarser_than_the_target(phantom, mpp, level, read_px, size0):
    with open_slide(phantom.path) as slide:
        assert plan_read(slide, TilingConfig(mpp=mpp)) == (level, read_px, size0)


def test_a_tile_equals_a_direct_openslide_read_when_no_resize_is_needed(phantom, phantom_grid):
    grid, _ = phantom_grid
    raw = openslide.OpenSlide(str(phantom.path))
    with open_slide(phantom.path) as slide:
        for i in (0, len(grid) // 2, len(grid) - 1):
            x, y = (int(v) for v in grid.xy[i])
            direct = np.asarray(raw.read_region((x, y), 0, (224, 224)))[..., :3]
            assert np.array_equal(grid.read(slide, i), direct)


def test_resized_tiles_match_an_area_downsample_of_level0(phantom):
    with open_slide(phantom.path) as slide:
        grid = make_grid(slide, detect_tissue(slide), TilingConfig(mpp=1.0, tile_px=128))
        tile = grid.read(slide, 0)
        x, y = (int(v) for v in grid.xy[0])
        reference = cv2.resize(slide.read_region((x, y), 0, (256, 256)), (128, 128), interpolation=cv2.INTER_AREA)
    assert tile.shape == (128, 128, 3)
    assert np.array_equal(tile, reference)


def test_grid_coordinates_are_level0_and_tiles_lie_on_tissue(phantom, phantom_grid):
    grid, _ = phantom_grid
    assert len(grid) > 20
    assert (grid.xy % 224 == 0).all()
    assert (grid.xy + 224 <= phantom.size_px).all()
    assert (grid.tissue_fraction >= 0.5).all()
    truth = true_tissue(phantom)  # downsample 16
    centres = (grid.xy + 112) // 16
    on_tissue = truth[centres[:, 1], centres[:, 0]]
    assert on_tissue.mean() >= 0.95


def test_overlap_shrinks_the_stride(phantom):
    with open_slide(phantom.path) as slide:
        mask = detect_tissue(slide)
        plain = make_grid(slide, mask, TilingConfig(min_tissue=0.0))
        overlapped = make_grid(slide, mask, TilingConfig(overlap_px=112, min_tissue=0.0))
    xs = np.unique(overlapped.xy[:, 0])
    assert np.diff(xs).min() == 112
    assert len(overlapped) > 3 * len(plain)


def test_min_tissue_filters_tiles(phantom):
    with open_slide(phantom.path) as slide:
        mask = detect_tissue(slide)
        loose = make_grid(slide, mask, TilingConfig(min_tissue=0.1))
        strict = make_grid(slide, mask, TilingConfig(min_tissue=0.9))
    assert len(strict) < len(loose)
    assert (strict.tissue_fraction >= 0.9).all()


def test_a_slide_coarser_than_the_target_is_refused(cmu_svs):
    with open_slide(cmu_svs) as slide, pytest.raises(SlideError, match="coarser than the 0.25 µm/px"):
        plan_read(slide, TilingConfig(mpp=0.25))


def test_invalid_tiling_settings_are_refused():
    with pytest.raises(CalciscopeError, match="overlap"):
        TilingConfig(tile_px=224, overlap_px=224)
    with pytest.raises(CalciscopeError, match="mpp"):
        TilingConfig(mpp=0)


def test_dataset_streams_the_same_tiles_through_worker_processes(phantom, phantom_grid):
    grid, _ = phantom_grid
    dataset = SlideTileDataset(phantom.path, grid)
    loader = DataLoader(dataset, batch_size=16, num_workers=2)
    images, indices = [], []
    for batch, index in loader:
        images.append(batch)
        indices.append(index)
    images, indices = torch.cat(images), torch.cat(indices)
    assert images.dtype == torch.uint8 and images.shape == (len(grid), 3, 224, 224)
    assert indices.tolist() == list(range(len(grid)))
    with open_slide(phantom.path) as slide:
        expected = torch.from_numpy(grid.read(slide, 5)).permute(2, 0, 1)
    assert torch.equal(images[5], expected)


def test_multi_slide_dataset_locates_each_tile(phantom, clean_phantom, phantom_grid):
    grid, _ = phantom_grid
    with open_slide(clean_phantom.path) as slide:
        other = make_grid(slide, detect_tissue(slide))
    labels = np.zeros((len(other), 4), np.uint8)
    labels[:, 2] = 1
    both = MultiSlideTileDataset([SlideTileDataset(phantom.path, grid), SlideTileDataset(clean_phantom.path, other, labels=labels)])
    assert len(both) == len(grid) + len(other)
    image, label, s, t = both[len(grid) + 3]
    assert (s, t) == (1, 3) and label.tolist() == [0, 0, 1, 0]
    image, s, t = both[len(grid) - 1]
    assert (s, t) == (0, len(grid) - 1)
    with pytest.raises(IndexError):
        both[len(both)]
