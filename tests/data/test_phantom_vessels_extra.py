"""Phantom options for vessel-level analysis: calcium sectioning artifacts, dermis-only biopsies, lumen holes."""

from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import openslide
import pytest

from calciscope.cli import main
from calciscope.data.synthetic import generate_dataset, generate_slide
from calciscope.data.vessels.truth import read_vessels
from calciscope.errors import CalciscopeError

CALC = {"medial_calcification": 1, "small_vessel_calcification": 1, "thrombosis": 1, "vasculitis": 1,
        "intimal_fibrosis": 1}
EVERY = dict(CALC, extravascular_calcification=1, necrosis=1)
CALCIFIED = {"medial_calcification", "small_vessel_calcification"}
SIZE = 1536  # 768 um square at 0.5 um/px
SEEDS = (10, 15)  # slide "calc" with P = 1: seed 10 -> a hole and a tear, seed 15 -> chatter and a tear


def features(path, name=None):
    feats = json.loads(path.read_text())["features"]
    return [f for f in feats if name is None or f["properties"]["classification"]["name"] == name]


def level0(slide) -> np.ndarray:
    with openslide.OpenSlide(str(slide.path)) as o:
        return np.asarray(o.read_region((0, 0), 0, o.dimensions).convert("RGB")).astype(np.int16)


def fill(shape, polys, value=1) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    for p in polys:
        cv2.fillPoly(m, [np.round(np.asarray(p) * 16).astype(np.int32)], value, cv2.LINE_8, 4)
    return m


@pytest.fixture(scope="module")
def calcium_pairs(tmp_path_factory):
    """(P = 0, P = 1) phantoms of the same seed, for each of SEEDS; no pen / fold / blur / border."""
    root = tmp_path_factory.mktemp("calcium")
    return [(generate_slide(root / f"p0_{s}", "calc", CALC, size_px=SIZE, seed=s, artifacts=False),
             generate_slide(root / f"p1_{s}", "calc", CALC, size_px=SIZE, seed=s, artifacts=False,
                            calcium_artifacts=1.0)) for s in SEEDS]


# ------------------------------------------------------------------------------------------ calcium artifacts
def test_calcium_artifacts_only_when_asked_and_only_on_calcified_vessels(calcium_pairs, tmp_path):
    kinds = set()
    for off, on in calcium_pairs:
        assert features(off.artifacts_path, "calcium_artifact") == []
        vessels = {f["properties"]["vessel_id"]: f for f in features(on.vessels_path)}
        calcified = {vid for vid, f in vessels.items() if CALCIFIED & set(f["properties"]["findings"])}
        arts = features(on.artifacts_path, "calcium_artifact")
        assert calcified and sorted(a["properties"]["vessel_id"] for a in arts) == sorted(calcified)  # P = 1: each
        for a in arts:
            kind, poly = a["properties"]["kind"], np.asarray(a["geometry"]["coordinates"][0], np.float32)
            kinds.add(kind)
            outer = np.asarray(vessels[a["properties"]["vessel_id"]]["geometry"]["coordinates"][0], np.float32)
            if kind == "chatter":  # a patch centred on the vessel, 100-300 um across
                assert cv2.pointPolygonTest(poly, tuple(map(float, outer.mean(0))), False) > 0
                assert 100 <= np.ptp(poly, 0).max() * on.mpp <= 1.3 * 300
            else:  # starts in the calcified wall (a hole may reach <= 4 um past it, a tear runs out 40-200 um)
                assert max(cv2.pointPolygonTest(outer, tuple(map(float, p)), False) for p in poly) >= 0
                extent_um = np.ptp(poly, 0).max() * on.mpp
                assert extent_um <= (2 * np.ptp(outer, 0).max() * on.mpp + 8 if kind == "hole" else 210)
    assert kinds == {"hole", "tear", "chatter"}
    neg = generate_slide(tmp_path, "neg", {"thrombosis": 1, "vasculitis": 1, "medial_calcification": 0},
                         size_px=1024, seed=3, artifacts=False, calcium_artifacts=1.0)
    assert features(neg.artifacts_path, "calcium_artifact") == []  # no calcified vessel, nothing to break


