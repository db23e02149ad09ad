"""The shipped demo model: loads offline, says it is a synthetic demo, and is measured on unseen phantoms."""

import numpy as np
import pytest
from helpers import run_cli

from calciscope.data.synthetic import generate_dataset
from calciscope.model import load_checkpoint
from calciscope.model.demo import MAX_BYTES, demo_model_dir, resolve_model
from calciscope.inference.evaluate import evaluate_model

HELD_OUT_SEED = 90_210  # never used by configs/demo.yaml (which trains on seeds 100, 101 and 102)
SECOND_RENDERER_SEED = 7402  # benchmarks/bench_transfer.py's test tiles; no recipe draws with data.tile_phantom


def test_demo_model_ships_small_and_labelled_as_synthetic():
    directory = demo_model_dir()
    model, card = load_checkpoint(directory)
    assert resolve_model("demo") == directory
    assert card.synthetic_demo and "synthetic demo, not for clinical use" in card.intended_use
    assert card.labels == ["medial_calcification", "small_vessel_calcification", "thrombosis", "vasculitis"]
    assert sum(p.stat().st_size for p in directory.iterdir()) <= MAX_BYTES
    assert {"val", "held_out"} <= set(card.metrics)  # the card carries its validation and held-out metrics


def test_the_demo_calcium_artifact_classifier_ships_with_its_validation_and_unseen_figures():
    """demo/vessels/artifact_classifier/ (configs/artifact_classifier.yaml): one output, its flag threshold set on
    validation at a 1 % false-flag rate (0.94: 66 % of the 71 validation vessels with an artifact flagged, 0.75 % of
    the 798 without; AUROC 0.970), and its figures on unseen phantoms in the card."""
    from calciscope.model.vessel_classifier import load_classifier

    _, card = load_classifier(demo_model_dir() / "vessels" / "artifact_classifier")
    assert card.synthetic_demo and card.outputs == ["calcium_artifact"]
    chosen = card.metrics["validation"]["calcium_artifact"]
    assert card.artifact_threshold == chosen["threshold"] and chosen["flagged_without"] <= 0.01
    assert chosen["flagged_with"] >= 0.5 and card.metrics["validation"]["vessels"]["per_label"]["calcium_artifact"][
        "auroc"] >= 0.9
    assert {"per_vessel_auroc", "predict_seeds_704_703"} <= set(card.metrics["held_out"])


@pytest.fixture(scope="module")
def held_out_manifest(tmp_path_factory):
    """24 biopsy-sized phantoms (4096², 2 × 2 mm) from a seed never trained or calibrated on, in the classic style
    the shipped demo was trained on. (Until 2026-12 they were 2048², 1 × 1 mm, smaller than any punch biopsy, where
    one missed venule decided a slide. The ≥ 100-slide figures, ECE included, are the classifier card's held-out
    ones: configs/vessel_classifier.yaml, seed 424242.)"""
    return generate_dataset(tmp_path_factory.mktemp("held_out"), 24, size_px=4096, seed=HELD_OUT_SEED,
                            style="classic")


@pytest.fixture(scope="module")
def held_out_report(tmp_path_factory, held_out_manifest):
    """``calciscope evaluate --model demo``: tile metrics of the tile model, and slide metrics of ``predict`` itself
    (the demo's vessel classifier gives its slide probabilities)."""
    return evaluate_model("demo", held_out_manifest, tmp_path_factory.mktemp("held_out_eval"), workers=0)


def test_the_demo_scores_slides_from_its_vessels_and_evaluate_reports_what_predict_gives(held_out_report,
                                                                                       held_out_manifest):
    import csv

    from calciscope.inference.predict import PredictConfig, Predictor

    slides = held_out_report["slides"]
    assert slides["source"].startswith("predict") and slides["n_slides"] == 24
    assert "slides_from_tiles" in held_out_report  # the tile-aggregate figures are kept beside them
    vessels = held_out_report["vessels"]  # the listed vessels against the phantoms' outlines
    assert vessels["detection"]["vessels_true"] >= 100 and vessels["detection"]["recall"] >= 0.7
    assert min(m["auroc"] for m in vessels["matched"]["per_label"].values()) >= 0.95
    row = next(csv.DictReader(open(held_out_manifest)))
    result = Predictor("demo", PredictConfig(workers=0, saliency="none", top_k=0)).predict(
        held_out_manifest.parent / row["path"])
    assert result.sampling == "vessels" and result.vessel_classifier["slide_probabilities"]
    assert result.to_dict()["vessel_classifier"]["synthetic_demo"] is True


