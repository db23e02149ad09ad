"""A ``SlideResult`` on disk: ``OUT/<slide_id>/`` with result.json, tiles.csv, heatmap_<finding>.png,
saliency/<finding>/tile_<x>_<y>.png, annotations.geojson (QuPath) and report.html, plus vessels.geojson (QuPath)
and vessels.csv when vessel analysis ran; written under a temporary name and renamed when complete, so a folder is
there whole or not at all.

A vessel counts as positive for a finding when its probability (calibrated, the highest over the vessel's tiles)
is at least ``VESSEL_POSITIVE`` (0.5): a per-vessel call, separate from the slide thresholds of the model card.
"""

from __future__ import annotations

import csv
import json
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from calciscope.data.slides import safe_id
from calciscope.inference.heatmap import contours_level0, heatmap_image
from calciscope.inference.report import render_report
from calciscope.inference.result import SlideResult, positive_findings
from calciscope.inference.saliency import overlay
from calciscope.io import atomic_dir, child_dir, write_json
from calciscope.model.vessel_detection import VESSEL_POSITIVE

# QuPath classification colours per finding (RGB); other labels get a colour from their name
FINDING_COLOURS = {
    "medial_calcification": (128, 0, 200),
    "small_vessel_calcification": (40, 90, 230),
    "thrombosis": (220, 30, 30),
    "vasculitis": (240, 150, 0),
}
VESSEL_COLOUR = (0, 170, 200)
ARTIFACT_COLOUR = (250, 200, 0)


def write_outputs(result: SlideResult, out_root: str | Path) -> Path:
    """Write every output of one slide atomically into ``out_root/<slide_id>/``; returns that folder."""
    final = child_dir(out_root, result.slide_id)
    # drawing and PNG encoding run mostly without the GIL: two threads make and write the images while this one
    # writes the tables; the report, which embeds the images, comes last
    with atomic_dir(final) as tmp, ThreadPoolExecutor(max_workers=2) as pool:
        drawn = {name: pool.submit(_draw, tmp / name, make) for name, make in _images(result).items()}
        write_json(tmp / "result.json", result.to_dict())
        write_tiles_csv(tmp / "tiles.csv", result)
        write_json(tmp / "annotations.geojson", qupath_features(result), indent=None)
        if result.vessels is not None:
            write_json(tmp / "vessels.geojson", vessel_features(result), indent=None)
            write_vessels_csv(tmp / "vessels.csv", result)
        images = {name: future.result() for name, future in drawn.items()}
        (tmp / "report.html").write_text(render_report(result, images), encoding="utf-8")
    return final


def _images(result: SlideResult) -> dict[str, Callable[[], np.ndarray]]:
    """Each PNG of the folder (relative name) with how to draw it."""
    images: dict[str, Callable[[], np.ndarray]] = {"thumbnail.png": lambda: result.thumbnail}
    ood_tiles = getattr(result.ood, "tile_ood", None)
    marked = result.grid.xy[ood_tiles] if ood_tiles is not None else None
    kind = "attention" if result.score_kind == "attention" else "tile probability"
    for j, label in enumerate(result.labels):
        top_xy = np.array([(t.x, t.y) for t in result.top_tiles.get(label, [])], dtype=np.int64)
        images[f"heatmap_{safe_id(label)}.png"] = partial(
            heatmap_image, result.thumbnail, result.slide.level_dimensions[0][0], result.grid.xy,
            result.grid.size0_px, result.tile_scores[:, j], title=f"{label}: {kind}", highlight=top_xy, marked=marked)
    for tiles in result.top_tiles.values():
        for t in tiles:
            saliency = result.saliency_maps.get((t.finding, t.rank))
            if saliency is not None and t.saliency_file:
                images[t.saliency_file] = partial(overlay, result.top_tile_images[(t.finding, t.rank)], saliency)
    return images


def _draw(path: Path, make: Callable[[], np.ndarray]) -> np.ndarray:
    rgb = make()
    _write_png(path, rgb)
    return rgb


# zlib level 1 with the "up" filter on every row: ~35 % faster than libpng's adaptive filter choice, 0.4 % larger
# (OpenCV before 4.10 has no filter setting: the adaptive choice there)
PNG_SETTINGS = [cv2.IMWRITE_PNG_COMPRESSION, 1] + ([cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP]
                                                   if hasattr(cv2, "IMWRITE_PNG_FILTER") else [])


def _write_png(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1]), PNG_SETTINGS):
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


