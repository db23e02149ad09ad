"""Lesion annotations (GeoJSON as QuPath exports it) → per-finding masks → multi-label tile vectors.

QuPath (File → Export objects as GeoJSON) writes a FeatureCollection, or a bare list of features, whose geometries
are Polygon/MultiPolygon (holes as inner rings) in level-0 pixel coordinates. Every QuPath version's way of
writing an object is read:

- the class: ``classification: {name, color}`` (0.4+), ``{names: [...], color}`` for a derived class such as
  "thrombosis: organising" (0.4+), ``{name, colorRGB[, parentClass]}`` (0.2-0.3) or a plain string;
- the object type: ``objectType`` (0.3+: annotation, detection, cell, tile, tmaCore, root) or the 0.2 type held in
  ``id`` ("PathAnnotationObject", ...). Annotations, detections and cells are truth; tiles are not (``predict``
  exports one per scored tile, classified by the model's own call), nor are TMA cores and the root;
- ``measurements`` (a map, or 0.2's list of {name, value}), ``metadata``, ``color``, ``isLocked`` and
  ``nucleusGeometry`` carry nothing a label needs and are never read.

Class names map onto the label set through case-insensitive aliases, a derived class by its full name first and
then its base class; unknown classes are ignored and reported, never guessed.
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


# QuPath object types whose outlines are truth (an unknown or missing type is an annotation, as QuPath reads it)
NOT_TRUTH_TYPES = frozenset({"tile", "tmacore", "tma_core", "root"})
_LEGACY_TYPE_IDS = {"PathAnnotationObject": "annotation", "PathDetectionObject": "detection",
                    "PathCellObject": "cell", "PathTileObject": "tile", "TMACoreObject": "tmaCore",
                    "PathRootObject": "root"}


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
    """The label a class name stands for, or None; a derived class ("thrombosis: organising") that matches none
    stands for its base class."""
    if not name:
        return None
    by_norm = {norm_name(label): label for label in labels}
    by_alias = {norm_name(k): v for k, v in aliases.items()}
    for key in dict.fromkeys((norm_name(name), norm_name(base_class(name)))):
        if key in by_norm:
            return by_norm[key]
        if by_alias.get(key) in labels:
            return by_alias[key]
    return None


def base_class(name: str) -> str:
    """The base of a QuPath derived class name ("vessel: thrombosed" → "vessel"); the name itself otherwise."""
    return str(name).split(":", 1)[0]


def object_type(feature: Mapping) -> str:
    """A feature's QuPath object type, lower case: ``properties.objectType`` (or its older spellings), the 0.2 type
    in ``id``, else "annotation" (what QuPath makes of a feature without one)."""
    props = feature.get("properties") or {}
    for key in ("objectType", "object_type", "type"):
        if isinstance(props.get(key), str):
            return props[key].lower()
    legacy = _LEGACY_TYPE_IDS.get(feature.get("id")) if isinstance(feature.get("id"), str) else None
    return (legacy or "annotation").lower()


def is_truth(feature: Mapping) -> bool:
    """Whether a feature's outline can be truth: annotations, detections and cells, not tiles, TMA cores or the root."""
    return object_type(feature) not in NOT_TRUTH_TYPES


def read_features(path: str | Path, what: str = "annotation") -> list:
    """The features of a GeoJSON file (a FeatureCollection, one Feature or a list of features); errors name the
    file, ``what`` says what kind of file it should have been."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(path, f"no such {what} file")
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark from Windows editors is fine
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
    """Read a QuPath GeoJSON export and sort its polygons by label (tiles and other non-truth objects skipped)."""
    path = Path(path)
    features = read_features(path)
    polygons: dict[str, list[list[np.ndarray]]] = {label: [] for label in config.labels}
    ignored: Counter = Counter()
    for i, feature in enumerate(features):
        if not isinstance(feature, dict):
            raise AnnotationError(path, f"feature {i} is not an object")
        if not is_truth(feature):
            continue
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
    """A feature's class as QuPath names it ("base: derived" for a derived class), or None. Without a
    ``classification``, the object's ``name`` stands in."""
    cls = props.get("classification")
    if isinstance(cls, str):
        return cls
    if isinstance(cls, Mapping):
        return ": ".join(_class_names(cls)) or None
    return props.get("name") if isinstance(props.get("name"), str) else None


def _class_names(cls: Mapping, depth: int = 0) -> list[str]:
    """The names of a QuPath classification object, base first: ``names`` (0.4+), or ``name`` under the chain of
    ``parentClass`` objects (0.2-0.3)."""
    names = cls.get("names")
    if isinstance(names, list):
        return [str(n) for n in names if isinstance(n, str)]
    parent = cls.get("parentClass")
    chain = _class_names(parent, depth + 1) if isinstance(parent, Mapping) and depth < 16 else []
    return chain + ([cls["name"]] if isinstance(cls.get("name"), str) else [])


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
