"""match: IoU by rasterisation, one-to-one Hungarian matching at IoU ≥ 0.5, recall, precision, size errors."""

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
