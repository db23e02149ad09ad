"""Vessel annotations (QuPath GeoJSON, class ``vessel``) → :class:`Vessel` records in level-0 pixels.

The phantom's ``<slide_id>.vessels.geojson`` carries one Polygon per vessel (the outer wall, its first hole the
lumen) with properties ``vessel_id``, ``kind``, ``compartment``, ``outer_diameter_um``, ``lumen_diameter_um``
(fitted-ellipse minor axes), ``outer_major_um``, ``wall_thickness_um`` and ``findings``. Any QuPath export works
too (``predict``'s vessels.geojson edited in QuPath and exported back, in any QuPath version's format: see
:mod:`calciscope.data.annotations`): every property is optional (QuPath keeps only its own: class, name, colour,
measurements, which are not read), a derived class such as "vessel: thrombosed" is a vessel, tiles are not
vessels, and a Polygon's hole, when it has one, is the lumen outline (the largest, when it has several).
A MultiPolygon becomes one vessel per part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from calciscope.data.annotations import base_class, geometry_polygons, is_truth, norm_name, read_features
from calciscope.data.annotations import class_name as feature_class
from calciscope.data.vessels.frames import level0_to_mask_px
from calciscope.errors import AnnotationError

VESSEL_CLASS = "vessel"
ARTIFACT_CLASS = "calcium_artifact"  # holes, tears and knife chatter where calcium was cut
_SHIFT = 4  # fractional bits of the vertices cv2.fillPoly draws


@dataclass(frozen=True)
class Vessel:
    """One annotated vessel. Polygons are (N, 2) float64 level-0 (x, y) px, open rings (last ≠ first)."""

    vessel_id: str
    polygon: np.ndarray  # outer wall (adventitia)
    lumen_polygon: np.ndarray | None = None
    outer_diameter_um: float | None = None
    lumen_diameter_um: float | None = None
    wall_thickness_um: float | None = None
    compartment: str | None = None  # "dermis" or "fat" in phantoms; free text elsewhere
    kind: str | None = None  # capillary, arteriole, venule, small_artery in phantoms
    findings: tuple[str, ...] = ()


def read_vessels(path: str | Path, class_name: str = VESSEL_CLASS) -> list[Vessel]:
    """Every feature of class ``class_name`` (case-insensitive) in a GeoJSON file, in file order."""
    path = Path(path)
    vessels: list[Vessel] = []
    for i, feature in enumerate(_features(path)):
        props = feature.get("properties") or {}
        if not (is_truth(feature) and _is_class(feature_class(props), class_name)):
            continue
        try:
            parts = geometry_polygons(feature.get("geometry") or {})
        except (TypeError, ValueError, IndexError) as exc:
            raise AnnotationError(path, f"vessel feature {i} has malformed coordinates: {exc}") from exc
        base_id = str(props.get("vessel_id", feature.get("id", i)))
        for k, rings in enumerate(parts):
            vid = base_id if len(parts) == 1 else f"{base_id}.{k}"
            vessels.append(_vessel(path, vid, rings, props))
    return vessels


def lumen_ring(vessel: Vessel) -> np.ndarray | None:
    """The lumen outline (level-0 px): the annotated one, else the outer ring scaled about its vertex mean.

    The scaled ring uses lumen_diameter_um / outer_diameter_um. It matches the drawn lumen of a phantom vessel
    whose lumen is concentric (the phantom draws both rings from one centre and shape); an eccentric lumen
    narrowed by intimal fibrosis is placed at the centre. None without a lumen polygon or both diameters.
    """
    if vessel.lumen_polygon is not None:
        return vessel.lumen_polygon
    if not vessel.outer_diameter_um or vessel.lumen_diameter_um is None:
        return None
    centre = vessel.polygon.mean(axis=0)
    return centre + (vessel.polygon - centre) * (vessel.lumen_diameter_um / vessel.outer_diameter_um)


def ring_mask(vessels: list[Vessel], shape_hw: tuple[int, int], downsample: float,
              origin_xy: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """uint8 wall mask (1 = wall: outer minus lumen, see :func:`lumen_ring`) at ``downsample`` of level 0.

    A segmentation target for vessel detectors; pixel convention as in :mod:`calciscope.data.vessels.frames`.
    The outer outline is also traced one pixel wide, so a wall thinner than a mask pixel (capillaries and
    venules at downsample ≥ 4) stays a closed ring; that adds about half a mask pixel all round (+21 % area
    for a 20 µm vessel at downsample 4). Vessels without a known lumen are drawn filled.
    """
    mask = np.zeros(shape_hw, np.uint8)
    for v in vessels:
        outer = _fixed_point(v.polygon, downsample, origin_xy)
        cv2.fillPoly(mask, [outer], 1, shift=_SHIFT)
        lumen = lumen_ring(v)
        if lumen is not None:
            cv2.fillPoly(mask, [_fixed_point(lumen, downsample, origin_xy)], 0, shift=_SHIFT)
        cv2.polylines(mask, [outer], True, 1, thickness=1, shift=_SHIFT)
    return mask


def _fixed_point(poly: np.ndarray, downsample: float, origin_xy) -> np.ndarray:
    """Level-0 polygon → int32 mask coordinates with _SHIFT fractional bits, for cv2.fillPoly."""
    return np.round(level0_to_mask_px(poly, downsample, origin_xy) * (1 << _SHIFT)).astype(np.int32)


def _is_class(name: str | None, wanted: str) -> bool:
    """Whether a QuPath class name is ``wanted`` or a class derived from it (case and separators aside)."""
    return bool(name) and norm_name(wanted) in (norm_name(name), norm_name(base_class(name)))


def _features(path: Path) -> list:
    features = read_features(path, "vessel annotation")
    if not all(isinstance(f, dict) for f in features):
        raise AnnotationError(path, "expected a GeoJSON FeatureCollection, Feature or list of features")
    return features


def _vessel(path: Path, vid: str, rings: list[np.ndarray], props: dict) -> Vessel:
    if not rings:
        raise AnnotationError(path, f"vessel {vid}: polygon has no coordinates")
    outer = _open_ring(path, vid, rings[0], "outline")
    holes = [_open_ring(path, vid, ring, "lumen") for ring in rings[1:]]
    lumen = max(holes, key=lambda ring: abs(cv2.contourArea(ring.astype(np.float32)))) if holes else None
    findings = props.get("findings") or ()
    if isinstance(findings, str) or not all(isinstance(f, str) for f in findings):
        raise AnnotationError(path, f"vessel {vid}: findings must be a list of names, got {findings!r}")
    return Vessel(
        vessel_id=vid, polygon=outer, lumen_polygon=lumen,
        outer_diameter_um=_number(path, vid, props, "outer_diameter_um"),
        lumen_diameter_um=_number(path, vid, props, "lumen_diameter_um"),
        wall_thickness_um=_number(path, vid, props, "wall_thickness_um"),
        compartment=_text(props.get("compartment")), kind=_text(props.get("kind")), findings=tuple(findings))


def _open_ring(path: Path, vid: str, ring: np.ndarray, what: str) -> np.ndarray:
    """The ring without its closing vertex; fewer than 3 distinct finite points is an error."""
    ring = np.asarray(ring, np.float64)
    if len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
        ring = ring[:-1]
    if not np.isfinite(ring).all():
        raise AnnotationError(path, f"vessel {vid}: {what} has non-finite coordinates")
    if len(np.unique(ring, axis=0)) < 3:
        raise AnnotationError(path, f"vessel {vid}: {what} has {len(ring)} distinct point(s); a polygon needs >= 3")
    return ring


def _number(path: Path, vid: str, props: dict, key: str) -> float | None:
    value = props.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise AnnotationError(path, f"vessel {vid}: {key} must be a non-negative number of µm, got {value!r}")
    return float(value)


def _text(value) -> str | None:
    return str(value) if value is not None else None


def read_artifact_polygons(path: Path, class_names: tuple[str, ...] = (ARTIFACT_CLASS,)) -> list[np.ndarray]:
    """Outer rings (level-0 px) of every feature of the given classes in a GeoJSON file."""
    polys = []
    for feature in read_features(path, "artifact annotation"):
        if not (isinstance(feature, dict) and is_truth(feature)):
            continue
        name = feature_class(feature.get("properties") or {})
        if any(_is_class(name, wanted) for wanted in class_names):
            polys += [np.asarray(rings[0], np.float64) for rings in geometry_polygons(feature.get("geometry") or {})]
    return polys
