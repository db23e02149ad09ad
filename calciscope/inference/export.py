"""A ``SlideResult`` on disk: ``OUT/<slide_id>/`` with result.json, tiles.csv, heatmap_<finding>.png,
saliency/<finding>/tile_<x>_<y>.png, annotations.geojson (QuPath) and report.html, written under a temporary name
and renamed when complete, so a folder is there whole or not at all.
"""

from __future__ import annotations

import csv
import json
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from calciscope.data.slides import safe_id
from calciscope.inference.heatmap import contours_level0, heatmap_image
from calciscope.inference.saliency import overlay
from calciscope.io import atomic_dir, child_dir, write_json

if TYPE_CHECKING:
    from calciscope.inference.predict import SlideResult

# QuPath classification colours per finding (RGB); other labels get a colour from their name
FINDING_COLOURS = {
    "medial_calcification": (128, 0, 200),
    "small_vessel_calcification": (40, 90, 230),
    "thrombosis": (220, 30, 30),
    "vasculitis": (240, 150, 0),
}


def write_outputs(result: SlideResult, out_root: str | Path) -> Path:
    """Write every output of one slide atomically into ``out_root/<slide_id>/``; returns that folder."""
    final = child_dir(out_root, result.slide_id)
    with atomic_dir(final) as tmp:
        images = {"thumbnail.png": result.thumbnail}
        for j, label in enumerate(result.labels):
            top_xy = np.array([(t.x, t.y) for t in result.top_tiles.get(label, [])], dtype=np.int64)
            kind = "attention" if result.score_kind == "attention" else "tile probability"
            images[f"heatmap_{safe_id(label)}.png"] = heatmap_image(
                result.thumbnail, result.slide.level_dimensions[0][0], result.grid.xy, result.grid.size0_px,
                result.tile_scores[:, j], title=f"{label}: {kind}", highlight=top_xy)
        for tiles in result.top_tiles.values():
            for t in tiles:
                saliency = result.saliency_maps.get((t.finding, t.rank))
                if saliency is not None and t.saliency_file:
                    images[t.saliency_file] = overlay(result.top_tile_images[(t.finding, t.rank)], saliency)
        for name, rgb in images.items():
            _write_png(tmp / name, rgb)
        write_json(tmp / "result.json", result.to_dict())
        write_tiles_csv(tmp / "tiles.csv", result)
        write_json(tmp / "annotations.geojson", qupath_features(result))
        from calciscope.inference.report import render_report

        (tmp / "report.html").write_text(render_report(result, images), encoding="utf-8")
    return final


def _write_png(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, 3]):
        raise OSError(f"cannot write {path}")


def write_tiles_csv(path: Path, result: SlideResult) -> None:
    """One row per scored tile: level-0 square, tissue fraction, QC, per-finding probability (or attention)."""
    grid = result.grid
    kind = "attention" if result.score_kind == "attention" else "p"
    header = ["tile_index", "x", "y", "w", "h", "level", "tissue_fraction",
              *("blur_var", "background_fraction", "pen_fraction", "dark_fraction"),
              *(f"{kind}_{label}" for label in result.labels)]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i in range(len(grid)):
            x, y = (int(v) for v in grid.xy[i])
            writer.writerow([i, x, y, grid.size0_px, grid.size0_px, grid.level, f"{grid.tissue_fraction[i]:.4f}",
                             *(f"{v:.4f}" for v in result.tile_qc[i]),
                             *(f"{v:.6f}" for v in result.tile_scores[i])])


def _colour(label: str) -> list[int]:
    if label in FINDING_COLOURS:
        return list(FINDING_COLOURS[label])
    h = int.from_bytes(label.encode("utf-8"), "little") % 360
    hsv = np.uint8([[[h // 2, 200, 220]]])
    return [int(v) for v in cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0]]


def _square(x: int, y: int, side: int) -> list[list[list[int]]]:
    return [[[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]]


def qupath_features(result: SlideResult) -> dict[str, Any]:
    """A GeoJSON FeatureCollection QuPath imports (File → Import objects, or drag and drop), level-0 pixels:

    - one ``tile`` object per scored tile, measurements ``p_<finding>`` (or ``attention_<finding>``), classified
      as the finding whose score is furthest above its threshold (unclassified when none reaches it);
    - per finding, ``annotation`` contours around the tiles at or above the finding's threshold (tile models),
      measurements: the slide probability, the number of tiles and their highest probability.
    """
    grid = result.grid
    scores = result.tile_scores
    kind = "attention" if result.score_kind == "attention" else "p"
    thresholds = np.array([result.thresholds[label] for label in result.labels])
    features = []
    for i in range(len(grid)):
        x, y = (int(v) for v in grid.xy[i])
        props: dict[str, Any] = {
            "objectType": "tile",
            "name": f"tile {i}",
            "measurements": {f"{kind}_{label}": round(float(scores[i, j]), 6) for j, label in enumerate(result.labels)},
        }
        if kind == "p":
            margin = scores[i] / np.maximum(thresholds, 1e-6)
            j = int(np.argmax(margin))
            if margin[j] >= 1:
                props["classification"] = {"name": result.labels[j], "color": _colour(result.labels[j])}
        features.append({"type": "Feature", "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{result.sha256}/tile/{i}")),
                         "geometry": {"type": "Polygon", "coordinates": _square(x, y, grid.size0_px)},
                         "properties": props})
    if kind == "p":
        dims = result.slide.level_dimensions[0]
        for j, label in enumerate(result.labels):
            positive = scores[:, j] >= thresholds[j]
            for n, rings in enumerate(contours_level0(grid.xy, grid.size0_px, positive, dims)):
                features.append({
                    "type": "Feature",
                    "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{result.sha256}/{label}/{n}")),
                    "geometry": {"type": "Polygon", "coordinates": [[[round(x, 1), round(y, 1)] for x, y in r]
                                                                    for r in rings]},
                    "properties": {
                        "objectType": "annotation",
                        "name": f"{label} (calciscope)",
                        "classification": {"name": label, "color": _colour(label)},
                        "measurements": {"slide_probability": round(result.probabilities[label], 6),
                                         "n_tiles_over_threshold": int(positive.sum()),
                                         "max_tile_probability": round(float(scores[positive, j].max()), 6)},
                    },
                })
    return {"type": "FeatureCollection", "features": features}


def load_result(out_dir: str | Path) -> dict[str, Any]:
    """result.json of a slide output folder, parsed."""
    return json.loads((Path(out_dir) / "result.json").read_text(encoding="utf-8"))
