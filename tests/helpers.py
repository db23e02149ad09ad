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


def real_scan_variants(svs: Path, out: Path) -> dict[str, tuple[Path, float | None]]:
    """The real H&E scan ``svs`` made over as a lab or a converter might: not new real slides, but none may pass as
    in-distribution. name -> (file, the µm/px to give predict or None: the file's own).

    ``jpeg_q30``: re-encoded as JPEG quality 30 (tiled TIFF); ``restained``: the same stain concentrations under other
    stain vectors (its Macenko H and E vectors each moved, as another lab's haematoxylin and eosin); ``half_res``:
    resampled to half the resolution (twice the µm/px, recorded); ``png``: lossless PNG, mpp given; ``mpp_0.25``: the
    scan read as if its pixels were 0.25 µm (a wrong mpp: tissue at half its size)."""
    import cv2
    import tifffile

    from calciscope.data.slides import open_slide
    from calciscope.data.stain import macenko_stains

    out.mkdir(parents=True, exist_ok=True)
    with open_slide(svs) as slide:
        rgb, mpp = slide.read_region((0, 0), 0, slide.dimensions), slide.mpp

    def tiff(name: str, image: np.ndarray, mpp_: float, quality: int = 90) -> Path:
        path = out / f"{name}.tif"
        with tifffile.TiffWriter(path) as tif:
            tif.write(image, photometric="rgb", tile=(256, 256), compression="jpeg", compressionargs={"level": quality},
                      resolution=(1e4 / mpp_, 1e4 / mpp_), resolutionunit="CENTIMETER", metadata=None)
        return path

    stains, _ = macenko_stains(rgb)
    od = -np.log((rgb.reshape(-1, 3).astype(np.float64) + 1) / 240.0)
    concentrations = np.maximum(od @ np.linalg.pinv(stains), 0)
    moved = stains + np.array([[0.12, -0.12, 0.10], [0.18, -0.16, 0.02]])
    moved /= np.linalg.norm(moved, axis=1, keepdims=True)
    restained = np.clip(np.round(240.0 * np.exp(-(concentrations @ moved)) - 1), 0, 255).astype(np.uint8)
    half = cv2.resize(rgb, (rgb.shape[1] // 2, rgb.shape[0] // 2), interpolation=cv2.INTER_AREA)
    Image.fromarray(rgb).save(out / "png.png")
    return {"jpeg_q30": (tiff("jpeg_q30", rgb, mpp, 30), None),
            "restained": (tiff("restained", restained.reshape(rgb.shape), mpp), None),
            "half_res": (tiff("half_res", half, 2 * mpp), None),
            "png": (out / "png.png", mpp),
            "mpp_0.25": (svs, 0.25)}

