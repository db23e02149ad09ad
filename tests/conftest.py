"""Shared fixtures: the real scanner file, small phantoms (made once per session) and bad inputs."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from calciscope.data.slides import open_slide

FIXTURES = Path(__file__).parent / "fixtures"
ALL_FINDINGS = {"medial_calcification": 1, "small_vessel_calcification": 1, "thrombosis": 1, "vasculitis": 1}
NO_FINDINGS = {name: 0 for name in ALL_FINDINGS}


@pytest.fixture(scope="session")
def cmu_svs() -> Path:
    """Aperio CMU-1-Small-Region.svs (CC0, OpenSlide test data): 2220 × 2967 px, 0.499 µm/px, one level."""
    return FIXTURES / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("phantoms")


@pytest.fixture(scope="session")
def phantom(phantom_dir):
    """A 2048² phantom (1 × 1 mm at 0.5 µm/px) with every finding drawn and artifacts on.

    The shared phantoms keep the classic drawing: the facts tests quote about them (vessel counts, lumens, what the
    shipped demo model scores) were measured on it, and the demo model learned it. Until the demo is retrained on
    the randomised phantom, tests/data/test_phantom_looks.py and benchmarks/bench_transfer.py cover that style."""
    from calciscope.data.synthetic import generate_slide

    return generate_slide(phantom_dir, "pos", ALL_FINDINGS, size_px=2048, seed=11, artifacts=True, style="classic")


@pytest.fixture(scope="session")
def clean_phantom(phantom_dir):
    """A 2048² phantom with no findings and no artifacts (classic drawing, as ``phantom``)."""
    from calciscope.data.synthetic import generate_slide

    return generate_slide(phantom_dir, "neg", NO_FINDINGS, size_px=2048, seed=12, artifacts=False, style="classic")


@pytest.fixture(scope="session")
def vessel_phantoms(tmp_path_factory, clean_phantom):
    """The all-findings phantom ``pos`` without artifacts (seed 11, 11 vessels) and ``clean_phantom`` (seed 12,
    4 vessels): what the vessel tests measure against (classic drawing, as ``phantom``)."""
    from calciscope.data.synthetic import generate_slide

    pos = generate_slide(tmp_path_factory.mktemp("vessel_phantoms"), "pos", ALL_FINDINGS, size_px=2048, seed=11,
                         artifacts=False, style="classic")
    return [pos, clean_phantom]


@pytest.fixture(scope="session")
def bad_inputs(tmp_path_factory, phantom) -> dict[str, Path]:
    """One file (or folder) per kind of bad input the foundation must refuse with one clear line."""
    root = tmp_path_factory.mktemp("bad")
    files = {}
    files["missing"] = root / "missing.svs"
    files["empty"] = root / "empty.svs"
    files["empty"].write_bytes(b"")
    files["text_named_svs"] = root / "notes.svs"
    files["text_named_svs"].write_text("this is not a slide\n")
    files["directory"] = root / "folder.svs"
    files["directory"].mkdir()
    data = phantom.path.read_bytes()
    files["truncated_tiff"] = root / "truncated.tiff"
    files["truncated_tiff"].write_bytes(data[: len(data) // 3])
    blank = np.full((512, 512, 3), 243, np.uint8)
    files["no_tissue"] = root / "blank.png"
    Image.fromarray(blank).save(files["no_tissue"])
    files["no_mpp"] = root / "no_mpp.png"
    with open_slide(phantom.path) as slide:
        Image.fromarray(slide.thumbnail(512)).save(files["no_mpp"])
    files["huge"] = root / "huge.png"
    files["huge"].write_bytes(_png_claiming_size(60_000, 60_000))
    return files


def _png_claiming_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims ``width`` × ``height`` (a decompression-bomb shaped file)."""
    import io

    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, format="PNG")
    png = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    png[ihdr : ihdr + 4] = width.to_bytes(4, "big")
    png[ihdr + 4 : ihdr + 8] = height.to_bytes(4, "big")
    crc = zlib.crc32(bytes(png[12 : ihdr + 13])) & 0xFFFFFFFF
    png[ihdr + 13 : ihdr + 17] = crc.to_bytes(4, "big")
    return bytes(png)