def _ring(points: np.ndarray, dims: tuple[int, int]) -> list[list[float]]:
    """A closed GeoJSON ring (last point = first) in level-0 px, 0.1 px precision, clipped to the slide."""
    pts = np.clip(np.asarray(points, np.float64), 0, [dims[0], dims[1]])
    if np.array_equal(pts * 4, np.round(pts * 4)):  # quarter pixels (outlines traced at 2× or 4×): x·10 is exact,
        ring = np.round(pts, 1).tolist()  # so numpy rounds as round(x, 1) does, ~20× faster
    else:
        ring = [[round(x, 1), round(y, 1)] for x, y in pts.tolist()]
    if ring[0] != ring[-1]:
        ring.append(list(ring[0]))
    return ring


def vessel_measurements(vessel, labels: list[str]) -> dict[str, float]:
    """QuPath measurements of one vessel: a flat {name: number} (a lumen-less vessel has no lumen or wall)."""
    g = vessel.geometry
    values = {"outer diameter µm": g.outer_diameter_um, "lumen diameter µm": g.lumen_diameter_um,
              "wall thickness µm": g.wall_thickness_um, "area µm²": g.area_um2}
    out = {name: round(float(v), 2) for name, v in values.items() if v is not None}
    out["tiles"] = int(vessel.n_tiles)
    out.update({f"p({label})": round(float(vessel.probabilities[label]), 6) for label in labels
                if label in vessel.probabilities})
    return out


def vessel_features(result: SlideResult) -> dict[str, Any]:
    """The vessel analysis as a GeoJSON FeatureCollection QuPath imports, level-0 pixels:

    - one ``vessel`` annotation per vessel: a Polygon whose outer ring is the outer wall and whose hole, when the
      lumen was found, the lumen; QuPath measurements (diameters, wall thickness, area, ``p(<finding>)``) and plain
      properties (vessel_id, compartment, size_band, flags, probabilities, positive findings);
    - one ``calcium_artifact`` annotation per calcium-artifact region (holes, tears, knife chatter).
    """
    analysis = result.vessels
    dims = tuple(result.slide.level_dimensions[0])
    features = []
    for v in analysis.vessels:
        rings = [_ring(v.polygon, dims)]
        if v.lumen_polygon is not None and len(v.lumen_polygon) >= 3:
            rings.append(_ring(v.lumen_polygon, dims))
        probs = {k: round(float(p), 6) for k, p in v.probabilities.items()}
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{result.sha256}/vessel/{v.vessel_id}")),
            "geometry": {"type": "Polygon", "coordinates": rings},
            "properties": {
                "objectType": "annotation",
                "name": f"vessel {v.vessel_id}",
                "classification": {"name": "vessel", "color": list(VESSEL_COLOUR)},
                "measurements": vessel_measurements(v, result.labels),
                "vessel_id": v.vessel_id,
                "compartment": v.compartment,
                "size_band": v.size_band,
                "flags": list(v.flags),
                "probabilities": probs,
                "positive": positive_findings(probs),
                "positive_threshold": VESSEL_POSITIVE,
            },
        })
    for n, poly in enumerate(analysis.artifact_polygons, 1):
        area = float(cv2.contourArea(np.asarray(poly, np.float32))) * result.slide.mpp**2
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{result.sha256}/calcium_artifact/{n}")),
            "geometry": {"type": "Polygon", "coordinates": [_ring(poly, dims)]},
            "properties": {
                "objectType": "annotation",
                "name": f"calcium artifact {n}",
                "classification": {"name": "calcium_artifact", "color": list(ARTIFACT_COLOUR)},
                "measurements": {"area µm²": round(area, 1)},
            },
        })
    return {"type": "FeatureCollection", "features": features}


def write_vessels_csv(path: Path, result: SlideResult) -> None:
    """One row per vessel: id, level-0 centroid, size, compartment, size band, per-finding probability, calls, flags."""
    labels = result.labels
    header = ["vessel_id", "centroid_x", "centroid_y", "outer_diameter_um", "lumen_diameter_um", "wall_thickness_um",
              "area_um2", "compartment", "size_band", "n_tiles", *(f"p_{label}" for label in labels), "positive",
              "flags"]

    def num(v: float | None, digits: int) -> str:
        return "" if v is None else f"{v:.{digits}f}"

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for v in result.vessels.vessels:
            g = v.geometry
            cx, cy = v.centroid
            writer.writerow([v.vessel_id, f"{cx:.1f}", f"{cy:.1f}", num(g.outer_diameter_um, 2),
                             num(g.lumen_diameter_um, 2), num(g.wall_thickness_um, 2), num(g.area_um2, 1),
                             v.compartment, v.size_band, v.n_tiles,
                             *(num(v.probabilities.get(label), 6) for label in labels),
                             ";".join(positive_findings(v.probabilities)), ";".join(v.flags)])


def load_result(out_dir: str | Path) -> dict[str, Any]:
    """result.json of a slide output folder, parsed."""
    return json.loads((Path(out_dir) / "result.json").read_text(encoding="utf-8"))
