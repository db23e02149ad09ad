"""calciscope.data.slides: one interface over OpenSlide, tiffslide and Pillow, with explicit units."""

import pickle

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from calciscope.data.slides import open_slide, safe_id, slide_id_from_path
from calciscope.errors import SlideError


def test_real_aperio_scan_opens_with_its_metadata(cmu_svs):
    with open_slide(cmu_svs) as slide:
        assert slide.backend == "openslide"
        assert slide.vendor == "aperio"
        assert slide.dimensions == (2220, 2967)
        assert slide.mpp == pytest.approx(0.499)
        assert slide.objective_power == 20
        region = slide.read_region((1000, 1500), 0, (64, 32))
    assert region.shape == (32, 64, 3) and region.dtype == np.uint8


def test_phantom_opens_as_pyramid_with_its_mpp(phantom):
    with open_slide(phantom.path) as slide:
        raw = openslide.OpenSlide(str(phantom.path))
        assert raw.properties["openslide.vendor"] == "generic-tiff"
        assert slide.mpp == pytest.approx(phantom.mpp)
        assert slide.level_count >= 3
        assert slide.dimensions == (phantom.size_px, phantom.size_px)
        assert slide.level_downsamples[:3] == pytest.approx((1, 4, 16))
        assert np.array_equal(slide.read_region((100, 200), 1, (50, 40)),
                              np.asarray(raw.read_region((100, 200), 1, (50, 40)))[..., :3])


def test_pixels_outside_the_slide_are_white(cmu_svs):
    with open_slide(cmu_svs) as slide:
        region = slide.read_region((2200, 2950), 0, (64, 64))
    assert (region[-20:, -20:] == 255).all()


def test_tiff_that_openslide_rejects_falls_back_to_tiffslide(tmp_path):
    path = tmp_path / "stripped.tif"  # OpenSlide needs tiled TIFFs; tiffslide reads stripped ones
    image = np.full((300, 400, 3), 230, np.uint8)
    tifffile.imwrite(path, image, photometric="rgb", resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    with open_slide(path) as slide:
        assert slide.backend == "tiffslide"
        assert slide.mpp == pytest.approx(0.25)
        assert slide.dimensions == (400, 300)


def test_plain_image_needs_an_mpp_and_the_override_supplies_it(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.fromarray(np.full((120, 160, 3), 200, np.uint8)).save(path)
    with open_slide(path) as slide:
        assert slide.backend == "pillow" and slide.level_count == 1
        with pytest.raises(SlideError, match=r"photo\.jpg: has no resolution \(mpp\).*--slide-mpp"):
            slide.mpp
    with open_slide(path, mpp=0.5) as slide:
        assert slide.mpp == 0.5 and slide.info().mpp_source == "override"


def test_slide_pickles_by_path_so_each_worker_opens_its_own_handle(cmu_svs):
    slide = open_slide(cmu_svs, mpp=0.5)
    payload = pickle.dumps(slide)
    assert len(payload) < 1000  # the path and override, not pixels or a handle
    clone = pickle.loads(payload)
    assert clone._handle is not slide._handle
    assert clone.mpp == 0.5
    assert np.array_equal(clone.read_region((500, 500), 0, (16, 16)), slide.read_region((500, 500), 0, (16, 16)))


def test_thumbnail_comes_from_the_pyramid_not_the_stored_label_or_thumbnail(cmu_svs):
    with open_slide(cmu_svs) as slide:
        thumb = slide.thumbnail(300)
        assert not hasattr(slide, "associated_images")
    assert thumb.shape[0] == 300 and abs(thumb.shape[1] - round(300 * 2220 / 2967)) <= 1


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("missing", "no such file"),
        ("empty", "is empty"),
        ("text_named_svs", "not a readable slide"),
        ("directory", "is a directory"),
        ("truncated_tiff", ""),
        ("huge", "too large"),
    ],
)
def test_bad_files_raise_one_line_naming_the_file(bad_inputs, kind, reason):
    path = bad_inputs[kind]
    with pytest.raises(SlideError) as info:
        with open_slide(path) as slide:  # truncation may only show when pixels are decoded
            slide.read_downsampled(8)
            for level in range(slide.level_count):
                w, h = slide.level_dimensions[level]
                slide.read_region((0, 0), level, (w, h))
    message = str(info.value)
    assert str(path) in message and reason in message
    assert "\n" not in message


def test_ids_from_file_names_are_safe_directory_names():
    assert slide_id_from_path("/data/case 12 (HE).svs") == "case_12_HE"
    assert slide_id_from_path("../../etc/passwd.tiff") == "passwd"
    assert safe_id("../..") == "slide"
    assert safe_id(".hidden") == "hidden"
