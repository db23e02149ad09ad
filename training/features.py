"""``calciscope features``: cache tile embeddings of slides with a frozen encoder, for attention-MIL and tile heads.

    extract_features(["scans/"], "uni", "/models/UNI/pytorch_model.bin", "features/uni")

Per slide, the tissue tiles (``mpp`` / ``tile_px``; default the encoder's recommended 0.5 µm/px and its tile size)
go through the encoder once; ``DIR/<key>.safetensors`` holds the embeddings (N, D) and their level-0 ``x, y``
(``level0_xy``), the key covering the slide's bytes, the encoder's weights and preprocessing, and the tiling, so a
stopped run resumes slide by slide and nothing is encoded twice. ``DIR/features.json`` names the encoder and tiling
(a folder written by another encoder is refused), ``DIR/index.csv`` maps slide ids to files. Training reads the same
folder: ``data.source: slide_labels``, ``data.encoder``, ``data.encoder_weights``, ``data.cache_dir: DIR``.
"""

from __future__ import annotations

import glob
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from calciscope.data.slides import find_slides, is_slide_path, slide_id_from_path, slides_among
from calciscope.data.tiling import TilingConfig
from calciscope.errors import CalciscopeError
from calciscope.model.encoders import ENCODERS
from calciscope.model.precision import resolve_device
from calciscope.training.mil import build_bag_cache, load_encoder
from calciscope.training.sources import read_manifest


def list_slides(inputs: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """(slide paths, slide ids) from files, folders (their slides), globs, or a manifest CSV (``path`` column)."""
    paths: list[Path] = []
    ids: list[str] | None = []
    for item in map(str, inputs):
        path = Path(item)
        if path.suffix.lower() == ".csv" and path.is_file():
            records = read_manifest(path, [])
            paths += [r.path for r in records]
            ids += [r.slide_id for r in records]
            continue
        if path.is_dir() and not is_slide_path(path):
            found = find_slides(path)
        elif any(c in item for c in "*?["):
            found = slides_among(sorted(glob.glob(item, recursive=True)))
        elif path.exists():
            found = [path]
        else:
            raise CalciscopeError(f"{path}: no such slide, folder, glob match or manifest")
        paths += found
        ids += [slide_id_from_path(p) for p in found]
    if not paths:
        raise CalciscopeError(f"no slides in {', '.join(map(str, inputs))}")
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise CalciscopeError(f"slide id(s) {twice[:3]} appear twice; list each slide once (or use a manifest with "
                              "a slide_id column)")
    return paths, ids


def extract_features(inputs: Sequence[str | Path], encoder: str, weights: str | Path | None, out: str | Path, *,
                     mpp: float | None = None, tile_px: int | None = None, min_tissue: float = 0.5,
                     batch_size: int = 64, workers: int = 2, device: str = "auto",
                     progress: Callable[[str], None] | None = None) -> list[Path]:
    """Cache the embeddings of every slide in ``inputs`` under ``out``; returns the cache files in slide order.

    Everything is checked before anything is written: the slides exist, the encoder name is known, its weights file
    matches it (names and shapes), and ``out`` was not written by another encoder or tiling."""
    paths, ids = list_slides(inputs)
    spec = ENCODERS.get(encoder)
    tiling = TilingConfig(mpp=mpp or (spec.mpp if spec else 0.5), tile_px=tile_px or (spec.tile_px if spec else 224),
                          min_tissue=min_tissue)
    target = resolve_device(device)
    model, info = load_encoder(encoder, weights=weights, device=target)
    start = time.perf_counter()

    def report(n: int, total: int) -> None:
        if progress is not None:
            progress(f"features: {n}/{total} slides ({ids[n - 1]}), {time.perf_counter() - start:.0f} s")

    return build_bag_cache(paths, (model, info), tiling, out, batch_size=batch_size, workers=workers,
                           progress=report, device=target, slide_ids=ids)
