"""vessel_detection: the streamed detection (maps band by band, never a whole-slide map) finds the vessels a cut of the
whole-slide maps finds, and keeps only a few rows of maps at a time."""

import cv2
import numpy as np
import pytest

from calciscope.data.slides import open_slide
from calciscope.data.tissue import detect_tissue
from calciscope.data.vessels.instances import fill_holes, scored_vessel_instances
from calciscope.model.demo import demo_model_dir
from calciscope.model.precision import choose_precision
from calciscope.model.segmenter import for_inference, load_segmenter, plan_windows, segment_slide
from calciscope.model.vessel_detection import VesselConfig, detect_vessels


@pytest.fixture(scope="module")
def demo_segmenter():
    model, card = load_segmenter(demo_model_dir() / "vessels")
    return for_inference(model), card


def _whole_map_vessels(slide, tissue, model, card, precision, floor):
    """The reference: whole-slide maps, the tissue region resized onto them, instances cut from the whole map
    (what detect_vessels did before it streamed)."""
    maps = segment_slide(slide, model, card, tissue, precision=precision)
    h, w = maps.maps["vessel"].shape
    k = max(int(round(2 * 40.0 / tissue.mask_mpp)), 1) | 1
    region = cv2.dilate(fill_holes(tissue.tissue | tissue.pen).astype(np.uint8),
                        cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    on = cv2.resize(region, (w, h), interpolation=cv2.INTER_NEAREST).astype(np.float32)
    instance = card.instance_config()
    outlines, means = scored_vessel_instances(maps.probability("vessel") * on, maps.probability("lumen") * on,
                                              maps.downsample, slide.mpp, instance, floor)
    strong = [p for p, m in zip(outlines, means) if m >= instance.min_mean_probability]
    faint = [p for p, m in zip(outlines, means) if m < instance.min_mean_probability]
    return strong, faint, h


def test_streamed_detection_finds_the_vessels_of_the_whole_map(demo_segmenter, vessel_phantoms):
    """Same count and centroids within 1 µm (in fact the same outlines, in the same order) as the whole-map cut, for
    the vessels and the faint candidates; no band held more than about one row of windows plus what a vessel open at
    its bottom edge needs."""
    model, card = demo_segmenter
    precision = choose_precision("auto", channels_last=True)
    for phantom in vessel_phantoms:
        with open_slide(phantom.path) as slide:
            tissue = detect_tissue(slide)
            vessels, faint, maps = detect_vessels(slide, tissue, model, card, VesselConfig(), candidates_at=0.3,
                                                  precision=precision)
            strong_ref, faint_ref, height = _whole_map_vessels(slide, tissue, model, card, precision, 0.3)
            plan = plan_windows(slide, card, tissue)
        assert len(vessels) == len(strong_ref) >= 3 and len(faint) == len(faint_ref)
        for found, reference in zip(vessels + faint, strong_ref + faint_ref):
            shift_um = np.hypot(*(found.polygon.mean(axis=0) - reference.mean(axis=0))) * slide.mpp
            assert shift_um <= 1.0
            assert np.array_equal(found.polygon, reference)
        assert [v.vessel_id for v in vessels + faint] == list(range(1, len(vessels) + len(faint) + 1))
        assert maps.n_windows == plan.n_windows and maps.peak_rows < min(height, 2 * plan.step)


def test_detection_keeps_the_maps_of_a_band_only(demo_segmenter, vessel_phantoms):
    """A band is handed on as soon as its row of windows has run: the detector never sees a map taller than one row
    of windows plus the rows it carries over."""
    from calciscope.model.segmenter import segment_bands

    model, card = demo_segmenter
    with open_slide(vessel_phantoms[0].path) as slide:
        tissue = detect_tissue(slide)
        plan = plan_windows(slide, card, tissue)
        seen = []
        bands = [(b.y, b.maps.shape) for b in segment_bands(slide, model, card, plan,
                                                            progress=lambda d, t: seen.append((d, t)))]
    assert [y for y, _ in bands] == [y for y, _ in plan.rows]
    assert all(shape[1] <= plan.step and shape[2] == plan.width for _, shape in bands)
    assert sum(shape[1] for _, shape in bands) == plan.height
    assert seen[-1] == (plan.n_windows, plan.n_windows) and [d for d, _ in seen] == sorted(d for d, _ in seen)
