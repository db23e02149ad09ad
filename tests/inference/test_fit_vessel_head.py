"""calciscope fit-vessel-head: vessel analysis on annotated slides → a vessel head in the model's card, which
predict then applies (per-vessel probabilities from the head, slide probabilities through its slide map)."""

import json
import shutil

import numpy as np
import pytest

from calciscope.cli import main
from calciscope.data.synthetic import generate_dataset
from calciscope.inference.predict import PredictConfig, Predictor
from calciscope.model.demo import demo_model_dir


@pytest.fixture(scope="module")
def annotated(tmp_path_factory):
    """Six 2048² phantoms (3 patients), every finding in some of them; vessel outlines beside each slide."""
    return generate_dataset(tmp_path_factory.mktemp("head_phantoms"), 6, size_px=2048, seed=8200, artifacts=False,
                            prevalence={"medial_calcification": 0.7, "small_vessel_calcification": 0.7,
                                        "thrombosis": 0.7, "vasculitis": 0.5})


def test_fit_vessel_head_writes_the_head_that_predict_applies(tmp_path, annotated, capsys):
    model = shutil.copytree(demo_model_dir(), tmp_path / "model")
    card = json.loads((model / "model.json").read_text())
    card["extra"].pop("vessel_head", None)
    (model / "model.json").write_text(json.dumps(card))
    with pytest.raises(SystemExit) as done:
        main(["fit-vessel-head", "--model", str(model), "--data", str(annotated)])
    assert done.value.code == 0 and str(model / "model.json") in capsys.readouterr().out
    head = json.loads((model / "model.json").read_text())["extra"]["vessel_head"]
    assert head["metrics"]["n_vessels"] >= 20 and set(head["coef"]) == set(card["labels"])
    assert head["slide_calibration"] and set(head["slide_calibration"]) <= set(card["labels"])

    slide = annotated.parent / "phantom_0001.tiff"
    with_head = Predictor(model, PredictConfig(workers=0, saliency="none", top_k=0, sampling="vessels",
                                               vessel_classifier="none"))  # (a vessel classifier takes precedence)
    result = with_head.predict(slide)
    vessels = result.vessels.vessels
    assert vessels and any(abs(v.probabilities[k] - v.tile_probabilities[k]) > 1e-3 for v in vessels
                           for k in card["labels"])
    top = np.array([[v.probabilities[k] for k in with_head.labels] for v in vessels]).max(axis=0)
    assert np.allclose([result.probabilities[k] for k in with_head.labels],
                       with_head.vessel_stage.vessel_head.slide_probabilities(top[None]), atol=1e-6)


def test_fit_vessel_head_refuses_a_folder_that_is_not_a_checkpoint(tmp_path, annotated, capsys):
    with pytest.raises(SystemExit) as failed:
        main(["fit-vessel-head", "--model", str(tmp_path), "--data", str(annotated)])
    assert failed.value.code == 1
    assert f"{tmp_path}: not a checkpoint folder" in " ".join(capsys.readouterr().err.split())
