"""measure: diameters, wall thickness and area in µm from outlines and from wall masks."""

import json
import math

import cv2
import numpy as np
import pytest

from calciscope.data.vessels.measure import measure_vessel, measure_vessel_mask, shape_of
from calciscope.data.vessels.truth import lumen_ring, read_vessels


def test_phantom_outer_diameters(vessel_phantoms):
    """The phantom's ``outer_diameter_um`` / ``outer_major_um`` are the minor / major axis of the ellipse fitted
    to its written outer ring, as shape_of measures them: measured median relative error 0.006 % (rounding to
    0.01 µm only; max 0.07 %, a 5 µm capillary; major axes within 0.005 µm). "The" diameter (minor axis) is
    ≤ the major axis and the equivalent-circle diameter lies between the two."""
    for slide in vessel_phantoms:
        vessels = read_vessels(slide.vessels_path)
        props = [f["properties"] for f in json.loads(slide.vessels_path.read_text())["features"]]
        shapes = [shape_of(v.polygon, slide.mpp) for v in vessels]
        errors = [abs(s.minor_um / v.outer_diameter_um - 1) for s, v in zip(shapes, vessels)]
        assert max(errors) < 0.002 and np.median(errors) < 0.0005
        for s, p in zip(shapes, props):
            assert s.major_um == pytest.approx(p["outer_major_um"], abs=0.006)
            assert s.diameter_um == s.minor_um <= s.ecd_um * 1.01 and s.ecd_um <= s.major_um * 1.01


def test_wall_thickness_is_half_the_difference_of_minor_axes(vessel_phantoms):
    """Also the phantom's own numbers: its lumen hole gives lumen_diameter_um and wall_thickness_um (±0.01 µm)."""
    slide = vessel_phantoms[0]
    for v in read_vessels(slide.vessels_path):
        g = measure_vessel(v.polygon, slide.mpp, lumen_ring(v))
        assert g.wall_thickness_um == pytest.approx((g.outer_diameter_um - g.lumen_diameter_um) / 2)
        assert 0 < g.lumen_diameter_um < g.outer_diameter_um and g.area_um2 > g.lumen.area_um2
        assert g.lumen_diameter_um == pytest.approx(v.lumen_diameter_um, abs=0.006)
        assert g.wall_thickness_um == pytest.approx(v.wall_thickness_um, abs=0.011)
    assert measure_vessel(v.polygon, slide.mpp).wall_thickness_um is None  # no lumen, no wall thickness


def test_mask_of_a_drawn_ring_measures_its_radii():
    """Outer radius 20 and lumen radius 12 mask px at downsample 2, mpp 0.5 µm/px: 40 µm and 24 µm (±2 µm;
    outlines run through the centres of the wall's edge pixels)."""
    wall = np.zeros((120, 120), np.uint8)
    cv2.circle(wall, (60, 60), 20, 1, thickness=-1)
    cv2.circle(wall, (60, 60), 12, 0, thickness=-1)
    g = measure_vessel_mask(wall, mpp=0.5, downsample=2, origin_xy=(1000, 2000))
    assert g.outer_diameter_um == pytest.approx(40, abs=2)
    assert g.lumen_diameter_um == pytest.approx(24, abs=2)
    assert g.wall_thickness_um == pytest.approx(8, abs=2)
    assert measure_vessel_mask(np.zeros((8, 8), np.uint8), 0.5) is None


def test_small_polygons_use_the_min_area_rectangle():
    square = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], float)
    s = shape_of(square, mpp=0.5)
    assert (s.area_um2, s.minor_um, s.major_um) == pytest.approx((25.0, 5.0, 5.0))
    assert s.ecd_um == pytest.approx(2 * math.sqrt(25 / math.pi))
    with pytest.raises(ValueError, match=">= 3 points"):
        shape_of(square[:2], mpp=0.5)
