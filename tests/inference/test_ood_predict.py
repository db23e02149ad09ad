"""inference.ood: predict and score say when a slide is unlike the slides the demo's networks were trained on
(issue 21), on the real scan in tests/fixtures, what a lab or converter might make of it, and phantoms."""

import csv
import json

import numpy as np
import pytest
from helpers import real_scan_variants, run_cli

from calciscope.inference.heatmap import heatmap_image
from calciscope.inference.ood import BANNER, OODMonitor
from calciscope.inference.predict import PredictConfig, Predictor
from calciscope.model.card import ModelCard
from calciscope.model.checkpoint import load_card
from calciscope.model.demo import demo_model_dir
from calciscope.model.segmenter import SegmenterCard
from calciscope.model.vessel_classifier import ClassifierCard

NETWORKS = ("tile_model", "segmenter", "vessel_classifier", "artifact_classifier")


@pytest.fixture(scope="module")
def predictor():
    return Predictor("demo", PredictConfig(workers=0, saliency="none", top_k=2))


@pytest.fixture(scope="module")
def cmu(predictor, cmu_svs, tmp_path_factory):
    """The real Aperio H&E scan through predict, its files written."""
    result = predictor.predict(cmu_svs)
    predictor.write(result, tmp_path_factory.mktemp("ood_cmu"))
    return result


def _stable(doc):
    """A result document without what says when or how fast, and without the OOD flag of a vessel (added where its
    window or crop is farther from its network's training data than every validation unit)."""
    if isinstance(doc, dict):
        return {k: [f for f in v if f != "out_of_distribution"] if k == "flags" and isinstance(v, list) else _stable(v)
                for k, v in doc.items() if k not in ("seconds", "tiles_per_second", "created")}
    return [_stable(v) for v in doc] if isinstance(doc, list) else doc


def ood_tiles(result) -> int:
    return result.to_dict()["out_of_distribution"]["n_ood_tiles"]


def test_every_demo_network_carries_a_reference_fit_on_its_phantoms():
    demo = demo_model_dir()
    cards = {"tile_model": load_card(demo), "segmenter": SegmenterCard.from_json(demo / "vessels" / "segmenter.json"),
             "vessel_classifier": ClassifierCard.from_json(demo / "vessels" / "classifier" / "classifier.json"),
             "artifact_classifier": ClassifierCard.from_json(
                 demo / "vessels" / "artifact_classifier" / "classifier.json")}
    for name, card in cards.items():
        ref = card.ood()
        assert ref is not None, name
        assert ref.unit == {"tile_model": "tile", "segmenter": "window"}.get(name, "vessel")
        assert ref.unit_false_alarm == 0.01 and ref.slide_false_alarm == 0.05
        if name == "tile_model":  # fit by its training run (configs/demo.yaml): its tiles, its validation tiles
            assert ref.fit["data"].startswith("training run: tiles") and ref.fit["validation_unit_false_alarm"] <= 0.02
            continue
        # the vessel networks': fit afterwards on the classic phantoms they were trained on (model/demo.py)
        assert "demo_phantoms/manifest.csv" in ref.fit["data"]["reference"]
        assert ref.fit["validation_slides_flagged"] == 0


def test_the_real_scan_is_flagged_in_result_json_qc_and_the_cua_call(cmu):
    doc = cmu.to_dict()
    ood = doc["out_of_distribution"]
    assert ood["status"] == "out_of_distribution" and ood["flagged"]
    assert ood["score"] == ood["fraction_ood_tiles"] > ood["threshold"] and ood["n_ood_tiles"] > 0
    for name in ("tile_model", "segmenter", "artifact_classifier"):
        assert ood["networks"][name]["flagged"], name
    # the vessel classifier's pooled features do not tell this scan's vessel crops from the phantoms' (measured):
    # its check runs and reports, and the others flag the slide
    assert ood["networks"]["vessel_classifier"]["status"] in ("in_distribution", "out_of_distribution")
    assert "out_of_distribution" in doc["qc"]["flags"]
    assert doc["cua_pattern"]["status"] == "not_assessable"  # never a bare negative
    assert doc["cua_pattern"]["reason"].startswith(BANNER)


