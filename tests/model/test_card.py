"""The card base: every network (tile model, segmenter, vessel and artifact classifiers) is saved and loaded through
one path, read strictly, and cards written before the base existed still load."""

import json
import math
import shutil

import pytest
import torch

from calciscope.errors import CheckpointError
from calciscope.model import CardBase, ModelCard, create_model, load_net, save_net, update_card
from calciscope.model.demo import demo_model_dir
from calciscope.model.segmenter import SegmenterCard, VesselUNet, load_segmenter
from calciscope.model.vessel_classifier import ClassifierCard, VesselClassifier, load_classifier

LABELS = ["thrombosis", "vasculitis"]
BASE_FIELDS = {"schema_version", "name", "version", "weights_sha256", "created", "intended_use", "synthetic_demo",
               "calciscope_version", "training", "metrics"}


def _nets():
    torch.manual_seed(0)
    return [
        (create_model("tiny", LABELS), ModelCard(name="tile", labels=LABELS, backbone="tiny", tile_px=64, mpp=1.0)),
        (VesselUNet((8, 16)), SegmenterCard(widths=[8, 16])),
        (VesselClassifier(2, (8, 16)), ClassifierCard(labels=LABELS, widths=[8, 16], crop={"crop_px": 32})),
    ]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["model", "segmenter", "classifier"])
def test_every_kind_shares_the_base_fields_and_the_one_save_load_path(tmp_path, index):
    model, card = _nets()[index]
    assert isinstance(card, CardBase) and BASE_FIELDS <= set(card.to_dict())
    card.metrics["auroc"] = math.nan
    folder = save_net(tmp_path, model, card)
    doc = json.loads((folder / card.CARD_FILE).read_text())
    assert doc["metrics"]["auroc"] is None and doc["schema_version"] == card.SCHEMA_VERSION  # strict JSON
    loaded, again = load_net(type(card), folder)
    assert again.weights_sha256 and again.name == card.name
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("index", [0, 1, 2], ids=["model", "segmenter", "classifier"])
def test_every_kind_refuses_unknown_keys_newer_schemas_and_replaced_weights_naming_the_file(tmp_path, index):
    model, card = _nets()[index]
    folder = save_net(tmp_path, model, card)
    path = folder / card.CARD_FILE
    doc = json.loads(path.read_text())
    for change, message in (({"surprise": 1}, r"unknown keys \['surprise'\]"),
                            ({"schema_version": card.SCHEMA_VERSION + 1}, "newer than this calciscope reads"),
                            ({"created": "yesterday"}, "created"),
                            ({"weights_sha256": "0" * 64}, "does not match")):
        path.write_text(json.dumps({**doc, **change}))
        with pytest.raises(CheckpointError, match=f"{card.CARD_FILE if 'sha' not in str(change) else ''}.*{message}"):
            load_net(type(card), folder)
        path.write_text(json.dumps(doc))
    assert load_net(type(card), folder)[1].weights_sha256 == doc["weights_sha256"]


def test_a_vessel_card_whose_weights_were_saved_for_other_outputs_is_refused(tmp_path):
    model, card = _nets()[2]
    folder = save_net(tmp_path, model, card)
    doc = json.loads((folder / card.CARD_FILE).read_text())
    (folder / card.CARD_FILE).write_text(json.dumps({**doc, "labels": ["thrombosis", "calcification"]}))
    with pytest.raises(CheckpointError, match=r"classifier\.json.*saved with vessel_classifier"):
        load_classifier(folder)


def test_vessel_cards_from_before_the_base_load_with_defaults(tmp_path):
    # the shipped vessel cards as they were written before the card base (schema 1, no name/created/intended_use)
    old_fields = ("name", "version", "created", "intended_use", "ood_reference")
    vessels = demo_model_dir() / "vessels"
    for folder, loader in ((vessels, load_segmenter), (vessels / "classifier", load_classifier),
                           (vessels / "artifact_classifier", load_classifier)):
        copy = shutil.copytree(folder, tmp_path / folder.name, ignore=shutil.ignore_patterns("classifier", "artifact*"))
        card_file = next(copy.glob("*.json"))
        doc = json.loads(card_file.read_text())
        card_file.write_text(json.dumps({**{k: v for k, v in doc.items() if k not in old_fields},
                                         "schema_version": 1}))
        _, card = loader(copy)
        assert card.name and card.created == "" and card.schema_version == card.SCHEMA_VERSION
        assert "synthetic demo, not for clinical use" in card.intended_use and card.ood_reference == {}


def test_update_card_changes_a_field_and_keeps_the_weights(tmp_path):
    folder = shutil.copytree(demo_model_dir() / "vessels", tmp_path / "seg", ignore=shutil.ignore_patterns("*class*"))
    weights = (folder / "segmenter.safetensors").read_bytes()
    card = update_card(SegmenterCard, folder, instance={"min_mean_probability": 0.7})
    assert load_segmenter(folder)[1].instance == {"min_mean_probability": 0.7} == card.instance
    assert (folder / "segmenter.safetensors").read_bytes() == weights
