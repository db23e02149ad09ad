"""What a card records about training reaches predict: a model trained on stain-normalised tiles
(``data.stain_normalize``) is given tiles normalised to the card's target (``extra.stain_normalize``), and the
trainer's warnings (``extra.warnings``: calibration it could not check) are in result.json and the report."""

import json
import shutil

import numpy as np
import pytest
import torch

from calciscope.data.datasets import GridTilesWithQC
from calciscope.data.stain import ReinhardNormalizer
from calciscope.inference.predict import PredictConfig, Predictor
from calciscope.model import ModelCard, load_card, update_card
from calciscope.model.demo import demo_model_dir

TARGET = ReinhardNormalizer(lab_mean=(0.55, 0.25, -0.10), lab_std=(0.12, 0.08, 0.05))  # far from the phantom's stain


@pytest.fixture(scope="module")
def normalising_model(tmp_path_factory):
    folder = shutil.copytree(demo_model_dir(), tmp_path_factory.mktemp("stain") / "model",
                             ignore=shutil.ignore_patterns("vessels"))
    update_card(ModelCard, folder, extra={**load_card(folder).extra, "stain_normalize": TARGET.to_dict()})
    return folder


def _config():
    return PredictConfig(vessels="none", saliency="none", workers=0, amp="off")


def test_predict_scores_the_tiles_normalised_to_the_cards_target(normalising_model, phantom):
    folder = normalising_model
    plain, normalising = Predictor("demo", _config()), Predictor(folder, _config())
    assert plain.tiles.normalizer is None and isinstance(normalising.tiles.normalizer, ReinhardNormalizer)
    got, base = normalising.predict(phantom.path), plain.predict(phantom.path)
    assert got.tile_probs.shape == base.tile_probs.shape
    assert np.abs(got.tile_probs - base.tile_probs).max() > 0.05  # the target changes what the model sees

    # exactly the demo network on the tiles normalised as training normalised them
    grid = got.grid
    tiles = np.stack([GridTilesWithQC(phantom.path, None, grid)[i][0] for i in range(len(grid))])
    normalised = np.stack([TARGET.transform(t) for t in tiles]).transpose(0, 3, 1, 2)
    expected = plain.tiles.score_tiles(torch.from_numpy(np.ascontiguousarray(normalised)))
    np.testing.assert_allclose(got.tile_probs, expected, atol=1e-5)


def test_the_cards_training_warnings_reach_result_json_and_the_report(tmp_path, clean_phantom):
    folder = shutil.copytree(demo_model_dir(), tmp_path / "model", ignore=shutil.ignore_patterns("vessels"))
    warning = "calibration of 'vasculitis' not checked on enough data: validation holds one class only"
    update_card(ModelCard, folder, extra={**load_card(folder).extra, "warnings": [warning]})
    Predictor(folder, _config()).predict_and_write(clean_phantom.path, tmp_path / "out")
    (slide_dir,) = (tmp_path / "out").iterdir()
    assert json.loads((slide_dir / "result.json").read_text())["model"]["training_warnings"] == [warning]
    assert "validation holds one class only" in (slide_dir / "report.html").read_text()