def test_vessels_on_tissue_the_segmenter_does_not_know_do_not_make_sampling_sufficient(cmu):
    adequacy = cmu.vessels.adequacy
    assert adequacy["status"] == "not_assessable" and "does not know this tissue" in adequacy["reason"]
    flagged = [v for v in cmu.vessels.vessels if "out_of_distribution" in v.flags]
    assert len(flagged) > len(cmu.vessels.vessels) / 2  # windows or crops beyond every validation unit
    # counted, the vessels on unknown tissue would have made sampling "sufficient"; they are not counted
    known, unknown = adequacy["small_fat_vessels"], adequacy["small_fat_vessels_out_of_distribution"]
    assert known < adequacy["min_small_fat_vessels"] <= known + unknown
    report = (cmu.out_dir / "report.html").read_text()
    assert "Sampling of small subcutaneous vessels: sufficient" not in report
    assert "Sampling of small subcutaneous vessels cannot be judged" in report


def test_the_report_opens_with_the_banner_and_the_heatmaps_outline_the_ood_tiles(cmu):
    report = (cmu.out_dir / "report.html").read_text()
    banner = report.index('id="ood-banner"')
    assert banner < report.index("Decision support, not a diagnosis") and BANNER in report
    assert 'id="cua-not-assessable"' in report and 'id="ood-table"' in report
    import cv2

    written = cv2.imread(str(cmu.out_dir / "heatmap_thrombosis.png"))[..., ::-1]
    j = cmu.labels.index("thrombosis")
    unmarked = heatmap_image(cmu.thumbnail, cmu.slide.level_dimensions[0][0], cmu.grid.xy, cmu.grid.size0_px,
                             cmu.tile_scores[:, j], title="thrombosis: tile probability",
                             highlight=np.array([(t.x, t.y) for t in cmu.top_tiles["thrombosis"]]))
    assert cmu.ood.tile_ood.sum() == ood_tiles(cmu) > 0
    assert np.abs(written.astype(int) - unmarked).max() > 100  # white crossed squares where they are


@pytest.mark.parametrize("variant", ["jpeg_q30", "restained", "half_res", "png", "mpp_0.25"])
def test_the_real_scan_made_over_still_does_not_pass_as_in_distribution(predictor, cmu_svs, tmp_path_factory,
                                                                       variant):
    path, mpp = real_scan_variants(cmu_svs, tmp_path_factory.mktemp("variants"))[variant]
    result = predictor.predict(path, slide_mpp=mpp)
    assert result.ood.flagged and result.cua["status"] == "not_assessable"
    # at least two networks say so (read at a wrong mpp, the scan gives the tile model 12 tiles, none unlike its
    # training tiles: the segmenter and the classifiers flag it)
    assert sum(s.get("flagged", False) for s in result.ood.networks.values()) >= 2


def test_an_in_distribution_phantom_scores_exactly_as_without_the_check(predictor, phantom, clean_phantom):
    for slide in (phantom, clean_phantom):
        checked = predictor.predict(slide.path)
        assert not checked.ood.flagged and checked.ood.to_dict()["status"] == "in_distribution"
        assert "out_of_distribution" not in checked.qc["flags"]
        monitor = predictor.ood
        predictor.ood = OODMonitor(None, None, None)  # no taps, no references: the check is off
        try:
            plain = predictor.predict(slide.path)
        finally:
            predictor.ood = monitor
        assert plain.ood.to_dict()["status"] == "not_checked"
        a, b = checked.to_dict(), plain.to_dict()
        for doc in (a, b):
            doc.pop("out_of_distribution")
        assert _stable(a) == _stable(b)  # every value but the times: scores, calls, QC, vessels, adequacy
        assert np.array_equal(checked.tile_probs, plain.tile_probs)


