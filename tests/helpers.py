"""Plain helpers the tests share (import them as ``from helpers import ...``: tests/ is on sys.path, and
``from conftest import`` finds whichever conftest.py was imported first)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def read_rgb(path: Path, level0_xy: tuple[int, int], size_px: tuple[int, int]) -> np.ndarray:
    """An RGB region read with OpenSlide directly (independent of calciscope's reader)."""
    import openslide

    slide = openslide.OpenSlide(str(path))
    try:
        return np.asarray(slide.read_region(level0_xy, 0, size_px).convert("RGB"))
    finally:
        slide.close()


def true_tissue(phantom) -> np.ndarray:
    """The phantom's ground-truth tissue mask (bool, downsample 16 of level 0)."""
    return np.asarray(Image.open(phantom.tissue_mask_path)) > 0


def run_cli(capsys, *args):
    """Run the console entry point in-process; return (exit code, stdout, stderr)."""
    from calciscope.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err
