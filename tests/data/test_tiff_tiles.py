"""calciscope.data.tiff_tiles: a tiled TIFF's regions decoded from its tiles, pixel for pixel OpenSlide's."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tifffile

from calciscope.data.slides import open_slide


def _regions(slide, n: int, seed: int):
    """``n`` random reads (level-0 top-left, level, size) over every level, a third of them reaching past an edge,
    and at levels above 0 some off the level's pixel lattice (those stay OpenSlide's)."""
    rng = np.random.default_rng(seed)
    for k in range(n):
        level = int(rng.integers(slide.level_count))
        ds = slide.level_downsamples[level]
        w_l, h_l = slide.level_dimensions[level]
        w, h = int(rng.integers(1, 600)), int(rng.integers(1, 600))
        x, y = int(rng.integers(-200, w_l + 50) * ds), int(rng.integers(-200, h_l + 50) * ds)
        if level and k % 5 == 0:
            x += 1
        yield (x, y), level, (w, h)


def _assert_same_pixels(path, n: int = 150, seed: int = 0) -> tuple[int, ...]:
    with open_slide(path) as direct, open_slide(path, direct_tiles=False) as backend:
        assert backend.direct_tile_levels == ()
        for xy, level, size in _regions(direct, n, seed):
            got, want = direct.read_region(xy, level, size), backend.read_region(xy, level, size)
            assert np.array_equal(got, want), (path.name, xy, level, size)
        return direct.direct_tile_levels


def test_phantom_pyramid_is_read_from_its_tiles_with_openslides_pixels(phantom):
    levels = _assert_same_pixels(phantom.path)
    assert levels == tuple(range(open_slide(phantom.path).level_count))  # JPEG in YCbCr, every level


def test_aperio_scan_is_read_from_its_tiles_with_openslides_pixels(cmu_svs):
    assert _assert_same_pixels(cmu_svs, seed=1) == (0,)  # JPEG in RGB with Aperio's 240 px tiles


def test_lossless_tiff_is_read_from_its_tiles_and_an_unsupported_layout_through_openslide(tmp_path):
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (700, 900, 3), dtype=np.uint8)
    lzw, planar = tmp_path / "lzw.tif", tmp_path / "planar.tif"
    opts = {"tile": (256, 256), "resolution": (1e4 / 0.5, 1e4 / 0.5), "resolutionunit": "CENTIMETER", "metadata": None}
    tifffile.imwrite(lzw, image, photometric="rgb", compression="lzw", **opts)
    tifffile.imwrite(planar, image.transpose(2, 0, 1), photometric="rgb", planarconfig="separate", **opts)
    assert _assert_same_pixels(lzw, seed=3) == (0,)
    with open_slide(lzw) as slide:
        assert np.array_equal(slide.read_region((0, 0), 0, (900, 700)), image)
    assert _assert_same_pixels(planar, seed=4) == ()  # planar samples: OpenSlide reads them


def test_threads_reading_at_once_get_the_same_pixels_as_one_reader(phantom):
    with open_slide(phantom.path) as slide:
        slide.enlarge_tile_cache(1 << 20)  # a small cache: tiles are evicted and decoded again while others read
        reads = list(_regions(slide, 60, seed=5))
        alone = [slide.read_region(*r) for r in reads]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda r: slide.read_region(*r), reads * 3))
    for k, got in enumerate(together):
        assert np.array_equal(got, alone[k % len(reads)])


def test_a_closed_slide_refuses_to_read(phantom):
    slide = open_slide(phantom.path)
    slide.close()
    with pytest.raises(Exception, match="closed"):
        slide.read_region((0, 0), 0, (8, 8))


def test_slides_dropped_without_closing_give_their_file_descriptors_back(phantom):
    import gc
    import os

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    open_slide(phantom.path).close()
    gc.collect()
    before = open_fds()
    for _ in range(50):  # a slide cache evicting its handles drops them without close()
        slide = open_slide(phantom.path)
        assert slide.direct_tile_levels
        slide.read_region((0, 0), 0, (64, 64))
        del slide
    gc.collect()
    assert open_fds() <= before + 2
