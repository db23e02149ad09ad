"""The annotation workflow: predict → correct the outlines in QuPath → export GeoJSON → train on the corrections.

QuPath is not run here: the edits are made the way QuPath writes an export back (File → Export objects as
GeoJSON): only QuPath's own properties survive (objectType, name, classification, color, isLocked, measurements;
the ids as UUIDs), a FeatureCollection or a bare list of features, and objects drawn by hand carry QuPath's
classification objects, 0.2's legacy form included. Then ``train-vessels`` and ``train`` run one step on them.
"""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import run_cli

from calciscope.data.annotations import read_geojson
from calciscope.data.synthetic import generate_slide
from calciscope.data.vessels.truth import read_vessels

FINDINGS = {"medial_calcification": 1, "small_vessel_calcification": 1, "thrombosis": 1, "vasculitis": 0}
QUPATH_PROPERTIES = ("objectType", "name", "classification", "color", "isLocked", "measurements")


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    """Two small phantoms (two patients, for train's validation split) and what ``predict`` wrote for them. Classic
    drawing: the edits need the shipped demo model to outline a thrombus, and it was trained on that style."""
    root = tmp_path_factory.mktemp("roundtrip")
    slides = [generate_slide(root / "slides", f"rt_{n}", FINDINGS, size_px=1024, seed=21 + n, artifacts=False,
                             style="classic") for n in range(2)]
    from calciscope.cli import main  # (run_cli needs capsys, which a module fixture cannot have)

    try:
        main(["predict", *(str(s.path) for s in slides), "--out", str(root / "out"), "--workers", "0",
              "--saliency", "none", "--top-k", "0"])
    except SystemExit as exc:
        assert exc.code in (0, None)
    return root, slides


def as_qupath_writes_it(feature: dict) -> dict:
    """A feature after a QuPath import and export: QuPath's own properties only, its id kept."""
    out = {"type": "Feature", "id": feature.get("id") or str(uuid.uuid4()), "geometry": feature["geometry"],
           "properties": {k: v for k, v in feature["properties"].items() if k in QUPATH_PROPERTIES}}
    return copy.deepcopy(out)


def ring(cx: float, cy: float, r: float, n: int = 24) -> list[list[float]]:
    pts = [[round(cx + r * np.cos(t), 1), round(cy + r * np.sin(t), 1)] for t in np.linspace(0, 2 * np.pi, n,
                                                                                               endpoint=False)]
    return pts + [pts[0]]


def edit_vessels(path: Path) -> tuple[Path, dict]:
    """Move one vessel's vertices, delete a false positive, add a missed vessel with its lumen (a Polygon with a
    hole) and two capillaries drawn as one MultiPolygon of a derived class; export as a bare list of features."""
    features = [as_qupath_writes_it(f) for f in json.loads(path.read_text())["features"]]
    vessels = [f for f in features if f["properties"]["classification"]["name"] == "vessel"]
    assert len(vessels) >= 3 and all(len(f["geometry"]["coordinates"]) == 2 for f in vessels)  # lumens as holes
    moved, deleted = vessels[0], vessels[1]
    features.remove(deleted)
    moved["geometry"]["coordinates"][0] = [[x + 3.0, y - 2.0] for x, y in moved["geometry"]["coordinates"][0]]
    moved["geometry"]["coordinates"][0][-1] = moved["geometry"]["coordinates"][0][0]
    added = {"type": "Feature", "id": str(uuid.uuid4()),
             "geometry": {"type": "Polygon", "coordinates": [ring(700, 650, 40), ring(700, 650, 18)]},
             "properties": {"objectType": "annotation", "classification": {"name": "Vessel", "color": [0, 170, 200]},
                            "measurements": {"Area µm^2": 1234.5, "Perimeter µm": 99.0}}}
    capillaries = {"type": "Feature", "id": str(uuid.uuid4()),
                   "geometry": {"type": "MultiPolygon", "coordinates": [[ring(300, 800, 8), ring(300, 800, 3)],
                                                                        [ring(340, 820, 8), ring(340, 820, 3)]]},
                   "properties": {"objectType": "detection",
                                  "classification": {"names": ["vessel", "capillary"], "color": [0, 90, 200]},
                                  "measurements": {"Area µm^2": float("nan")}}}  # QuPath writes NaN as it is
    features += [added, capillaries]
    edited = path.with_name("vessels.edited.geojson")
    edited.write_text(json.dumps(features))  # a bare list: exportObjectsToGeoJson without FEATURE_COLLECTION
    return edited, {"moved": moved, "deleted": deleted, "added": added}


