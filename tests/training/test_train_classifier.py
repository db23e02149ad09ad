"""The vessel classifier: crops scaled to each vessel, checkpoint safety, training, and its use by predict."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from calciscope.data.slides import open_slide
from calciscope.data.vessels.measure import shape_of
from calciscope.data.vessels.truth import read_vessels
from calciscope.errors import CalciscopeError, CheckpointError
from calciscope.model.vessel_classifier import (
    ClassifierCard,
    CropConfig,
    VesselClassifier,
    classify_vessels,
    crop_geometry,
    load_classifier,
    read_crop,
    save_classifier,
)

LABELS = ["medial_calcification", "small_vessel_calcification", "thrombosis", "vasculitis"]


def _circle(cx: float, cy: float, r: float, n: int = 64) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def test_a_crop_is_centred_on_the_vessel_and_scaled_to_it_within_its_clamps():
    crop = CropConfig(crop_px=64, context=2.0, min_side_um=48, max_side_um=400)
    cx, cy, side = crop_geometry(_circle(500, 300, 50), 0.5, crop)  # 100 px = 50 µm across at 0.5 µm/px
    assert (cx, cy) == pytest.approx((500, 300), abs=0.5)
    assert side == pytest.approx(2 * 100, rel=0.02)  # context × the longest side, in level-0 px
    assert crop_geometry(_circle(0, 0, 5), 0.5, crop)[2] == pytest.approx(48 / 0.5)  # a capillary: the minimum
    assert crop_geometry(_circle(0, 0, 2000), 0.5, crop)[2] == pytest.approx(400 / 0.5)  # an artery: the maximum
    jittered = crop_geometry(_circle(500, 300, 50), 0.5, crop, scale=1.1, shift=(0.1, -0.1))
    assert jittered[2] == pytest.approx(1.1 * side, rel=1e-6)
    assert jittered[:2] == pytest.approx((500 + 0.1 * jittered[2], 300 - 0.1 * jittered[2]))


def test_read_crop_shows_the_vessel_in_the_middle(vessel_phantoms):
    pos = vessel_phantoms[0]
    vessels = read_vessels(pos.vessels_path)
    big = max(vessels, key=lambda v: shape_of(v.polygon, 0.5).minor_um)
    crop = CropConfig(crop_px=64)
    with open_slide(pos.path) as slide:
        image = read_crop(slide, *crop_geometry(big.polygon, slide.mpp, crop), crop.crop_px)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        # the vessel's own pixels (ring and lumen) sit in the middle half of the crop: that part differs from the
        # slide far away from it, which a crop of the wrong place would not
        far = read_crop(slide, 100.0, 100.0, crop_geometry(big.polygon, slide.mpp, crop)[2], 64)
    assert np.abs(image[16:48, 16:48].astype(int) - far[16:48, 16:48].astype(int)).mean() > 10


def _tiny(tmp_path, labels=LABELS, name="classifier", **card):
    torch.manual_seed(0)
    card = ClassifierCard(labels=list(labels), widths=[8, 16], **({"crop": {"crop_px": 32}} | card))
    model = VesselClassifier(len(card.outputs), (8, 16)).eval()
    folder = save_classifier(tmp_path / name, model, card)
    return model, folder


def test_a_saved_classifier_loads_to_the_same_outputs_and_a_bad_one_names_its_file(tmp_path):
    model, folder = _tiny(tmp_path)
    loaded, card = load_classifier(folder)
    x, e = torch.rand(3, 3, 32, 32), torch.rand(3, 2)
    with torch.no_grad():
        assert torch.equal(model(x, e), loaded(x, e))
    assert card.labels == LABELS and card.weights_sha256
    weights = folder / "classifier.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(CheckpointError, match="classifier.safetensors.*sha256"):
        load_classifier(folder)
    doc = json.loads((folder / "classifier.json").read_text())
    doc["surprise"] = 1
    (folder / "classifier.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"classifier\.json.*unknown keys \['surprise'\]"):
        load_classifier(folder)


def _copy_demo_vessels(tmp_path):
    from calciscope.model.demo import resolve_segmenter

    target = tmp_path / "vessels"
    shutil.copytree(resolve_segmenter("demo"), target)
    shutil.rmtree(target / "artifact_classifier")  # (tests that want one put their own there)
    return target


def test_predict_takes_vessel_probabilities_and_slide_probabilities_from_the_classifier(tmp_path, vessel_phantoms):
    """Each vessel's probabilities are the classifier's on that vessel's crop; the slide's, each finding's highest
    vessel probability through the classifier's slide map; a vessel at the card's artifact threshold is flagged
    calcium_artifact; with ``vessel_classifier="none"`` none of this."""
    from calciscope.inference.predict import PredictConfig, Predictor
    from calciscope.model.vessel_classifier import slide_probabilities

    seg = _copy_demo_vessels(tmp_path)
    shutil.rmtree(seg / "classifier", ignore_errors=True)
    model, folder = _tiny(seg, slide_calibration={k: {"a": 2.0, "b": -1.0} for k in LABELS}, artifact_output=True,
                          artifact_threshold=0.0)
    pos = vessel_phantoms[0]
    predictor = Predictor("demo", PredictConfig(workers=0, saliency="none", top_k=0, vessels=str(seg)))
    assert predictor.vessel_stage.vessel_classifier is not None and predictor.sampling == "vessels"
    result = predictor.predict(pos.path)
    found = result.vessels.vessels
    assert len(found) >= 5
    _, card = load_classifier(folder)
    with open_slide(pos.path) as slide:
        expected = classify_vessels(slide, [v.polygon for v in found],
                                    np.array([v.geometry.outer_diameter_um for v in found]),
                                    np.array([v.compartment == "fat" for v in found]), model, card)
    got = np.array([[v.probabilities[k] for k in LABELS] for v in found])
    np.testing.assert_allclose(got, expected[:, :4], atol=1e-5)
    np.testing.assert_allclose([v.artifact_probability for v in found], expected[:, 4], atol=1e-5)
    assert all("calcium_artifact" in v.flags for v in found)  # threshold 0: every vessel
    assert result.vessels.qc["vessels_near_calcium_artifact"] == len(found)
    assert len(result.vessels.artifact_polygons) == result.vessels.qc["calcium_artifact_regions"] >= 1
    assert result.vessels.qc["calcium_artifact_judge"]["classifier"] == "vessel classifier"
    slide_expected = slide_probabilities(expected[:, :4], card)
    assert [result.probabilities[k] for k in LABELS] == pytest.approx(slide_expected.tolist(), abs=1e-5)
    assert result.thresholds == {k: 0.5 for k in LABELS}  # the classifier card has no slide thresholds

    plain = Predictor("demo", PredictConfig(workers=0, saliency="none", top_k=0, vessels=str(seg),
                                            vessel_classifier="none"))
    assert plain.vessel_stage.vessel_classifier is None and plain.sampling == "grid"
    other = plain.predict(pos.path).vessels.vessels
    assert [v.probabilities == v.tile_probabilities for v in other] == [True] * len(other)
    assert not any(v.artifact_probability is not None or "calcium_artifact" in v.flags for v in other)


def test_an_artifact_classifier_beside_the_segmenter_flags_the_listed_vessels(tmp_path, vessel_phantoms):
    """``<segmenter>/artifact_classifier/`` (a classifier with only a calcium_artifact output) judges every listed
    vessel on its own crop; at or above its card's threshold a vessel is flagged; ``artifact_classifier="none"``
    turns it off; a folder without that output is refused."""
    from calciscope.inference.predict import PredictConfig, Predictor

    seg = _copy_demo_vessels(tmp_path)
    model, folder = _tiny(seg, labels=[], name="artifact_classifier", artifact_output=True,
                          artifact_threshold=0.465,
                          crop={"crop_px": 32, "context": 3.0})
    pos = vessel_phantoms[0]
    result = Predictor("demo", PredictConfig(workers=0, saliency="none", top_k=0, vessels=str(seg))).predict(pos.path)
    found = result.vessels.vessels
    _, card = load_classifier(folder)
    assert card.outputs == ["calcium_artifact"]
    with open_slide(pos.path) as slide:
        expected = classify_vessels(slide, [v.polygon for v in found],
                                    np.array([v.geometry.outer_diameter_um for v in found]),
                                    np.array([v.compartment == "fat" for v in found]), model, card)[:, 0]
    np.testing.assert_allclose([v.artifact_probability for v in found], expected, atol=1e-5)
    assert 0 < (expected >= 0.465).sum() < len(found)  # the threshold splits this untrained net's outputs here
    assert [("calcium_artifact" in v.flags) for v in found] == [bool(p >= 0.465) for p in expected]
    judge = result.vessels.qc["calcium_artifact_judge"]
    assert judge["classifier"] == "artifact classifier" and judge["threshold"] == 0.465
    assert judge["weights_sha256"] == card.weights_sha256

    off = Predictor("demo", PredictConfig(workers=0, saliency="none", top_k=0, vessels=str(seg),
                                          artifact_classifier="none")).predict(pos.path)
    assert off.vessels.qc["calcium_artifact_judge"] is None
    assert not any(v.artifact_probability is not None for v in off.vessels.vessels)
    _, plain = _tiny(tmp_path, labels=LABELS, name="plain")
    with pytest.raises(CalciscopeError, match="plain: it has no calcium_artifact output"):
        Predictor("demo", PredictConfig(workers=0, vessels=str(seg), artifact_classifier=str(plain)))


def test_a_classifier_without_the_models_findings_or_without_vessel_analysis_is_refused(tmp_path):
    from calciscope.inference.predict import PredictConfig, Predictor

    seg = _copy_demo_vessels(tmp_path)
    _, folder = _tiny(tmp_path / "partial", labels=LABELS[:2])
    with pytest.raises(CalciscopeError, match="does not judge thrombosis, vasculitis"):
        Predictor("demo", PredictConfig(workers=0, vessels=str(seg), vessel_classifier=str(folder)))
    with pytest.raises(CalciscopeError, match="vessel analysis is off"):
        Predictor("demo", PredictConfig(workers=0, vessels="none", vessel_classifier=str(folder)))


@pytest.fixture(scope="module")
def training_manifest(tmp_path_factory):
    """Four 2048² phantoms, two patients with every finding and two with none (the recipe's shape, in small); every
    calcified vessel of the former has a calcium artifact (hole, tear or chatter) drawn."""
    import csv

    from calciscope.data.synthetic import generate_slide

    root = tmp_path_factory.mktemp("classifier_data")
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "patient_id", "path", *LABELS])
        for seed in (9301, 9302, 9303, 9304):
            labels = {k: seed % 2 for k in LABELS}
            slide = generate_slide(root, f"c{seed}", labels, size_px=2048, seed=seed, artifacts=False,
                                   calcium_artifacts=float(seed % 2))
            w.writerow([slide.slide_id, slide.slide_id, slide.path.name, *labels.values()])
    return root / "manifest.csv"


def test_training_cuts_crops_learns_calibrates_and_writes_a_loadable_card(tmp_path, training_manifest):
    from calciscope.training.train_classifier import ClassifierTrainConfig, train_classifier

    config = ClassifierTrainConfig(manifests=[str(training_manifest)], out=str(tmp_path / "run"), segmenter="demo",
                                   widths=[8, 16, 32], crop={"crop_px": 32}, copies=2, epochs=12, batch_size=32,
                                   val_fraction=0.5, seed=3, judge_artifacts=True)
    folder = train_classifier(config)
    model, card = load_classifier(folder)
    m = card.metrics
    assert m["train_loss_end"] < m["train_loss_start"], m
    assert set(card.temperature) == {*LABELS, "calcium_artifact", "vessel"}
    assert set(card.slide_calibration) == set(LABELS)
    val = m["validation"]["vessels"]["per_label"]
    assert all(val[k]["n"] >= 5 for k in LABELS)  # validation judged the segmenter's detections
    # vessels touching a drawn hole, tear or chatter patch are the calcium-artifact positives, in training and
    # validation alike (only the artifact phantoms have them)
    assert m["train_vessels"]["positive_crops"]["calcium_artifact"] >= 4 and val["calcium_artifact"]["n_positive"] >= 1
    assert len(card.training["slides"]["validation"]) == 2 and card.training["segmenter"] == "demo"
    # it judges vessel-ness too: the threshold listing outlines best on validation, with the figures
    detection = m["validation"]["detection"]
    assert card.outputs == LABELS + ["calcium_artifact", "vessel"]
    assert card.vessel_threshold == detection["vessel_threshold"]
    alone = detection["segmenter_alone"]
    assert min(detection["recall"], detection["precision"]) >= min(alone["recall"], alone["precision"])
    assert (card.vessel_threshold is None) == (detection == {**detection, **alone})  # it falls back when no better
    assert m["validation"]["slides"]["n_slides"] == 2
    ood = card.ood()  # the training crops' reference, calibrated on the validation slides' detections
    assert ood.unit == "vessel" and ood.dim == 32 and ood.fit["n_validation_slides"] == 2


def _write_rows(path, rows):
    import csv

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_a_training_set_without_a_finding_is_refused_naming_it(tmp_path, training_manifest):
    import csv

    from calciscope.training.train_classifier import ClassifierTrainConfig, train_classifier

    rows = [r for r in csv.DictReader(open(training_manifest)) if r["thrombosis"] == "0"]
    manifest = _write_rows(training_manifest.parent / "negatives.csv", rows)
    config = ClassifierTrainConfig(manifests=[str(manifest)], out=str(tmp_path / "run"), segmenter=None,
                                   widths=[8, 16], crop={"crop_px": 32}, epochs=1, val_fraction=0.0)
    with pytest.raises(CalciscopeError, match="no training vessel has medial_calcification"):
        train_classifier(config)


def test_calcium_artifacts_cannot_be_learned_from_slides_without_them(tmp_path, training_manifest):
    """The artifact annotations come from the manifest's ``artifacts`` column (or the sidecar file); none with a
    calcium_artifact region: refused, naming the output and what it needs."""
    import csv

    from calciscope.training.train_classifier import ClassifierTrainConfig, train_classifier

    empty = training_manifest.parent / "no_artifacts.geojson"
    empty.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    rows = [r | {"artifacts": empty.name} for r in csv.DictReader(open(training_manifest))]
    manifest = _write_rows(training_manifest.parent / "no_artifacts.csv", rows)
    config = ClassifierTrainConfig(manifests=[str(manifest)], out=str(tmp_path / "run"), segmenter=None,
                                   widths=[8, 16], crop={"crop_px": 32}, epochs=1, val_fraction=0.0,
                                   judge_artifacts=True)
    with pytest.raises(CalciscopeError, match="no training vessel has calcium_artifact: .*artifact annotations"):
        train_classifier(config)
    rows[0]["artifacts"] = "missing.geojson"
    _write_rows(manifest, rows)
    with pytest.raises(CalciscopeError, match="missing.geojson does not exist"):
        train_classifier(config)


def test_vessels_the_classifier_judges_calcium_artifacts_at_are_flagged_and_outlined():
    """At or above the card's artifact threshold a vessel is flagged, and its surroundings (its outline grown by the
    flag distance) become an artifact region; one a segmenter artifact region already flagged gets no second one."""
    from calciscope.data.vessels.match import polygon_distance
    from calciscope.data.vessels.measure import measure_vessel
    from calciscope.inference.vessels import flag_judged_artifacts
    from calciscope.model.vessel_detection import VesselRecord

    def vessel(i, cx, p, flags=()):
        poly = _circle(cx, 500, 40)
        return VesselRecord(i, poly, None, measure_vessel(poly, 0.5, None), "fat", artifact_probability=p,
                            flags=list(flags))

    vessels = [vessel(1, 200, 0.9), vessel(2, 600, 0.2), vessel(3, 1000, 0.7, ["calcium_artifact"]),
               vessel(4, 1400, 0.5)]
    regions = flag_judged_artifacts(vessels, 0.5, 2.0, 30.0)
    assert [v.flags for v in vessels] == [["calcium_artifact"], [], ["calcium_artifact"], ["calcium_artifact"]]
    assert len(regions) == 2
    for region, v in zip(regions, (vessels[0], vessels[3])):
        radius = np.hypot(*(region - v.polygon.mean(axis=0)).T)
        assert radius.min() >= 40 + 30 - 3 and radius.max() <= 40 + 30 + 3  # 40 px vessel, grown 30 px
        assert polygon_distance(v.polygon, region) == 0.0
    assert flag_judged_artifacts([vessel(5, 0, None)], 0.5, 2.0, 30.0) == []  # a classifier without that output


def test_which_outlines_are_listed_after_the_classifier_judged_them():
    """Without a vessel threshold: every vessel, and the faint outlines the classifier calls lesioned vessels. With
    one: vessels it calls vessels or that have a lesion, and faint outlines it calls vessels. Listed faint outlines
    are flagged; the list is renumbered."""
    from calciscope.data.vessels.measure import measure_vessel
    from calciscope.inference.vessels import listed_vessels
    from calciscope.model.vessel_detection import VesselRecord

    def record(i, probs, vessel):
        poly = _circle(100 * i, 100, 20)
        r = VesselRecord(i, poly, None, measure_vessel(poly, 0.5), "fat", vessel_probability=vessel)
        r.probabilities = dict(zip(LABELS, probs))
        return r

    def outlines():
        vessels = [record(1, [0.0] * 4, 0.9), record(2, [0.0] * 4, 0.1)]  # a vessel, and a cuff taken for one
        candidates = [record(3, [0.1, 0.1, 0.55, 0.0], 0.7),  # a faint thrombosed vessel
                      record(4, [0.49, 0.2, 0.1, 0.3], 0.8),  # a faint plain vessel
                      record(5, [0.0] * 4, 0.1),  # debris
                      record(6, [0.0, 0.0, 0.0, 0.6], 0.2)]  # an inflamed cuff, not a vessel
        return vessels, candidates

    vessels, candidates = outlines()
    listed = listed_vessels(vessels, candidates)
    assert [v.vessel_probability for v in listed] == [0.9, 0.1, 0.7] and [v.vessel_id for v in listed] == [1, 2, 3]
    assert [v.flags for v in listed] == [[], [], ["faint_outline"]]
    vessels, candidates = outlines()
    listed = listed_vessels(vessels, candidates, vessel_threshold=0.5)
    assert [v.vessel_probability for v in listed] == [0.9, 0.7, 0.8]
    assert [v.flags for v in listed] == [[], ["faint_outline"], ["faint_outline"]]


def test_vessels_under_pen_ink_are_looked_for_but_glass_is_not():
    """Ink lies on the coverslip: the region vessels are looked for covers tissue and ink, grown by 40 µm, not glass."""
    from calciscope.data.tissue import TissueMask
    from calciscope.model.vessel_detection import _tissue_at
    from calciscope.model.segmenter import VesselMaps

    tissue = np.zeros((100, 100), bool)
    tissue[10:60, 10:60] = True
    pen = np.zeros_like(tissue)
    pen[30:80, 30:80] = True  # half over tissue, half over glass
    tissue &= ~pen  # what the tissue detector does with ink
    mask = TissueMask(tissue, pen, np.zeros((100, 100, 3), np.uint8), mask_mpp=8.0, downsample=16.0)
    maps = VesselMaps({"vessel": np.zeros((200, 200), np.uint8)}, downsample=8.0, mpp=4.0)
    region = _tissue_at(mask, maps)  # map px = half a mask px
    assert region[2 * 70, 2 * 70] == 1  # under ink
    assert region[2 * 20, 2 * 20] == 1  # tissue
    assert region[2 * 95, 2 * 5] == 0  # glass far from both


def test_a_classifier_config_without_manifests_or_with_an_unknown_key_is_refused_naming_the_file(tmp_path):
    from calciscope.training.train_classifier import load_config

    bad = tmp_path / "c.yaml"
    bad.write_text("out: x\n")
    with pytest.raises(CalciscopeError, match=r"c\.yaml: 'manifests' .* is required"):
        load_config(bad)
    bad.write_text("manifests: [m.csv]\nepoch: 3\n")
    with pytest.raises(CalciscopeError, match=r"c\.yaml.*unknown key\(s\) \['epoch'\]"):
        load_config(bad)
    bad.write_text("manifests: [m.csv]\ndevice: cuda:99\n")
    with pytest.raises(CalciscopeError, match=r"c\.yaml: device 'cuda:99' is not available here"):
        load_config(bad)


def test_sampling_both_is_refused_with_a_vessel_classifier():
    """'both' aggregates grid and vessel tiles, and a classifier judges vessels instead of their tiles."""
    from calciscope.inference.predict import PredictConfig, Predictor

    with pytest.raises(CalciscopeError, match="sampling 'both'.*--vessel-classifier none"):
        Predictor("demo", PredictConfig(workers=0, sampling="both"))
    assert Predictor("demo", PredictConfig(workers=0, sampling="both", vessel_classifier="none")).sampling == "both"
