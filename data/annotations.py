"""Lesion annotations (GeoJSON as QuPath exports it) → per-finding masks → multi-label tile vectors.

QuPath writes a FeatureCollection (or, from older versions, a bare list of features) whose geometries are
Polygon/MultiPolygon in level-0 pixel coordinates and whose class is ``properties.classification.name``.
Class names map onto the label set through case-insensitive aliases; unknown classes are ignored and
reported, never guessed.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import cv2
import numpy as np

from calciscope.data.tiling import TileGrid, coverage
from calciscope.errors import AnnotationError

DEFAULT_LABELS = ("medial_calcification", "small_vessel_calcification", "thrombosis", "vasculitis")

# Spellings pathologists use in QuPath class lists → label names (case and separators are normalised first).
DEFAULT_ALIASES: dict[str, str] = {
    "medial calcification": "medial_calcification",
    "medial calcinosis": "medial_calcification",
    "small vessel calcification": "small_vessel_calcification",
    "mural calcification": "small_vessel_calcification",
    "thrombus": "thrombosis",
    "thrombi": "thrombosis",
    "occlusion": "thrombosis",
    "vasculitis": "vasculitis",
    "extravascular calcification": "extravascular_calcification",
    "intimal fibrosis": "intimal_fibrosis",
    "necrosis": "necrosis",
}


@dataclass(frozen=True)
class LabelingConfig:
    """When a tile is positive for a finding: the lesion covers ≥ ``min_fraction`` of it OR ≥ ``min_area_um2``."""

    labels: tuple[str, ...] = DEFAULT_LABELS
    aliases: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_ALIASES))
    min_fraction: float = 0.05
    min_area_um2: float = 150.0
    raster_mpp: float | None = None  # resolution of the rasterised masks; default tile size / 32


@dataclass
class Annotations:
    """Polygons per label in level-0 pixels; each polygon is a list of rings (outer first, then holes)."""

    path: Path
    polygons: dict[str, list[list[np.ndarray]]]
    ignored: Counter  # class names that matched no label, with counts

    def count(self, label: str) -> int:
        return len(self.polygons.get(label, []))


def norm_name(name: str) -> str:
    return " ".join(str(name).replace("_", " ").replace("-", " ").lower().split())


def resolve_label(name: str | None, labels: Sequence[str], aliases: Mapping[str, str]) -> str | None:
    """The label a class name stands for, or None."""
    if not name:
        return None
    key = norm_name(name)
    by_norm = {norm_name(label): label for label in labels}
    if key in by_norm:
        return by_norm[key]
    target = {norm_name(k): v for k, v in aliases.items()}.get(key)
    return target if target in labels else None


def read_features(path: str | Path, what: str = "annotation") -> list:
    """The features of a GeoJSON file (a FeatureCollection, one Feature or a list of features); errors name the
    file, ``what`` says what kind of file it should have been."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(path, f"no such {what} file")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AnnotationError(path, f"not valid GeoJSON ({exc})") from exc
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        features = doc.get("features", [])
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        features = [doc]
    else:
        features = doc
    if not isinstance(features, list):
        raise AnnotationError(path, "expected a GeoJSON FeatureCollection, Feature or list of features")
    return features


def read_geojson(path: str | Path, config: LabelingConfig = LabelingConfig()) -> Annotations:
    """Read a QuPath GeoJSON export and sort its polygons by label."""
    path = Path(path)
    features = read_features(path)
    polygons: dict[str, list[list[np.ndarray]]] = {label: [] for label in config.labels}
    ignored: Counter = Counter()
    for i, feature in enumerate(features):
        if not isinstance(feature, dict):
            raise AnnotationError(path, f"feature {i} is not an object")
        name = class_name(feature.get("properties") or {})
        label = resolve_label(name, config.labels, config.aliases)
        if label is None:
            ignored[str(name)] += 1
            continue
        geometry = feature.get("geometry") or {}
        try:
            polygons[label].extend(geometry_polygons(geometry))
        except (TypeError, ValueError, IndexError) as exc:
            raise AnnotationError(path, f"feature {i} ({name}) has malformed coordinates: {exc}") from exc
    return Annotations(path=path, polygons=polygons, ignored=ignored)


def class_name(props: Mapping) -> str | None:
    cls = props.get("classification")
    if isinstance(cls, Mapping):
        return cls.get("name")
    if isinstance(cls, str):
        return cls
    return props.get("name") if isinstance(props.get("name"), str) else None


def geometry_polygons(geometry: Mapping) -> list[list[np.ndarray]]:
    kind = geometry.get("type")
    coords = geometry.get("coordinates")
    if kind == "Polygon":
        return [[np.asarray(ring, np.float64)[:, :2] for ring in coords]]
    if kind == "MultiPolygon":
        return [[np.asarray(ring, np.float64)[:, :2] for ring in poly] for poly in coords]
    if kind == "GeometryCollection":
        return [p for g in geometry.get("geometries", []) for p in geometry_polygons(g)]
    return []  # points and lines carry no area


def rasterize(polygons: list[list[np.ndarray]], shape_hw: tuple[int, int], downsample: float) -> np.ndarray:
    """A uint8 mask (1 inside, holes cut out) of level-0 polygons drawn at ``downsample`` of level 0."""
    mask = np.zeros(shape_hw, np.uint8)
    for rings in polygons:
        if not rings:
            continue
        outer = np.round(rings[0] / downsample).astype(np.int32)
        cv2.fillPoly(mask, [outer], 1)
        holes = [np.round(r / downsample).astype(np.int32) for r in rings[1:]]
        if holes:
            cv2.fillPoly(mask, holes, 0)
    return mask


def tile_labels(
    annotations: Annotations,
    grid: TileGrid,
    slide_dimensions: tuple[int, int],
    config: LabelingConfig = LabelingConfig(),
) -> np.ndarray:
    """(N, L) uint8 multi-label matrix for the grid's tiles, in ``config.labels`` order."""
    raster_mpp = config.raster_mpp or grid.size0_px * grid.slide_mpp / 32
    downsample = max(1.0, raster_mpp / grid.slide_mpp)
    w, h = slide_dimensions
    shape = (int(np.ceil(h / downsample)), int(np.ceil(w / downsample)))
    tile_area_um2 = (grid.size0_px * grid.slide_mpp) ** 2
    out = np.zeros((len(grid), len(config.labels)), np.uint8)
    for j, label in enumerate(config.labels):
        polys = annotations.polygons.get(label, [])
        if not polys or len(grid) == 0:
            continue
        frac = coverage(rasterize(polys, shape, downsample), downsample, grid.xy, grid.size0_px)
        out[:, j] = (frac > 0) & ((frac >= config.min_fraction) | (frac * tile_area_um2 >= config.min_area_um2))
    return out
