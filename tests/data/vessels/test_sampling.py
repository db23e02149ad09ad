"""vessels.sampling: tiles centred on vessels; small ones get one tile, large ones a ring of tiles on the wall."""

import numpy as np

from calciscope.data.slides import open_slide
from calciscope.data.tiling import TilingConfig
from calciscope.data.vessels.sampling import MAX_TILES_PER_VESSEL, vessel_grid, vessel_tile_centres


def _circle(cx, cy, r, n=64):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)


def test_a_vessel_that_fits_gets_one_centred_tile():
    centres = vessel_tile_centres(_circle(500, 400, 30), tile_side0=224)
    assert centres.shape == (1, 2) and np.allclose(centres[0], [500, 400], atol=0.5)


def test_a_large_vessel_gets_its_centre_and_tiles_along_its_wall():
    r, side = 300.0, 224
    centres = vessel_tile_centres(_circle(1000, 1000, r), tile_side0=side)
    assert np.allclose(centres[0], [1000, 1000], atol=0.5)
    ring = centres[1:]
    assert np.allclose(np.hypot(*(ring - 1000).T), r, rtol=0.02)  # on the outline
    gaps = np.hypot(*np.diff(np.vstack([ring, ring[:1]]), axis=0).T)
    assert gaps.max() <= 0.75 * side * 1.05  # consecutive wall tiles overlap: no part of the wall is missed
    huge = vessel_tile_centres(_circle(5000, 5000, 4000), tile_side0=side)
    assert len(huge) == MAX_TILES_PER_VESSEL


def test_vessel_grid_reads_tiles_centred_on_each_vessel(clean_phantom):
    from calciscope.data.vessels.truth import read_vessels

    vessels = read_vessels(clean_phantom.vessels_path)
    config = TilingConfig(mpp=1.0, tile_px=64)
    with open_slide(clean_phantom.path) as slide:
        grid, owner = vessel_grid(slide, [v.polygon for v in vessels], config)
        tile = grid.read(slide, 0)
    assert tile.shape == (64, 64, 3)
    assert sorted(set(owner.tolist())) == list(range(len(vessels)))
    first = grid.xy[owner == 0][0] + grid.size0_px / 2
    assert np.hypot(*(first - vessels[0].polygon.mean(0))) < 0.1 * grid.size0_px
