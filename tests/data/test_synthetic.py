"""The phantom generator: readable pyramids, deterministic files, ground truth that matches the pixels."""

from __future__ import annotations

import csv
import json
import math

import cv2
import numpy as np
import openslide
import pytest
import tiffslide

from calciscope.data import synthetic
from calciscope.data.phantom.stain import E_OD, H_OD
from calciscope.data.synthetic import (
    FINDINGS, VASCULITIS_CUFF_UM, cua_pattern, generate_dataset, generate_slide,
)

from calciscope.errors import CalciscopeError

# Fixtures live here, not in tests/data/conftest.py: a second module named `conftest` would shadow
# tests/conftest.py for the other test files that import helpers from it.

SYNTH_POSITIVE = {name: 1 for name in FINDINGS}
SYNTH_NEGATIVE = {name: 0 for name in FINDINGS}


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="session")
def synth_positive(synth_dir):
    """1024 px (512 um) phantom with every finding drawn and every optional finding asked for."""
    labels = dict(SYNTH_POSITIVE, extravascular_calcification=1, intimal_fibrosis=1, necrosis=0)
    return generate_slide(synth_dir, "pos", labels, size_px=1024, mpp=0.5, seed=4)


@pytest.fixture(scope="session")
def synth_negative(synth_dir):
    return generate_slide(synth_dir, "neg", SYNTH_NEGATIVE, size_px=1024, mpp=0.5, seed=4)


@pytest.fixture(scope="session")
def synth_pen(synth_dir):
    """A phantom (seed 7, classic style: the seed was picked for its drawing) that has a pen mark partly on the
    glass and a black border strip."""
    return generate_slide(synth_dir, "pen", SYNTH_NEGATIVE, size_px=1024, mpp=0.5, seed=7, style="classic")


VASCULAR = {"medial_calcification", "small_vessel_calcification", "thrombosis", "vasculitis", "intimal_fibrosis"}


def features(path, name=None):
    feats = json.loads(path.read_text())["features"]
    return [f for f in feats if name is None or f["properties"]["classification"]["name"] == name]


def ring(feature) -> np.ndarray:
    return np.asarray(feature["geometry"]["coordinates"][0], np.float32)


def poly_mask(shape, polys, scale=1.0) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    for p in polys:
        cv2.fillPoly(m, [np.round(p * scale * 4).astype(np.int32)], 1, cv2.LINE_8, 2)
    return m.astype(bool)


