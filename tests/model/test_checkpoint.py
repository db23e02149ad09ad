"""Checkpoint round trip and every way a checkpoint can be broken: one CheckpointError naming the file."""

import json
import pickle

import pytest
import torch

from calciscope.errors import CalciscopeError, CheckpointError
from calciscope.model import ModelCard, create_model, load_checkpoint, save_checkpoint
from calciscope.model.checkpoint import sha256_file

LABELS = ["medial_calcification", "small_vessel_calcification", "thrombosis", "vasculitis"]


def _card(**overrides):
    fields = dict(name="test-model", labels=LABELS, backbone="tiny", tile_px=64, mpp=1.0,
                  thresholds={"thrombosis": 0.4}, temperature={"vasculitis": 2.0},
                  training={"seed": 7, "data_sha256": "abc"}, metrics={"auroc": float("nan")})
    fields.update(overrides)
    return ModelCard(**fields)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = create_model("tiny", LABELS).eval()
    with torch.no_grad():  # make BN running stats non-trivial so they must round-trip too
        model.backbone.features[0][1].running_mean.uniform_(-1, 1)
    directory = save_checkpoint(tmp_path / "ckpt", model, _card())
    return model, directory


def _rewrite_card(directory, **changes):
    path = directory / "model.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_round_trip_gives_identical_outputs_and_card(saved):
    model, directory = saved
    loaded, card = load_checkpoint(directory)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert card.labels == LABELS and card.backbone == "tiny" and card.tile_px == 64 and card.mpp == 1.0
    assert card.thresholds == {"thrombosis": 0.4}
    assert card.temperature == {"medial_calcification": 1.0, "small_vessel_calcification": 1.0,
                                "thrombosis": 1.0, "vasculitis": 2.0}
    assert card.training == {"seed": 7, "data_sha256": "abc"}
    assert card.metrics == {"auroc": None}  # NaN written as strict-JSON null
    assert card.weights_sha256 == sha256_file(directory / "model.safetensors")
    assert card.embed_dim == 64


def test_loading_the_json_path_works_like_the_directory(saved):
    _, directory = saved
    _, card = load_checkpoint(directory / "model.json")
    assert card.name == "test-model"


def test_mil_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = create_model("tiny", LABELS, head="mil", mil_hidden_dim=16).eval()
    save_checkpoint(tmp_path, model, _card(head="mil"))
    loaded, card = load_checkpoint(tmp_path)
    bag = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        (a_logits, a_att), (b_logits, b_att) = model(bag), loaded(bag)
    assert card.head_config["mil_hidden_dim"] == 16
    assert torch.equal(a_logits, b_logits) and torch.equal(a_att, b_att)


def test_synthetic_demo_card_says_so_in_intended_use():
    assert "synthetic demo, not for clinical use" in _card(synthetic_demo=True).intended_use


def test_truncated_weights_are_rejected_naming_the_file(saved):
    _, directory = saved
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors.*sha256"):
        load_checkpoint(directory)


def test_truncated_weights_with_matching_hash_fail_as_unreadable(saved):
    _, directory = saved
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    _rewrite_card(directory, weights_sha256=sha256_file(weights))
    with pytest.raises(CheckpointError, match="model.safetensors.*not a readable safetensors"):
        load_checkpoint(directory)


def test_pickle_renamed_to_safetensors_is_never_unpickled(saved, tmp_path):
    _, directory = saved
    weights = directory / "model.safetensors"
    marker = tmp_path / "unpickled"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    weights.write_bytes(pickle.dumps(Boom()))
    _rewrite_card(directory, weights_sha256=sha256_file(weights))
    with pytest.raises(CheckpointError, match="model.safetensors.*not a readable safetensors"):
        load_checkpoint(directory)
    assert not marker.exists()


def test_edited_hash_is_rejected(saved):
    _, directory = saved
    _rewrite_card(directory, weights_sha256="0" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors.*does not match"):
        load_checkpoint(directory)


def test_card_with_fewer_labels_than_the_head_is_rejected(saved):
    _, directory = saved
    _rewrite_card(directory, labels=LABELS[:3], temperature={})
    with pytest.raises(CheckpointError, match="model.json.*labels"):
        load_checkpoint(directory)


def test_card_with_renamed_label_is_rejected(saved):
    _, directory = saved
    _rewrite_card(directory, labels=["calcification", *LABELS[1:]],
                  temperature={}, thresholds={})
    with pytest.raises(CheckpointError, match="model.json.*labels"):
        load_checkpoint(directory)


def test_card_naming_another_backbone_is_rejected(saved):
    _, directory = saved
    _rewrite_card(directory, backbone="resnet18", embed_dim=None)
    with pytest.raises(CheckpointError, match="model.json.*backbone"):
        load_checkpoint(directory)


def test_missing_directory_card_and_weights(saved, tmp_path):
    _, directory = saved
    with pytest.raises(CheckpointError, match="nope"):
        load_checkpoint(tmp_path / "nope")
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors.*missing"):
        load_checkpoint(directory)
    (directory / "model.json").unlink()
    with pytest.raises(CheckpointError, match="model.json.*not a calciscope checkpoint"):
        load_checkpoint(directory)


def test_card_that_is_not_json_is_not_a_checkpoint(saved):
    _, directory = saved
    (directory / "model.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="model.json.*not valid JSON"):
        load_checkpoint(directory)


@pytest.mark.parametrize(
    "change, field",
    [({"tile_px": "64"}, "tile_px"), ({"mean": [0.5, 0.5]}, "mean"), ({"labelz": ["a"]}, "labelz"),
     ({"thresholds": {"nonexistent": 0.5}}, "thresholds"), ({"synthetic_demo": "yes"}, "synthetic_demo"),
     ({"slide_calibration": {"nonexistent": {"a": 1.0, "b": 0.0}}}, "slide_calibration"),
     ({"slide_calibration": {"thrombosis": {"a": -1.0, "b": 0.0}}}, "slide_calibration"),
     ({"slide_calibration": {"thrombosis": {"a": 1.0}}}, "slide_calibration")],
)
def test_card_validation_names_the_bad_field(saved, change, field):
    _, directory = saved
    _rewrite_card(directory, **change)
    with pytest.raises(CheckpointError, match=f"model.json.*{field}"):
        load_checkpoint(directory)


def test_slide_calibration_round_trips_and_cards_without_it_still_load(saved):
    _, directory = saved
    _, card = load_checkpoint(directory)
    assert card.slide_calibration == {}  # older cards have no such field: identity
    data = json.loads((directory / "model.json").read_text())
    data.pop("slide_calibration")
    (directory / "model.json").write_text(json.dumps(data))
    assert load_checkpoint(directory)[1].slide_calibration == {}
    _rewrite_card(directory, slide_calibration={"thrombosis": {"a": 2, "b": -0.5}})
    assert load_checkpoint(directory)[1].slide_calibration == {"thrombosis": {"a": 2.0, "b": -0.5}}


def test_unknown_keys_are_allowed_under_extra(saved):
    _, directory = saved
    _rewrite_card(directory, extra={"stain": "HE", "scanner": "Aperio"})
    _, card = load_checkpoint(directory)
    assert card.extra["scanner"] == "Aperio"


def test_saving_a_card_that_does_not_describe_the_model_fails(tmp_path):
    model = create_model("tiny", LABELS[:2])
    with pytest.raises(CalciscopeError, match="labels"):
        save_checkpoint(tmp_path, model, _card())
    assert not (tmp_path / "model.json").exists()