def test_zero_probability_path_is_unchanged_outside_the_artifact_polygons(calcium_pairs):
    """Same seed, P = 0 vs 1: the other files are byte-identical, the artifact list only gains calcium_artifact
    features, and level-0 pixels are identical outside the 16-px JPEG blocks the polygons touch (grown by 4 px:
    the decoder's chroma upsampling reaches 1-2 px into the next block; measured 0 differing pixels there)."""
    for off, on in calcium_pairs:
        for attr in ("lesions_path", "vessels_path", "tissue_mask_path"):
            assert getattr(off, attr).read_bytes() == getattr(on, attr).read_bytes(), attr
        before, after = features(off.artifacts_path), features(on.artifacts_path)
        assert after[: len(before)] == before and len(after) > len(before)
        polys = [a["geometry"]["coordinates"][0] for a in after[len(before):]]
        touched = fill((SIZE, SIZE), polys).reshape(SIZE // 16, 16, SIZE // 16, 16).max(axis=(1, 3))
        near = cv2.dilate(np.kron(touched, np.ones((16, 16), np.uint8)), np.ones((9, 9), np.uint8)) > 0
        a, b = level0(off), level0(on)
        assert np.array_equal(a[~near], b[~near])
        assert np.abs(a - b).max(-1)[fill((SIZE, SIZE), polys) > 0].mean() > 5  # and they did draw something


def test_holes_and_tears_are_glass_and_chatter_is_paler(calcium_pairs):
    """Hole / tear pixels (polygon eroded 2 px) average within 8 of the slide's glass in every channel (measured
    <= 1.3); chatter lowers the mean optical density of its patch by >= 10 % (measured 18 %)."""
    seen = set()
    for off, on in calcium_pairs:
        a, b = level0(off), level0(on)
        tissue = cv2.resize(cv2.imread(str(on.tissue_mask_path), cv2.IMREAD_GRAYSCALE), (SIZE, SIZE),
                            interpolation=cv2.INTER_NEAREST)
        glass = np.median(b[cv2.dilate(tissue, np.ones((65, 65), np.uint8)) == 0], axis=0)
        for f in features(on.artifacts_path, "calcium_artifact"):
            kind, m = f["properties"]["kind"], fill((SIZE, SIZE), [f["geometry"]["coordinates"][0]]) > 0
            if kind == "chatter":
                od = lambda img: -np.log((img[m] + 1.0) / 256.0).sum(-1).mean()  # noqa: E731
                assert od(b) < 0.9 * od(a)
            else:
                core = cv2.erode(m.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
                if core.sum() < 20:
                    continue
                assert np.abs(b[core].mean(0) - glass).max() < 8, (kind, b[core].mean(0), glass)
                assert a[core].mean() < b[core].mean() - 20  # there was stained tissue (calcium) there before
            seen.add(kind)
    assert seen == {"hole", "tear", "chatter"}


def test_same_seed_same_files_with_the_new_options(tmp_path):
    kw = dict(size_px=1024, seed=5, subcutis=False, calcium_artifacts=0.5)
    a = generate_slide(tmp_path / "a", "s", EVERY, **kw)
    b = generate_slide(tmp_path / "b", "s", EVERY, **kw)
    for attr in ("path", "lesions_path", "vessels_path", "artifacts_path", "tissue_mask_path"):
        assert getattr(a, attr).read_bytes() == getattr(b, attr).read_bytes(), attr
    for bad in (-0.1, 1.5, "0.5", True, float("nan")):
        with pytest.raises(CalciscopeError, match="calcium_artifacts"):
            generate_slide(tmp_path / "c", "s", CALC, size_px=512, calcium_artifacts=bad)


# ------------------------------------------------------------------------------------------ no subcutis
def _adipose_fraction(slide) -> float:
    """Fraction of (eroded) tissue at 2 um/px that is glass-bright in blobs >= 20 um across (adipocytes are
    50-150 um), outside vessels + 10 um (their lumens are bright too)."""
    with openslide.OpenSlide(str(slide.path)) as o:
        rgb = np.asarray(o.read_region((0, 0), 1, o.level_dimensions[1]).convert("RGB")).astype(np.int16)
    n = rgb.shape[0]
    tissue = cv2.resize(cv2.imread(str(slide.tissue_mask_path), cv2.IMREAD_GRAYSCALE), (n, n),
                        interpolation=cv2.INTER_NEAREST)
    glass = np.median(rgb[cv2.dilate(tissue, np.ones((17, 17), np.uint8)) == 0], axis=0)
    inner = cv2.erode(tissue, np.ones((9, 9), np.uint8)) > 0
    vessels = cv2.dilate(fill((n, n), [np.asarray(f["geometry"]["coordinates"][0]) / 4
                                       for f in features(slide.vessels_path)]), np.ones((11, 11), np.uint8)) > 0
    bright = (np.abs(rgb - glass).max(-1) < 20).astype(np.uint8)
    blobs = cv2.morphologyEx(bright, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (11, 11))) > 0
    return float((blobs & inner & ~vessels).sum() / max((inner & ~vessels).sum(), 1))


def test_no_subcutis_slide_is_dermis_only_and_still_draws_every_finding(tmp_path):
    """Same seed with and without subcutis: with, adipocyte-sized glass blobs cover 0.24 of the tissue (seeds 3
    and 4: 0.33, 0.27); without, none (0.0), no vessel is in fat and every finding asked for still
    has its lesion polygons (fat-spawned vessel lesions on dermal vessels, dermal necrosis, calcified fibres)."""
    with_fat = generate_slide(tmp_path / "a", "s", EVERY, size_px=SIZE, seed=2, artifacts=False)
    dermis = generate_slide(tmp_path / "b", "s", EVERY, size_px=SIZE, seed=2, artifacts=False, subcutis=False)
    assert _adipose_fraction(with_fat) > 0.15
    assert _adipose_fraction(dermis) < 0.002
    vessels = features(dermis.vessels_path)
    assert vessels and {v["properties"]["compartment"] for v in vessels} == {"dermis"}
    assert "fat" in {v["properties"]["compartment"] for v in features(with_fat.vessels_path)}
    assert "small_artery" not in {v["properties"]["kind"] for v in vessels}
    on_vessels = {f for v in vessels for f in v["properties"]["findings"]}
    assert set(CALC) <= on_vessels
    assert {f["properties"]["classification"]["name"] for f in features(dermis.lesions_path)} == set(EVERY)


# ------------------------------------------------------------------------------------------ vessel outlines
def test_vessel_polygons_carry_the_lumen_hole_and_minor_axis_diameters(calcium_pairs):
    """The lumen is the Polygon's first hole, read back by read_vessels; thrombi lie inside it and intimal
    fibrosis around it; recorded diameters are cv2.fitEllipse axes of the written rings (to 0.01 um)."""
    slide = calcium_pairs[0][0]
    feats = features(slide.vessels_path)
    vessels = read_vessels(slide.vessels_path)
    assert len(vessels) == len(feats) > 0
    holes = []
    for v, f in zip(vessels, feats):
        assert len(f["geometry"]["coordinates"]) == 2
        assert np.array_equal(v.lumen_polygon, np.asarray(f["geometry"]["coordinates"][1][:-1], np.float64))
        outer, hole = (np.asarray(r, np.float32) for r in f["geometry"]["coordinates"])
        assert (outer[0] == outer[-1]).all() and (hole[0] == hole[-1]).all()
        assert min(cv2.pointPolygonTest(outer, tuple(map(float, p)), True) for p in hole) > 0  # lumen inside wall
        p = f["properties"]
        (_, ax_o, _), (_, ax_l, _) = cv2.fitEllipse(outer[:-1]), cv2.fitEllipse(hole[:-1])
        assert p["outer_diameter_um"] == pytest.approx(min(ax_o) * slide.mpp, abs=0.006)
        assert p["outer_major_um"] == pytest.approx(max(ax_o) * slide.mpp, abs=0.006)
        assert p["lumen_diameter_um"] == pytest.approx(min(ax_l) * slide.mpp, abs=0.006)
        assert p["wall_thickness_um"] == pytest.approx((min(ax_o) - min(ax_l)) / 2 * slide.mpp, abs=0.011)
        assert p["outer_diameter_um"] <= p["outer_major_um"] and 0 < p["lumen_diameter_um"] < p["outer_diameter_um"]
        holes.append(hole)
    for name, inside in (("thrombosis", True), ("intimal_fibrosis", False)):
        lesions = features(slide.lesions_path, name)
        assert lesions, name
        for les in lesions:
            ring = np.asarray(les["geometry"]["coordinates"][0], np.float32)
            if inside:  # every thrombus vertex inside (or on) one lumen
                assert any(min(cv2.pointPolygonTest(h, tuple(map(float, q)), True) for q in ring) >= -0.5
                           for h in holes)
            else:  # the fibrotic intima surrounds a (narrowed) lumen
                assert any(min(cv2.pointPolygonTest(ring, tuple(map(float, q)), True) for q in h) > 0
                           for h in holes)


# ------------------------------------------------------------------------------------------ dataset and CLI
def test_cli_synth_passes_the_new_options_to_every_slide_and_the_manifest(capsys, tmp_path):
    try:
        main(["synth", "--out", str(tmp_path), "--n-slides", "2", "--size", "768", "--seed", "4",
              "--prevalence", "medial_calcification=1,small_vessel_calcification=1", "--no-subcutis",
              "--calcium-artifacts", "1", "--no-artifacts"])
    except SystemExit as exc:
        assert not exc.code
    rows = list(csv.DictReader(open(tmp_path / "manifest.csv")))
    assert len(rows) == 2 and all(r["subcutis"] == "0" and r["calcium_artifact"] == "1" for r in rows)
    for r in rows:
        sid = r["slide_id"]
        assert {f["properties"]["compartment"] for f in features(tmp_path / f"{sid}.vessels.geojson")} == {"dermis"}
        assert features(tmp_path / f"{sid}.artifacts.geojson", "calcium_artifact")
    plain = generate_dataset(tmp_path / "plain", 1, size_px=512, seed=4)
    assert "subcutis" not in plain.read_text() and "calcium_artifact" not in plain.read_text()
