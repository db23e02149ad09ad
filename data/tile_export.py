"""The ``calciscope tile`` job: one slide → ``OUT/<slide_id>/`` with tiles.csv, qc.json, thumbnail.png [, tiles/].

Every tile is read once (in DataLoader workers when ``workers > 0``) for its QC; nothing appears in the output
folder until the whole slide succeeded (the folder is built under a temporary name and renamed).
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from torch.utils.data import DataLoader

from calciscope._version import __version__
from calciscope.data.annotations import LabelingConfig, read_geojson, tile_labels
from calciscope.data.datasets import GridTilesWithQC
from calciscope.data.slides import Slide, open_slide
from calciscope.data.tiling import TileGrid, TilingConfig, make_grid
from calciscope.data.tissue import QC_COLUMNS, QCConfig, TissueConfig, TissueMask, detect_tissue, slide_qc
from calciscope.io import atomic_dir, child_dir, write_json

Progress = Callable[[int, int], None]


@dataclass
class TileJobResult:
    slide_id: str
    out_dir: Path
    n_tiles: int
    qc_flags: list[str]


def _as_list(batch):
    return batch


def iter_tiles_with_qc(path: Path, mpp: float | None, grid: TileGrid, workers: int = 0, batch_size: int = 32):
    """Yield (index, tile RGB, qc dict) in grid order, decoding in ``workers`` processes."""
    loader = DataLoader(
        GridTilesWithQC(path, mpp, grid),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_as_list,
        persistent_workers=False,
    )
    for batch in loader:
        yield from ((i, tile, qc) for tile, qc, i in batch)


def tile_slide(
    slide_path: str | Path,
    out_root: str | Path,
    *,
    tiling: TilingConfig = TilingConfig(),
    tissue: TissueConfig = TissueConfig(),
    qc: QCConfig = QCConfig(),
    slide_mpp: float | None = None,
    annotations: str | Path | None = None,
    labeling: LabelingConfig = LabelingConfig(),
    save_tiles: bool = False,
    workers: int = 0,
    progress: Progress | None = None,
) -> TileJobResult:
    """Tile one slide and write its tile table, QC and thumbnail (and optionally the tiles) atomically."""
    slide_path = Path(slide_path)
    with open_slide(slide_path, mpp=slide_mpp) as slide:
        mask = detect_tissue(slide, tissue)
        grid = make_grid(slide, mask, tiling)
        labels = None
        if annotations is not None:
            labels = tile_labels(read_geojson(annotations, labeling), grid, slide.dimensions, labeling)
        final = child_dir(out_root, slide.slide_id)
        with atomic_dir(final) as tmp:
            tile_dir = tmp / "tiles"
            if save_tiles:
                tile_dir.mkdir()
            qc_rows = np.zeros((len(grid), len(QC_COLUMNS)), np.float64)
            for done, (i, tile, tq) in enumerate(iter_tiles_with_qc(slide_path, slide_mpp, grid, workers), 1):
                qc_rows[i] = [tq[c] for c in QC_COLUMNS]
                if save_tiles:
                    x, y = grid.xy[i]
                    cv2.imwrite(str(tile_dir / f"x{x}_y{y}.png"), tile[..., ::-1])
                if progress is not None:
                    progress(done, len(grid))
            blurry = float((qc_rows[:, 0] < qc.blur_laplacian_var).mean()) if len(grid) else None
            slide_quality = slide_qc(mask, qc, blurry_tile_fraction=blurry)
            _write_tiles_csv(tmp / "tiles.csv", grid, qc_rows, labels, labeling.labels)
            write_json(tmp / "qc.json", _qc_document(slide, grid, mask, slide_quality, tiling, tissue, qc))
            cv2.imwrite(str(tmp / "thumbnail.png"), overview(slide, mask, grid)[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 1])
    return TileJobResult(slide.slide_id, final, len(grid), slide_quality.flags)


def _write_tiles_csv(path: Path, grid: TileGrid, qc_rows: np.ndarray, labels, label_names) -> None:
    header = ["tile_index", "x", "y", "w", "h", "level", "col", "row", "tissue_fraction", *QC_COLUMNS]
    if labels is not None:
        header += list(label_names)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i in range(len(grid)):
            x, y = (int(v) for v in grid.xy[i])
            col, row = (int(v) for v in grid.colrow[i])
            row_out = [i, x, y, grid.size0_px, grid.size0_px, grid.level, col, row, f"{grid.tissue_fraction[i]:.4f}"]
            row_out += [f"{v:.4f}" for v in qc_rows[i]]
            if labels is not None:
                row_out += [int(v) for v in labels[i]]
            writer.writerow(row_out)


def _qc_document(slide: Slide, grid: TileGrid, mask: TissueMask, quality, tiling, tissue, qc) -> dict:
    info = asdict(slide.info())
    return {
        "schema_version": 1,
        "calciscope_version": __version__,
        "slide": info,
        "tiles": grid.describe(),
        "qc": quality.to_dict(),
        "config": {"tiling": asdict(tiling), "tissue": asdict(tissue), "qc": asdict(qc)},
        "mask_mpp": mask.mask_mpp,
    }


def overview(slide: Slide, mask: TissueMask, grid: TileGrid | None, max_px: int = 1024) -> np.ndarray:
    """The slide thumbnail with the tissue outline (green) and the kept tiles (blue squares) drawn on it."""
    thumb = slide.thumbnail(max_px).copy()
    th, tw = thumb.shape[:2]
    scale = tw / slide.dimensions[0]  # thumbnail px per level-0 px
    tissue = cv2.resize(mask.tissue.astype(np.uint8), (tw, th), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(tissue, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    if grid is not None and len(grid):
        side = max(1, int(round(grid.size0_px * scale)))
        for x, y in grid.xy:
            x0, y0 = int(x * scale), int(y * scale)
            cv2.rectangle(thumb, (x0, y0), (x0 + side - 1, y0 + side - 1), (40, 70, 200), 1)
    cv2.drawContours(thumb, contours, -1, (0, 170, 0), max(1, tw // 400))
    return thumb
