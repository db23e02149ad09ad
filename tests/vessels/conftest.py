"""Phantoms for the vessel tests: 2048² (1 × 1 mm at 0.5 µm/px), no artifacts, fixed seeds.

``vessel_phantoms`` = the all-findings phantom ``pos`` (seed 11, 11 vessels) and the shared no-findings
``clean_phantom`` (seed 12, 4 vessels).
"""

from __future__ import annotations

import pytest

ALL_FINDINGS = {"medial_calcification": 1, "small_vessel_calcification": 1, "thrombosis": 1, "vasculitis": 1}


@pytest.fixture(scope="session")
def vessel_phantoms(tmp_path_factory, clean_phantom):
    from calciscope.data.synthetic import generate_slide

    pos = generate_slide(tmp_path_factory.mktemp("vessel_phantoms"), "pos", ALL_FINDINGS, size_px=2048, seed=11,
                         artifacts=False)
    return [pos, clean_phantom]