def stain_od(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Colour deconvolution with the measured H and E vectors: per-pixel H and E optical density."""
    od = -np.log((rgb.astype(np.float64) + 1.0) / 256.0)
    he = od.reshape(-1, 3) @ np.linalg.pinv(np.stack([H_OD, E_OD]).astype(np.float64))
    return he[:, 0].reshape(rgb.shape[:2]), he[:, 1].reshape(rgb.shape[:2])


def read_level0(slide) -> np.ndarray:
    with openslide.OpenSlide(str(slide.path)) as o:
        return np.asarray(o.read_region((0, 0), 0, o.dimensions).convert("RGB"))


# ------------------------------------------------------------------------------------------ the file
def test_openslide_reads_phantom_as_generic_tiff_with_mpp_and_pyramid(synth_positive):
    with openslide.OpenSlide(str(synth_positive.path)) as o:
        assert o.properties["openslide.vendor"] == "generic-tiff"
        assert float(o.properties["openslide.mpp-x"]) == pytest.approx(0.5, rel=1e-6)
        assert float(o.properties["openslide.mpp-y"]) == pytest.approx(0.5, rel=1e-6)
        assert o.level_count >= 3
        assert o.level_dimensions[:3] == ((1024, 1024), (256, 256), (64, 64))
        assert [round(d) for d in o.level_downsamples[:3]] == [1, 4, 16]
        assert "label" not in o.associated_images and "macro" not in o.associated_images
    with tiffslide.TiffSlide(str(synth_positive.path)) as t:
        assert t.dimensions == (1024, 1024)
        assert t.level_count >= 3
        assert t.read_region((0, 0), 1, (64, 64)).size == (64, 64)


def test_4096_slide_has_downsample_64_level(tmp_path):
    # a 4096 px slide keeps every level >= 32 px: 4096, 1024, 256, 64 (rendering it takes ~2-3 s)
    s = generate_slide(tmp_path, "big", {}, size_px=4096, seed=1, artifacts=False)
    with openslide.OpenSlide(str(s.path)) as o:
        assert o.level_dimensions == ((4096, 4096), (1024, 1024), (256, 256), (64, 64))


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    labels = {"thrombosis": 1, "vasculitis": 0}
    a = generate_slide(tmp_path / "a", "s1", labels, size_px=512, seed=11)
    b = generate_slide(tmp_path / "b", "s1", dict(reversed(list(labels.items()))), size_px=512, seed=11)
    c = generate_slide(tmp_path / "c", "s1", labels, size_px=512, seed=12)
    for attr in ("path", "lesions_path", "vessels_path", "artifacts_path", "tissue_mask_path"):
        assert getattr(a, attr).read_bytes() == getattr(b, attr).read_bytes(), attr
    assert a.path.read_bytes() != c.path.read_bytes()
    assert a.vessels_path.read_bytes() != c.vessels_path.read_bytes()


# ------------------------------------------------------------------------------------------ ground truth
def test_positive_labels_have_polygons_and_negative_labels_have_none(synth_positive, synth_negative):
    pos = {f["properties"]["classification"]["name"] for f in features(synth_positive.lesions_path)}
    assert pos == set(FINDINGS) | {"extravascular_calcification", "intimal_fibrosis"}  # necrosis asked as 0
    assert features(synth_negative.lesions_path) == []
    for f in features(synth_positive.lesions_path):
        assert f["properties"]["objectType"] == "annotation"
        r = f["geometry"]["coordinates"][0]
        assert f["geometry"]["type"] == "Polygon" and r[0] == r[-1] and len(r) >= 4


def test_vascular_lesions_lie_inside_their_vessel(synth_positive):
    vessels = [ring(v) for v in features(synth_positive.vessels_path)]
    cuff_px = VASCULITIS_CUFF_UM / synth_positive.mpp
    for f in features(synth_positive.lesions_path):
        name = f["properties"]["classification"]["name"]
        if name not in VASCULAR:
            continue
        pts = ring(f)
        slack = cuff_px if name == "vasculitis" else 1.5  # vasculitis also covers the perivascular infiltrate
        inside = [min(cv2.pointPolygonTest(v, (float(x), float(y)), True) for x, y in pts) >= -slack for v in vessels]
        assert any(inside), f"{name} polygon at {pts.mean(0)} is in no vessel"


def test_vessels_geojson_lists_every_vessel_with_properties(synth_positive, synth_negative):
    kinds = {"capillary", "arteriole", "small_artery", "venule"}
    for slide in (synth_positive, synth_negative):
        vessels = features(slide.vessels_path)
        assert len(vessels) >= 3
        ids = [v["properties"]["vessel_id"] for v in vessels]
        assert len(set(ids)) == len(ids)
        for v in vessels:
            p = v["properties"]
            assert p["classification"]["name"] == "vessel"
            assert p["kind"] in kinds and p["compartment"] in {"dermis", "fat"}
            assert p["outer_diameter_um"] > p["lumen_diameter_um"] > 0
            assert p["wall_thickness_um"] > 0
            assert set(p["findings"]) <= set(slide.labels)
    on_vessels = {f for v in features(synth_positive.vessels_path) for f in v["properties"]["findings"]}
    assert set(FINDINGS) <= on_vessels
    assert all(not v["properties"]["findings"] for v in features(synth_negative.vessels_path))


def normal_lumens(slide, min_um=10.0):
    """Inner 70% of the lumens of vessels without findings (their outline scaled by lumen/outer diameter)."""
    out = []
    for v in features(slide.vessels_path):
        p = v["properties"]
        if not p["findings"] and p["kind"] != "capillary" and p["lumen_diameter_um"] >= min_um:
            outer = ring(v)
            c = outer.mean(0)
            out.append(c + (outer - c) * 0.7 * p["lumen_diameter_um"] / p["outer_diameter_um"])
    return out


def test_thrombus_is_eosin_denser_than_normal_lumen(synth_positive, synth_negative):
    _, e_pos = stain_od(read_level0(synth_positive))
    _, e_neg = stain_od(read_level0(synth_negative))
    thrombi = [ring(f) for f in features(synth_positive.lesions_path, "thrombosis")]
    lumens = normal_lumens(synth_negative)
    assert thrombi and lumens
    e_thrombus = e_pos[poly_mask(e_pos.shape, thrombi)].mean()
    e_lumen = e_neg[poly_mask(e_neg.shape, lumens)].mean()
    assert e_thrombus > e_lumen + 0.4, (e_thrombus, e_lumen)


def wall_masks(slide, shape, only_normal: bool) -> np.ndarray:
    """Vessel walls (outer outline minus lumen) of the vessels of a slide, optionally without findings."""
    walls = np.zeros(shape, bool)
    for v in features(slide.vessels_path):
        p = v["properties"]
        if only_normal and p["findings"]:
            continue
        outer = ring(v)
        c = outer.mean(0)
        lumen = c + (outer - c) * p["lumen_diameter_um"] / p["outer_diameter_um"]
        walls |= poly_mask(shape, [outer]) & ~poly_mask(shape, [lumen])
    return walls


def test_calcification_is_haematoxylin_denser_than_vessel_walls(synth_dir):
    """Classic calcium, one dark granular arc (the randomised looks: tests/data/test_phantom_looks.py)."""
    labels = dict(SYNTH_POSITIVE, extravascular_calcification=1, intimal_fibrosis=1, necrosis=0)
    synth_positive = generate_slide(synth_dir / "classic", "pos", labels, size_px=1024, seed=4, style="classic")
    synth_negative = generate_slide(synth_dir / "classic", "neg", SYNTH_NEGATIVE, size_px=1024, seed=4,
                                    style="classic")
    h_pos, _ = stain_od(read_level0(synth_positive))
    h_neg, _ = stain_od(read_level0(synth_negative))
    normal_wall = h_neg[wall_masks(synth_negative, h_neg.shape, only_normal=True)].mean()
    all_walls = wall_masks(synth_positive, h_pos.shape, only_normal=False)
    for name in ("medial_calcification", "small_vessel_calcification"):
        polys = [ring(f) for f in features(synth_positive.lesions_path, name)]
        calc = poly_mask(h_pos.shape, polys)
        # than the walls of normal vessels, and than the uncalcified rest of the lesioned walls
        assert h_pos[calc].mean() > normal_wall + 0.4, (name, h_pos[calc].mean(), normal_wall)
        rest = all_walls & ~calc
        assert h_pos[calc].mean() > h_pos[rest].mean() + 0.25, (name, h_pos[calc].mean(), h_pos[rest].mean())


# ------------------------------------------------------------------------------------------ tissue mask
def test_tissue_mask_shape_and_pen_on_glass_is_outside(synth_pen):
    mask = cv2.imread(str(synth_pen.tissue_mask_path), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (math.ceil(1024 / 16),) * 2 and mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 255}
    with openslide.OpenSlide(str(synth_pen.path)) as o:
        low = np.asarray(o.read_region((0, 0), 2, o.level_dimensions[2]).convert("RGB")).astype(float)
    pens = [ring(f) for f in features(synth_pen.artifacts_path, "pen_mark")]
    border = [ring(f) for f in features(synth_pen.artifacts_path, "border")]
    pen = poly_mask(mask.shape, pens, 1 / 16)
    ink = low.mean(axis=2) < 200
    pen_on_glass = pen & ink & (mask == 0)
    assert pen_on_glass.sum() > 10  # this phantom has ink on the glass...
    tissue = mask > 0
    assert not (tissue & poly_mask(mask.shape, border, 1 / 16)).any()  # ...and the black border is not tissue
    # where there is no ink and no border the mask agrees with the picture: glass is near white
    clean = ~poly_mask(mask.shape, pens + border, 1 / 16)
    glass = clean & ~tissue
    glass = cv2.erode(glass.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    assert low[glass].mean() > 225
    assert 0.2 < tissue.mean() < 0.9


# ------------------------------------------------------------------------------------------ dataset
def test_dataset_manifest_columns_paths_patients_and_cua(tmp_path):
    calls = []
    manifest = generate_dataset(tmp_path, 3, size_px=512, seed=5, slides_per_patient=2,
                                progress=lambda i, n: calls.append((i, n)))
    rows = list(csv.DictReader(manifest.open()))
    with manifest.open() as fh:
        header = next(csv.reader(fh))
    assert header == ["slide_id", "patient_id", "path", "annotations", *FINDINGS, "cua_pattern", "pen_mark",
                      "fold", "blur"]
    assert [r["slide_id"] for r in rows] == ["phantom_0001", "phantom_0002", "phantom_0003"]
    assert [r["patient_id"] for r in rows] == ["P0001", "P0001", "P0002"]
    assert calls == [(1, 3), (2, 3), (3, 3)]
    for r in rows:
        assert (tmp_path / r["path"]).is_file() and not r["path"].startswith("/")
        assert (tmp_path / r["annotations"]).is_file()
        labels = {k: int(r[k]) for k in FINDINGS}
        assert int(r["cua_pattern"]) == cua_pattern(labels)
        assert all(r[k] in ("0", "1") for k in ("pen_mark", "fold", "blur"))
    # slide i does not depend on how many slides are made
    one = generate_dataset(tmp_path / "one", 1, size_px=512, seed=5)
    assert (one.parent / "phantom_0001.tiff").read_bytes() == (tmp_path / "phantom_0001.tiff").read_bytes()


def test_default_prevalence_gives_cua_in_about_a_third():
    rng = np.random.default_rng(0)
    labels = [synthetic._sample_labels(rng, FINDINGS, None) for _ in range(3000)]
    cua = np.mean([cua_pattern(lab) for lab in labels])
    assert 0.3 <= cua <= 0.4
    for k in FINDINGS:
        assert 0.25 <= np.mean([lab[k] for lab in labels]) <= 0.55, k
    forced = [synthetic._sample_labels(rng, FINDINGS, {"vasculitis": 1.0}) for _ in range(50)]
    assert all(lab["vasculitis"] == 1 and cua_pattern(lab) == 0 for lab in forced)


def test_cua_pattern_rule():
    assert cua_pattern({"medial_calcification": 1, "thrombosis": 1, "vasculitis": 0}) == 1
    assert cua_pattern({"small_vessel_calcification": 1, "thrombosis": 1}) == 1
    assert cua_pattern({"medial_calcification": 1, "thrombosis": 1, "vasculitis": 1}) == 0
    assert cua_pattern({"medial_calcification": 1, "thrombosis": 0}) == 0
    assert cua_pattern({"thrombosis": 1}) == 0


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "call, bad",
    [
        (lambda d: generate_slide(d, "x", {}, size_px=256), "256"),
        (lambda d: generate_slide(d, "x", {}, mpp=0), "0"),
        (lambda d: generate_slide(d, "x", {}, mpp=-0.5), "-0.5"),
        (lambda d: generate_slide(d, "x", {"calcinosis": 1}), "calcinosis"),
        (lambda d: generate_slide(d, "x", {"thrombosis": 2}), "2"),
        (lambda d: generate_slide(d, "../evil", {}), "../evil"),
        (lambda d: generate_dataset(d, 0), "0"),
        (lambda d: generate_dataset(d, 2, prevalence={"calcinosis": 0.5}), "calcinosis"),
        (lambda d: generate_dataset(d, 2, findings=("thrombosis", "gout")), "gout"),
    ],
)
def test_bad_arguments_raise_one_line_error_naming_the_value(tmp_path, call, bad):
    with pytest.raises(CalciscopeError) as err:
        call(tmp_path)
    msg = str(err.value)
    assert bad in msg and "\n" not in msg
    assert not list(tmp_path.glob("*.tiff"))
