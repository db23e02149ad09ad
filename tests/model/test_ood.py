"""The OOD reference a card carries (model.ood) and the taps its features come through (model.ood_features)."""

import json

import numpy as np
import pytest
import torch

from calciscope.errors import CheckpointError
from calciscope.model import ModelCard, create_model, load_net, save_net
from calciscope.model.ood import (
    MIN_SLIDE_THRESHOLD,
    OODReference,
    conformal_threshold,
    fit_reference,
    reference_problem,
)
from calciscope.model.ood_features import FeatureTap
from calciscope.model.segmenter import SegmenterCard, VesselUNet, for_inference
from calciscope.model.vessel_classifier import ClassifierCard, VesselClassifier

LABELS = ["thrombosis", "vasculitis"]


def _features(rng, n, dim=24, slides=10):
    """Embeddings with a low-rank structure and per-slide offsets, as a network's features have."""
    basis = np.linspace(1, 0.05, dim)[:, None] * np.eye(dim)
    offsets = rng.normal(0, 0.15, (slides, dim))
    slide = rng.integers(0, slides, n)
    return rng.normal(size=(n, dim)) @ basis + offsets[slide], slide


@pytest.fixture(scope="module")
def reference():
    rng = np.random.default_rng(0)
    train, _ = _features(rng, 4000)
    val, groups = _features(np.random.default_rng(1), 2000)
    return fit_reference(train, val, groups, unit="tile", features="test embeddings")


def test_a_reference_flags_about_its_false_alarm_rate_of_new_in_distribution_units(reference):
    fresh, _ = _features(np.random.default_rng(2), 5000)
    rate = float((reference.distances(fresh) > reference.unit_threshold).mean())
    assert 0.002 <= rate <= 0.03  # stated: 1 % of validation units
    assert reference.fit["validation_unit_false_alarm"] == pytest.approx(0.01, abs=0.002)


def test_a_step_along_a_direction_the_training_data_never_varied_in_is_flagged_the_same_step_along_its_main_not(
        reference):
    fresh, _ = _features(np.random.default_rng(3), 1000)
    along_main, along_rare = fresh.copy(), fresh.copy()
    along_main[:, 0] += 2.0  # two standard deviations of the main direction
    along_rare[:, -1] += 2.0  # the same Euclidean step where training data hardly moved
    assert (reference.distances(along_main) > reference.unit_threshold).mean() < 0.1
    assert (reference.distances(along_rare) > reference.unit_threshold).mean() > 0.95


def test_unit_scores_are_calibrated_on_validation_units(reference):
    val, _ = _features(np.random.default_rng(1), 2000)
    scores = reference.unit_scores(reference.distances(val))
    assert np.median(scores) == pytest.approx(0.5, abs=0.02)
    assert (scores > 0.99).mean() == pytest.approx(0.01, abs=0.005)
    far = reference.unit_scores(np.array([0.0, reference.quantiles[-1] * 2]))
    assert far.tolist() == [0.0, 1.0]


def test_a_slide_is_flagged_when_more_of_its_units_are_ood_than_its_threshold(reference):
    rng = np.random.default_rng(4)
    fresh, _ = _features(rng, 200)
    ok = reference.summary(reference.distances(fresh))
    assert not ok["flagged"] and ok["score"] <= reference.slide_threshold
    fresh[:60, -1] += 3.0  # 30 % of the slide's tiles unlike anything in training
    bad = reference.summary(reference.distances(fresh))
    assert bad["flagged"] and bad["score"] == pytest.approx(0.3, abs=0.02) and bad["n_ood_units"] >= 60
    assert reference.slide_threshold >= MIN_SLIDE_THRESHOLD


def test_the_slide_threshold_is_the_split_conformal_quantile_of_validation_slides():
    values = np.arange(1, 40) / 100  # 39 slides: rank ceil(0.95 * 40) = 38
    assert conformal_threshold(values, 0.05) == pytest.approx(0.38)
    assert conformal_threshold(values[:10], 0.05) == pytest.approx(0.10)  # too few slides: their largest


