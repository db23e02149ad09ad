"""calciscope.data.tissue: tissue mask at low resolution and QC flags."""

import json

import cv2
import numpy as np
import pytest
from helpers import true_tissue

from calciscope.data.slides import open_slide
from calciscope.data.tissue import QCConfig, TissueConfig, detect_tissue, slide_qc, tile_qc
from calciscope.errors import SlideError


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / float((a | b).sum())


def _mask_at(mask: np.ndarray, shape_hw) -> np.ndarray:
    return cv2.resize(mask.astype(np.uint8), (shape_hw[1], shape_hw[0]), interpolation=cv2.INTER_NEAREST) > 0


def _polygons(geojson_path, name):
    doc = json.loads(geojson_path.read_text())
    return [[np.asarray(r, float) for r in f["geometry"]["coordinates"]]
            for f in doc["features"] if f["properties"]["classification"]["name"] == name]


@pytest.mark.parametrize("which", ["phantom", "clean_phantom"])
def test_tissue_mask_matches_phantom_truth(request, which):
    from calciscope.data.annotations import rasterize

    phantom = request.getfixturevalue(which)
    truth = true_tissue(phantom)
    # Tissue under ink is left out by design (nothing under ink can be analysed), so it is left out of the truth.
    truth &= ~rasterize(_polygons(phantom.artifacts_path, "pen_mark"), truth.shape, 16).astype(bool)
    with open_slide(phantom.path) as slide:
        mask = detect_tissue(slide)
    assert _iou(_mask_at(mask.tissue, truth.shape), truth) >= 0.9


def test_pen_on_glass_is_not_tissue_and_raises_the_pen_flag(phantom, clean_phantom):
    from calciscope.data.annotations import rasterize

    with open_slide(phantom.path) as slide:
        mask = detect_tissue(slide)
    pens = _polygons(phantom.artifacts_path, "pen_mark")
    assert pens, "the positive phantom is drawn with pen marks"
    pen_px = rasterize(pens, mask.tissue.shape, mask.downsample).astype(bool)
    on_glass = pen_px & ~_mask_at(true_tissue(phantom), mask.tissue.shape)
    assert on_glass.sum() > 0
    assert (mask.tissue & on_glass).sum() <= 0.05 * on_glass.sum()
    assert "pen_marks" in slide_qc(mask).flags
    with open_slide(clean_phantom.path) as slide:
        assert "pen_marks" not in slide_qc(detect_tissue(slide)).flags


def test_real_scan_tissue_is_found_and_glass_is_not(cmu_svs):
    with open_slide(cmu_svs) as slide:
        mask = detect_tissue(slide)
    h, w = mask.tissue.shape
    assert 0.3 < mask.tissue.mean() < 0.55  # the skin strip covers about 40% of this region
    assert not mask.tissue[: h // 10, w // 10 : w // 3].any()  # the glass above the tissue, top left
    assert mask.tissue[int(h * 0.8), int(w * 0.4)]  # dermis in the lower half


def test_black_border_and_blank_glass_are_not_tissue(tmp_path):
    image = np.full((2048, 2048, 3), 240, np.uint8)
    image[:, :120] = 15  # cover-slip edge / black border
    path = tmp_path / "border.png"
    cv2.imwrite(str(path), image)
    with open_slide(path, mpp=0.5) as slide, pytest.raises(SlideError, match="border.png: no tissue found"):
        detect_tissue(slide)


def test_mask_resolution_is_in_microns(cmu_svs):
    with open_slide(cmu_svs) as slide:
        coarse = detect_tissue(slide, TissueConfig(mask_mpp=16.0))
        fine = detect_tissue(slide, TissueConfig(mask_mpp=8.0))
    assert coarse.tissue.shape[0] == pytest.approx(fine.tissue.shape[0] / 2, abs=1)
    assert coarse.tissue_area_mm2 == pytest.approx(fine.tissue_area_mm2, rel=0.15)


def test_tile_qc_separates_sharp_from_blurred_tissue(cmu_svs):
    with open_slide(cmu_svs) as slide:
        sharp = slide.read_region((900, 1400), 0, (224, 224))
    blurred = cv2.GaussianBlur(sharp, (0, 0), 4)
    threshold = QCConfig().blur_laplacian_var
    assert tile_qc(sharp)["blur_var"] > 5 * threshold
    assert tile_qc(blurred)["blur_var"] < threshold
    glass = np.full((224, 224, 3), 242, np.uint8)
    assert tile_qc(glass)["background_fraction"] == 1.0
