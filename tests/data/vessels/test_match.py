"""match: IoU by rasterisation, one-to-one Hungarian matching (IoU ≥ 0.5, or a centroid within 4 µm for true vessels
under 20 µm), recall (and IoU-only recall), precision, size errors."""

import math

import numpy as np
import pytest

from calciscope.data.vessels.match import match_vessels, polygon_iou
from calciscope.data.vessels.truth import read_vessels


def _square(x, y, side):
    return np.array([[x, y], [x + side, y], [x + side, y + side], [x, y + side]], float)


def test_iou_of_overlapping_squares_and_small_outlines():
    assert polygon_iou(_square(0, 0, 100), _square(50, 0, 100)) == pytest.approx(1 / 3, abs=0.02)
    assert polygon_iou(_square(0, 0, 4), _square(2, 2, 4)) == pytest.approx(4 / 28, abs=0.02)  # sub-pixel canvas
    assert polygon_iou(_square(0, 0, 10), _square(20, 0, 10)) == 0


def test_phantom_truth_matches_itself_and_shifted_copies(vessel_phantoms):
    slide = vessel_phantoms[0]
    truth = [v.polygon for v in read_vessels(slide.vessels_path)]
    same = match_vessels(truth[::-1], truth, slide.mpp)
    assert (same.recall, same.precision, same.count_error, same.median_diameter_error) == (1, 1, 0, 0)
    assert sorted((i, j) for i, j, _ in same.pairs) == sorted((len(truth) - 1 - j, j) for j in range(len(truth)))
    far = match_vessels([p + 10_000 for p in truth], truth, slide.mpp)
    assert (far.recall, far.precision, far.pairs) == (0, 0, [])


def test_one_detection_matches_at_most_one_truth_and_counts_are_relative():
    truth = [_square(0, 0, 100), _square(100, 0, 100)]
    detected = [_square(0, 0, 200), _square(0, 0, 100), _square(500, 500, 10)]
    result = match_vessels(detected, truth, mpp=0.5)
    assert [(i, j) for i, j, _ in result.pairs] == [(1, 0)]  # the 200 px box covers each truth at IoU 0.25
    assert (result.recall, result.precision, result.count_error) == (0.5, pytest.approx(1 / 3), 0.5)
    resized = match_vessels([_square(0, 0, 110)], truth[:1], mpp=0.5, true_diameters_um=[50.0])
    assert resized.median_diameter_error == pytest.approx(0.1, abs=1e-5)
    empty = match_vessels([], truth, mpp=0.5)
    assert empty.recall == 0 and math.isnan(empty.precision) and empty.count_error == -1


def _circle(cx, cy, r_px, n=48):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.column_stack([cx + r_px * np.cos(t), cy + r_px * np.sin(t)])


def test_small_true_vessels_are_found_by_centroid_within_4um_and_large_ones_only_by_iou():
    mpp = 0.5  # µm/px
    capillary = _circle(100, 100, 2.5 / mpp)  # 5 µm
    arteriole = _circle(400, 400, 15 / mpp)  # 30 µm
    # an 8 µm outline 1 µm off the capillary's centre: IoU < 0.5, centroid 1 µm away -> found
    small_det = _circle(100 + 1 / mpp, 100, 4 / mpp)
    assert polygon_iou(small_det, capillary) < 0.5
    # an outline of the arteriole's size 9 µm off its centre: IoU < 0.5, centroid close, but the vessel is 30 µm
    large_det = _circle(400 + 9 / mpp, 400, 15 / mpp)
    assert polygon_iou(large_det, arteriole) < 0.5
    m = match_vessels([large_det, small_det], [capillary, arteriole], mpp)
    assert [(i, j) for i, j, _ in m.pairs] == [(1, 0)] and m.recall == 0.5 and m.recall_iou == 0
    # 5 µm away is too far, and IoU alone (centroid_um=0) finds neither
    assert match_vessels([_circle(100 + 5 / mpp, 100, 2.5 / mpp)], [capillary], mpp).recall == 0
    assert match_vessels([small_det], [capillary], mpp, centroid_um=0).recall == 0


def test_centroid_matching_stays_one_to_one():
    mpp = 0.5
    capillary = _circle(100, 100, 3 / mpp)
    twins = [_circle(100 + 1 / mpp, 100, 3 / mpp), _circle(100 - 1 / mpp, 100, 3 / mpp)]
    m = match_vessels(twins, [capillary], mpp)
    assert len(m.pairs) == 1 and m.precision == 0.5 and m.count_error == 1.0