def test_demo_model_finds_lesion_tiles_on_unseen_phantoms_and_is_calibrated(held_out_report):
    tiles = held_out_report["examples"]["per_label"]
    for finding, m in tiles.items():  # measured (grid tiles): 0.994, 0.996, 0.960, 0.936 (0.1.0: 0.980 ... 0.918)
        assert m["auroc"] >= 0.88, (finding, m["auroc"])
        assert m["ece"] <= 0.05, (finding, m["ece"])  # measured 0.004-0.011 after temperature


@pytest.fixture(scope="module")
def second_renderer_auroc(tmp_path_factory):
    """The demo tile model on 800 tiles of the second, independently written renderer (data.tile_phantom)."""
    from calciscope.data.tile_phantom import write_tile_set

    tiles = write_tile_set(tmp_path_factory.mktemp("second_renderer"), 800, seed=SECOND_RENDERER_SEED)
    report = evaluate_model("demo", tiles, tmp_path_factory.mktemp("second_renderer_eval"), workers=0)
    return {k: m["auroc"] for k, m in report["examples"]["per_label"].items()}


@pytest.mark.parametrize("finding", ["medial_calcification", "small_vessel_calcification", "thrombosis",
                                     "vasculitis"])
def test_demo_tile_model_recognises_findings_drawn_by_a_renderer_it_never_trained_on(second_renderer_auroc, finding):
    """Leave-one-generator-out (issue 22's bar, 0.85 per finding). Measured: 0.978, 0.898, 0.935, 0.980; the tile
    model trained on the classic phantom alone (0.1.0) scored 0.784, 0.793, 0.792, 0.344."""
    assert second_renderer_auroc[finding] >= 0.85


@pytest.mark.parametrize("finding", ["medial_calcification", "small_vessel_calcification", "thrombosis",
                                     "vasculitis"])
def test_demo_model_reaches_the_slide_level_bar_for_each_finding_on_unseen_phantoms(held_out_report, finding):
    """Slide probabilities of ``predict`` (the demo's vessel classifier: each finding's highest vessel probability,
    through its slide map). Measured on these 24 biopsy-sized slides: medial 1.000, small-vessel 0.993, thrombosis
    1.000, vasculitis 1.000 (the grid tiles alone: 0.68-0.92 with tile model 0.1.0, 0.99-1.00 with 0.2.0). On 24
    slides of 2048² (1 × 1 mm) vasculitis stayed at 0.895: an inflamed 10-12 µm venule inside an infiltrate that the segmenter does not outline was a slide's
    only lesion on three of them; at 2 × 2 mm a slide has more than one."""
    assert held_out_report["slides"]["per_label"][finding]["auroc"] >= 0.95


def test_demo_model_reaches_the_cua_pattern_bar_on_unseen_phantoms(held_out_report):
    """Measured 1.000 here (0.880 on the 2048² slides it replaced, where the misses above multiplied)."""
    assert held_out_report["slides"]["cua_pattern"]["auroc"] >= 0.95


