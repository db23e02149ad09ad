"""calciscope.data.annotations: QuPath GeoJSON → per-finding tile labels."""

import json

import cv2
import numpy as np
import pytest

from calciscope.data.annotations import LabelingConfig, read_geojson, tile_labels
from calciscope.data.slides import open_slide
from calciscope.data.tiling import make_grid
from calciscope.data.tissue import detect_tissue
from calciscope.errors import AnnotationError


def _feature(name, coords, kind="Polygon", classification=True):
    props = {"objectType": "annotation"}
    props["classification"] = {"name": name, "color": [255, 0, 0]} if classification else name
    return {"type": "Feature", "geometry": {"type": kind, "coordinates": coords}, "properties": props}


SQUARE = [[[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]]


def test_reads_qupath_exports_in_each_shape_with_aliases(tmp_path):
    features = [
        _feature("Thrombus", SQUARE),  # alias, QuPath classification object
        _feature("medial-calcification", SQUARE, classification=False),  # plain string class
        _feature("Vasculitis", [SQUARE, SQUARE], kind="MultiPolygon"),
        _feature("Tumor", SQUARE),  # not in the label set
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}, "properties": {"classification": {"name": "thrombosis"}}},
    ]
    as_collection = tmp_path / "a.geojson"
    as_collection.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    as_list = tmp_path / "b.geojson"
    as_list.write_text(json.dumps(features))
    for path in (as_collection, as_list):
        ann = read_geojson(path)
        assert ann.count("thrombosis") == 1
        assert ann.count("medial_calcification") == 1
        assert ann.count("vasculitis") == 2
        assert ann.ignored == {"Tumor": 1}


def test_every_qupath_version_s_classes_and_object_types(tmp_path):
    """0.4+ {name, color} and {names: [...]} (derived classes), 0.2-0.3 {name, colorRGB, parentClass}, a plain
    string; annotations, detections and cells are truth, tiles (predict's per-tile calls) are not."""
    def feature(classification, object_type="annotation", **extra):
        props = {"objectType": object_type, "classification": classification,
                 "measurements": [{"name": "Area", "value": 1.0}] if extra.pop("legacy", False) else {"Area": 1.0}}
        if object_type is None:
            del props["objectType"]
        return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": SQUARE}, "properties": props,
                **extra}

    doc = [
        feature({"names": ["Thrombosis", "organising"], "color": [200, 0, 0]}),  # derived class → its base
        feature({"name": "organising", "colorRGB": -65536, "parentClass": {"name": "thrombus", "colorRGB": -1}},
                object_type=None, id="PathDetectionObject", legacy=True),  # QuPath 0.2
        feature("Medial calcification: ring", "cell"),
        feature({"name": "vasculitis", "color": [240, 150, 0]}, "tile"),  # the model's call, not truth
        feature({"name": "vasculitis", "color": [240, 150, 0]}, None, id="PathTileObject"),
        feature({"name": "vasculitis", "color": [240, 150, 0]}, "tmaCore"),
    ]
    path = tmp_path / "export.geojson"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(doc).encode())  # with a byte-order mark
    ann = read_geojson(path)
    assert ann.count("thrombosis") == 2 and ann.count("medial_calcification") == 1 and ann.count("vasculitis") == 0
    assert not ann.ignored


def test_holes_are_cut_out_of_polygons(tmp_path, phantom):
    outer = [[0, 0], [2000, 0], [2000, 2000], [0, 2000], [0, 0]]
    hole = [[400, 400], [1600, 400], [1600, 1600], [400, 1600], [400, 400]]
    path = tmp_path / "hole.geojson"
    path.write_text(json.dumps([_feature("thrombosis", [outer, hole])]))
    with open_slide(phantom.path) as slide:
        grid = make_grid(slide, None)
        labels = tile_labels(read_geojson(path), grid, slide.dimensions)
    centre = np.flatnonzero((grid.xy == [896, 896]).all(axis=1))[0]
    corner = np.flatnonzero((grid.xy == [0, 0]).all(axis=1))[0]
    assert labels[centre, 2] == 0 and labels[corner, 2] == 1


def test_custom_label_sets_and_aliases(tmp_path):
    path = tmp_path / "c.geojson"
    path.write_text(json.dumps([_feature("Ca++ deposit", SQUARE)]))
    config = LabelingConfig(labels=("calcium",), aliases={"ca++ deposit": "calcium"})
    assert read_geojson(path, config).count("calcium") == 1


def _lesion_pixels_in_tile(rings, x, y, size):
    """Exact count of level-0 pixels of a polygon inside a tile, drawn at full resolution."""
    canvas = np.zeros((size, size), np.uint8)
    cv2.fillPoly(canvas, [np.round(np.asarray(rings[0]) - [x, y]).astype(np.int32)], 1)
    return int(canvas.sum())


def test_thrombosis_tiles_overlap_thrombus_polygons_and_vice_versa(phantom):
    ann = read_geojson(phantom.lesions_path)
    thrombi = ann.polygons["thrombosis"]
    assert thrombi
    with open_slide(phantom.path) as slide:
        grid = make_grid(slide, detect_tissue(slide), )
        labels = tile_labels(ann, grid, slide.dimensions)
    positive = np.flatnonzero(labels[:, 2])
    assert len(positive) > 0
    for i in positive:  # every positive tile holds thrombus pixels
        x, y = grid.xy[i]
        assert sum(_lesion_pixels_in_tile(p, x, y, grid.size0_px) for p in thrombi) > 0
    for rings in thrombi:  # every thrombus on a kept tile labels that tile
        covering = [i for i, (x, y) in enumerate(grid.xy)
                    if _lesion_pixels_in_tile(rings, x, y, grid.size0_px) >= 0.05 * grid.size0_px**2]
        assert all(labels[i, 2] for i in covering)
    negatives = np.flatnonzero(labels[:, 2] == 0)
    for i in negatives[:: max(1, len(negatives) // 40)]:
        x, y = grid.xy[i]
        covered = sum(_lesion_pixels_in_tile(p, x, y, grid.size0_px) for p in thrombi)
        assert covered * 0.25 < 2 * LabelingConfig().min_area_um2  # near or below the bar (0.25 µm² per pixel)


def test_malformed_annotations_name_the_file(tmp_path):
    broken = tmp_path / "broken.geojson"
    broken.write_text("{not json")
    with pytest.raises(AnnotationError, match="broken.geojson: not valid GeoJSON"):
        read_geojson(broken)
    bad_coords = tmp_path / "coords.geojson"
    bad_coords.write_text(json.dumps([_feature("thrombosis", [[["a", "b"]]])]))
    with pytest.raises(AnnotationError, match="coords.geojson: feature 0"):
        read_geojson(bad_coords)
    with pytest.raises(AnnotationError, match="nope.geojson: no such annotation file"):
        read_geojson(tmp_path / "nope.geojson")