def test_a_reference_travels_in_every_kind_of_card_and_a_broken_one_is_refused_naming_the_file(tmp_path, reference):
    torch.manual_seed(0)
    nets = [(create_model("tiny", LABELS), ModelCard(name="t", labels=LABELS, backbone="tiny", tile_px=64, mpp=1.0)),
            (VesselUNet((8, 16)), SegmenterCard(widths=[8, 16])),
            (VesselClassifier(2, (8, 16)), ClassifierCard(labels=LABELS, widths=[8, 16], crop={"crop_px": 32}))]
    for i, (model, card) in enumerate(nets):
        card.ood_reference = reference.to_dict()
        folder = save_net(tmp_path / str(i), model, card)
        _, loaded = load_net(type(card), folder)
        again = loaded.ood()
        x = np.random.default_rng(5).normal(size=(7, reference.dim))
        assert np.allclose(again.distances(x), reference.distances(x), rtol=1e-5)
        doc = json.loads((folder / card.CARD_FILE).read_text())
        doc["ood_reference"]["unit_threshold"] = -1
        (folder / card.CARD_FILE).write_text(json.dumps(doc))
        with pytest.raises(CheckpointError, match=f"{card.CARD_FILE}.*ood_reference.*unit_threshold"):
            load_net(type(card), folder)


def test_a_card_without_a_reference_loads_and_says_it_has_none(tmp_path):
    model = create_model("tiny", LABELS)
    folder = save_net(tmp_path, model, ModelCard(name="t", labels=LABELS, backbone="tiny", tile_px=64, mpp=1.0))
    doc = json.loads((folder / "model.json").read_text())
    del doc["ood_reference"]  # a card written before the field
    (folder / "model.json").write_text(json.dumps(doc))
    assert load_net(ModelCard, folder)[1].ood() is None
    assert reference_problem({}) is None and "needs keys" in reference_problem({"dim": 3})


def test_the_segmenter_tap_reads_the_same_features_from_the_folded_network_and_changes_no_output():
    torch.manual_seed(0)
    net = VesselUNet((8, 16, 24)).eval()
    card = SegmenterCard(widths=[8, 16, 24])
    x = torch.randn(2, 3, 512, 512)
    with torch.inference_mode():
        before = net(x)
    rows = []
    for module in (net, for_inference(net)):
        tap = FeatureTap(module, card)
        with torch.inference_mode():
            after = module(x.contiguous(memory_format=torch.channels_last))
        rows.append(tap.take())
        tap.close()
        assert torch.allclose(after, before, atol=1e-4)
    assert rows[0].shape == (2, 24) and np.allclose(rows[0], rows[1], atol=1e-4)


def test_a_classifier_tap_gives_one_row_per_crop_and_keeps_its_outputs():
    torch.manual_seed(0)
    net = VesselClassifier(3, (8, 16)).eval()
    tap = FeatureTap(net, ClassifierCard(labels=["a", "b", "c"], widths=[8, 16], crop={"crop_px": 32}), outputs=True)
    with torch.inference_mode():
        out = net(torch.randn(5, 3, 32, 32), torch.zeros(5, 2))
    assert tap.take().shape == (5, 16) and np.allclose(tap.take_outputs(), out.numpy())
    tap.clear()
    assert tap.take().shape == (0, 0)


def test_fit_refuses_too_few_units():
    with pytest.raises(ValueError, match="needs"):
        fit_reference(np.zeros((1, 4)), np.zeros((3, 4)), None, unit="tile", features="x")
    ref = fit_reference(np.random.default_rng(0).normal(size=(50, 4)), np.zeros((3, 4)), None, unit="tile",
                        features="x")
    assert isinstance(ref, OODReference) and ref.slide_threshold == MIN_SLIDE_THRESHOLD  # no slides: the floor