def test_calibrate_slides_refits_the_slide_map_predict_then_uses(capsys, tmp_path, held_out_manifest):
    """A copy of the demo classifier given a slide map that squeezes every slide to 0.05-0.25 (a = 0.2, b = -3) is
    refit on six labelled phantoms: the map written into its card is the Platt fit the record reports, the Brier
    score on those slides falls for every finding with both kinds of slide (the one all six have keeps its map), and
    predict's slide probabilities follow the new map. The shipped classifier and a manifest without labels are
    refused, each naming what is wrong."""
    import csv
    import json
    import shutil

    from calciscope.errors import CalciscopeError
    from calciscope.inference.calibrate_slides import calibrate_slides
    from calciscope.inference.predict import PredictConfig, Predictor
    from calciscope.model.aggregate import apply_slide_calibration
    from calciscope.model.vessel_classifier import load_classifier

    shipped = demo_model_dir() / "vessels" / "classifier"
    folder = shutil.copytree(shipped, tmp_path / "classifier")
    doc = json.loads((folder / "classifier.json").read_text())
    doc["slide_calibration"] = {k: {"a": 0.2, "b": -3.0} for k in doc["labels"]}
    (folder / "classifier.json").write_text(json.dumps(doc))
    rows = list(csv.DictReader(open(held_out_manifest)))[:6]
    six = held_out_manifest.parent / "six.csv"
    with open(six, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    code, stdout, _ = run_cli(capsys, "calibrate-slides", "--classifier", folder, "--data", six, "--quiet")
    assert code == 0 and stdout.strip().endswith("classifier.json") and "small_vessel_calcification" in stdout
    _, card = load_classifier(folder)
    record = card.metrics["slide_calibration"]
    assert record["n_slides"] == 6 and record["data"] == [f"{six.parent.name}/six.csv"]
    kept = [k for k, m in record["per_label"].items() if m["kept_previous_map"]]
    assert kept == ["medial_calcification"]  # all six slides have it: nothing to fit, its map stays
    for k, m in record["per_label"].items():  # measured: Brier 0.56 -> 0.06, 0.25 -> 0.02, 0.26 -> 0.12
        assert card.slide_calibration[k] == {"a": m["a"], "b": m["b"]}
        assert record["previous_map"][k] == {"a": 0.2, "b": -3.0}
        assert (m["brier_after"] == m["brier_before"]) if k in kept else (m["brier_after"] < m["brier_before"] - 0.1)

    predictor = Predictor("demo", PredictConfig(workers=0, saliency="none", top_k=0, vessel_classifier=str(folder)))
    result = predictor.predict(held_out_manifest.parent / rows[0]["path"])
    labels = predictor.labels
    top = np.array([[v.probabilities[k] for k in labels] for v in result.vessels.vessels]).max(axis=0)
    expected = apply_slide_calibration(top, card.slide_calibration, labels)
    assert [result.probabilities[k] for k in labels] == pytest.approx(expected.tolist(), abs=1e-6)

    code, _, stderr = run_cli(capsys, "calibrate-slides", "--classifier", shipped, "--data", six)
    assert code == 1 and "copy the shipped one" in stderr
    unlabelled = tmp_path / "unlabelled.csv"
    unlabelled.write_text(f"slide_id,path\nx,{held_out_manifest.parent / rows[0]['path']}\n")
    with pytest.raises(CalciscopeError, match="unlabelled.csv"):
        calibrate_slides("demo", folder, [unlabelled])


def test_a_grid_route_lets_vasculitis_reach_the_slide_without_an_outline(capsys, tmp_path, held_out_manifest):
    """calibrate-slides --grid-route vasculitis fits vasculitis' slide map on two inputs, the highest listed vessel's
    probability and the tile model's grid-tile slide probability (weight >= 0), and only vasculitis'; predict then
    combines them as the map says and shows both routes in result.json. A finding the classifier does not have is
    refused by name."""
    import csv
    import json
    import shutil

    from calciscope.inference.predict import PredictConfig, Predictor
    from calciscope.model.aggregate import apply_slide_calibration, slide_probabilities
    from calciscope.model.vessel_classifier import load_classifier

    folder = shutil.copytree(demo_model_dir() / "vessels" / "classifier", tmp_path / "classifier")
    rows = list(csv.DictReader(open(held_out_manifest)))
    vasculitis = [r for r in rows if r["vasculitis"] == "1"][:3] + [r for r in rows if r["vasculitis"] == "0"][:3]
    six = held_out_manifest.parent / "six_vasculitis.csv"
    with open(six, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(vasculitis)
    code, _, stderr = run_cli(capsys, "calibrate-slides", "--classifier", folder, "--data", six,
                              "--grid-route", "necrosis", "--quiet")
    assert code == 1 and "--grid-route necrosis: not a finding" in stderr
    code, stdout, _ = run_cli(capsys, "calibrate-slides", "--classifier", folder, "--data", six,
                              "--grid-route", "vasculitis", "--quiet")
    assert code == 0, stdout
    _, card = load_classifier(folder)
    assert card.slide_calibration["vasculitis"]["grid"] >= 0
    assert not any("grid" in m for k, m in card.slide_calibration.items() if k != "vasculitis")
    record = card.metrics["slide_calibration"]["per_label"]["vasculitis"]
    assert record["positives"] == 3 and record["auroc_after"] >= record["auroc_before"] - 1e-9

    predictor = Predictor("demo", PredictConfig(workers=0, saliency="none", top_k=0, vessel_classifier=str(folder)))
    result = predictor.predict(held_out_manifest.parent / vasculitis[0]["path"])
    labels = predictor.labels
    top = np.array([[v.probabilities[k] for k in labels] for v in result.vessels.vessels]).reshape(-1, len(labels))
    top = top.max(axis=0) if len(top) else np.zeros(len(labels))
    grid = slide_probabilities(result.tile_probs, predictor.card)
    expected = apply_slide_calibration(top, card.slide_calibration, labels, grid)
    assert [result.probabilities[k] for k in labels] == pytest.approx(expected.tolist(), abs=1e-6)
    findings = json.loads(json.dumps(result.to_dict()["findings"]))
    j = labels.index("vasculitis")
    assert findings["vasculitis"]["routes"] == pytest.approx({"vessels": top[j], "grid": grid[j]}, abs=1e-6)
    assert "routes" not in findings["thrombosis"]