def edit_annotations(path: Path) -> tuple[Path, dict]:
    """Delete the vasculitis outline (a false positive: the phantom has none) but leave the model's tiles (one
    classified vasculitis), move the thrombosis outline, add a missed thrombus the way QuPath 0.2 wrote objects;
    export as a FeatureCollection."""
    features = [as_qupath_writes_it(f) for f in json.loads(path.read_text())["features"]]
    outlines = [f for f in features if f["properties"]["objectType"] == "annotation"]
    tiles = [f for f in features if f["properties"]["objectType"] == "tile"]
    assert tiles and {f["properties"]["classification"]["name"] for f in outlines} >= {"thrombosis"}
    features = [f for f in features if not (f in outlines and f["properties"]["classification"]["name"] == "vasculitis")]
    tiles[0]["properties"]["classification"] = {"name": "vasculitis", "color": [240, 150, 0]}
    thrombus = next(f for f in features if f in outlines and f["properties"]["classification"]["name"] == "thrombosis")
    thrombus["geometry"]["coordinates"] = [[[x + 5.0, y + 5.0] for x, y in r] for r in thrombus["geometry"]["coordinates"]]
    missed = {"type": "Feature", "id": "PathAnnotationObject",  # QuPath 0.2: the type in 'id', measurements a list
              "geometry": {"type": "Polygon", "coordinates": [ring(512, 300, 60)]},
              "properties": {"classification": {"name": "Thrombus", "colorRGB": -65536}, "isLocked": False,
                             "measurements": [{"name": "Area µm^2", "value": 2827.4}]}}
    features.append(missed)
    edited = path.with_name("annotations.edited.geojson")
    edited.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return edited, {"thrombus": thrombus, "missed": missed}


def test_edited_vessels_read_back_as_the_corrected_truth(predicted):
    root, slides = predicted
    original = read_vessels(root / "out" / slides[0].slide_id / "vessels.geojson")
    edited, edits = edit_vessels(root / "out" / slides[0].slide_id / "vessels.geojson")
    vessels = read_vessels(edited)
    assert len(vessels) == len(original) - 1 + 1 + 2
    ids = [v.vessel_id for v in vessels]
    assert edits["deleted"]["id"] not in ids and edits["moved"]["id"] in ids  # QuPath keeps the ids (UUIDs)
    moved = vessels[ids.index(edits["moved"]["id"])]
    assert np.allclose(moved.polygon, np.asarray(edits["moved"]["geometry"]["coordinates"][0][:-1]))
    added = vessels[ids.index(edits["added"]["id"])]
    assert added.lumen_polygon is not None and np.allclose(added.lumen_polygon.mean(axis=0), (700, 650), atol=0.5)
    capillaries = [v for v in vessels if v.vessel_id.startswith(ids[-1].split(".")[0])]
    assert len(capillaries) == 2 and all(v.lumen_polygon is not None for v in capillaries)


def test_edited_annotations_read_back_as_the_corrected_labels(predicted):
    root, slides = predicted
    edited, edits = edit_annotations(root / "out" / slides[0].slide_id / "annotations.geojson")
    ann = read_geojson(edited)
    assert ann.count("vasculitis") == 0  # the outline is gone; the model's tiles are never truth
    assert ann.count("thrombosis") == 2  # the moved outline and the missed thrombus
    outer = np.asarray(edits["thrombus"]["geometry"]["coordinates"][0], float)
    assert sum(p[0].shape == outer.shape and np.allclose(p[0], outer) for p in ann.polygons["thrombosis"]) == 1


def test_train_and_train_vessels_take_one_step_on_the_corrections(capsys, tmp_path, predicted):
    root, slides = predicted
    rows = []
    for s in slides:
        vessels, _ = edit_vessels(root / "out" / s.slide_id / "vessels.geojson")
        lesions, _ = edit_annotations(root / "out" / s.slide_id / "annotations.geojson")
        rows.append(f"{s.slide_id},{s.patient_id},{s.path},{lesions},{vessels},{vessels}\n")
    manifest = tmp_path / "manifest.csv"  # the columns win over the phantom's own <slide>.vessels.geojson
    manifest.write_text("slide_id,patient_id,path,annotations,vessels,artifacts\n" + "".join(rows))

    vessels_yaml = tmp_path / "vessels.yaml"
    vessels_yaml.write_text(yaml.safe_dump({"manifest": str(manifest), "out": str(tmp_path / "segmenter"),
                                            "batch_size": 2, "crop_px": 64, "widths": [8, 16],
                                            "val_fraction": 0.0, "device": "cpu"}))
    code, _, stderr = run_cli(capsys, "train-vessels", "--config", vessels_yaml, "--steps", "1", "--quiet")
    assert code == 0, stderr
    assert (tmp_path / "segmenter" / "segmenter.json").is_file()

    train_yaml = tmp_path / "train.yaml"
    train_yaml.write_text(yaml.safe_dump({
        "out": str(tmp_path / "run"), "seed": 1,
        "data": {"source": "slides", "manifest": str(manifest), "mpp": 1.0, "tile_px": 64, "min_tissue": 0.3,
                 "labels": ["thrombosis"]},  # the finding both slides' corrections hold (each split needs one)
        "split": {"val_fraction": 0.5}, "model": {"backbone": "tiny"},
        "optim": {"epochs": 1, "max_steps_per_epoch": 1, "batch_size": 8, "workers": 0, "patience": 0},
        "augment": {"blur_prob": 0.0, "jpeg_prob": 0.0}}))
    code, _, stderr = run_cli(capsys, "train", "--config", train_yaml, "--quiet")
    assert code == 0, stderr
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