def test_score_lists_out_of_distribution_in_summary_csv_for_the_real_scan_only(capsys, tmp_path, cmu_svs, phantom):
    code, _, err = run_cli(capsys, "score", cmu_svs.parent / "*.svs", "--out", tmp_path / "batch", "--workers", "1")
    assert code == 0, err
    code, _, err = run_cli(capsys, "predict", phantom.path, "--out", tmp_path / "one", "--saliency", "none")
    assert code == 0, err
    rows = {r["slide_id"]: r for r in csv.DictReader(open(tmp_path / "batch" / "summary.csv"))}
    assert "out_of_distribution" in rows[cmu_svs.stem]["qc_flags"].split(";")
    assert rows[cmu_svs.stem]["cua_status"] == "not_assessable"
    doc = json.loads((tmp_path / "one" / phantom.slide_id / "result.json").read_text())
    assert doc["out_of_distribution"]["status"] == "in_distribution" and "out_of_distribution" not in doc["qc"]["flags"]


def test_a_model_without_references_and_an_onnx_tile_model_say_the_check_did_not_run(predictor):
    monitor = OODMonitor(None, predictor.card, None)  # the tile model scored by onnxruntime: no embeddings
    check = monitor.finish(None, None)
    assert check.networks["tile_model"]["status"] == "not_checked" and "ONNX" in check.networks["tile_model"]["reason"]
    assert not check.flagged and check.to_dict()["status"] == "not_checked"
    bare = OODMonitor(predictor.tiles.backbone, ModelCard(name="x", labels=["a"], backbone="small", tile_px=112,
                                                          mpp=1.0), None)
    assert bare.finish(None, None).networks["tile_model"]["reason"] == "its card has no OOD reference"


def test_fit_ood_writes_every_networks_reference_and_refuses_the_shipped_demo(capsys, tmp_path):
    import shutil

    from calciscope.data.synthetic import generate_dataset

    model = tmp_path / "model"
    shutil.copytree(demo_model_dir(), model)
    manifest = generate_dataset(tmp_path / "slides", 4, size_px=1024, seed=77, style="classic")
    code, out, err = run_cli(capsys, "fit-ood", "--model", model, "--data", manifest, "--quiet")
    assert code == 0, err
    cards = [load_card(model), SegmenterCard.from_json(model / "vessels" / "segmenter.json"),
             ClassifierCard.from_json(model / "vessels" / "classifier" / "classifier.json")]
    for card in cards:  # 2 patients: one for the reference, one (held out) for the thresholds
        assert card.ood().fit["data"]["reference_slides"] == 2 and card.ood().fit["n_validation_slides"] >= 1
    assert load_card(model).ood().fit["n_train_units"] != load_card(demo_model_dir()).ood().fit["n_train_units"]
    code, _, err = run_cli(capsys, "fit-ood", "--model", "demo", "--data", manifest)
    assert code == 1 and "install-demo ood" in err and len(err.strip().splitlines()) == 1

    # --network: only the networks named are refit (a tile model retrained with its own reference keeps it)
    fresh = tmp_path / "fresh"
    shutil.copytree(demo_model_dir(), fresh)
    code, _, err = run_cli(capsys, "fit-ood", "--model", fresh, "--data", manifest, "--network", "segmenter",
                           "--quiet")
    assert code == 0, err
    assert SegmenterCard.from_json(fresh / "vessels" / "segmenter.json").ood().fit["data"]["reference_slides"] == 2
    assert load_card(fresh).ood().fit == load_card(demo_model_dir()).ood().fit
    code, _, err = run_cli(capsys, "fit-ood", "--model", fresh, "--data", manifest, "--network", "tile")
    assert code == 1 and "--network tile: this model has tile_model, segmenter" in err


def test_install_demo_refuses_a_network_without_a_reference(capsys, tmp_path):
    import shutil

    from calciscope.model.checkpoint import update_card

    model = tmp_path / "model"
    shutil.copytree(demo_model_dir(), model, ignore=shutil.ignore_patterns("vessels"))
    update_card(ModelCard, model, ood_reference={})
    code, _, err = run_cli(capsys, "install-demo", "model", model)
    assert code == 1 and "no out-of-distribution reference" in err and "fit-ood" in err
