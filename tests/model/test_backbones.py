"""Backbone registry and create_model: offline builds, local ImageNet weights, channels_last + bf16."""

import pytest
import torch
from safetensors.torch import save_file
from torchvision import models

from calciscope.errors import CalciscopeError
from calciscope.model import BACKBONES, create_model, get_backbone_spec

LABELS = ["medial_calcification", "thrombosis", "vasculitis"]


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_builds_offline_and_gives_one_logit_per_label(name):
    torch.manual_seed(0)
    model = create_model(name, LABELS).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 64, 64))
        emb = model.embed(torch.randn(1, 3, 64, 64))
    assert logits.shape == (1, len(LABELS))
    assert emb.shape == (1, get_backbone_spec(name).feature_dim)
    assert isinstance(model.get_submodule(model.gradcam_layer), torch.nn.Module)


def test_unknown_backbone_error_lists_the_valid_names():
    with pytest.raises(CalciscopeError) as err:
        create_model("resnet1000", LABELS)
    assert "resnet1000" in str(err.value)
    for name in BACKBONES:
        assert name in str(err.value)


def test_imagenet_weights_missing_from_hub_cache_names_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(CalciscopeError) as err:
        create_model("resnet18", LABELS, weights="imagenet")
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(expected) in str(err.value)
    assert "nothing is downloaded" in str(err.value)


def _reference_resnet18():
    torch.manual_seed(123)
    return models.resnet18(weights=None, num_classes=1000)


def test_imagenet_weights_found_in_hub_cache_are_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ref = _reference_resnet18()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(ref.state_dict(), cache / "resnet18-f37072fd.pth")
    model = create_model("resnet18", LABELS, weights="imagenet")
    assert torch.equal(model.backbone.conv1.weight, ref.conv1.weight)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_file_replaces_the_random_backbone_weights(tmp_path, suffix):
    ref = _reference_resnet18()
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pth":
        torch.save(ref.state_dict(), path)
    else:
        save_file(ref.state_dict(), str(path))
    torch.manual_seed(0)
    random_init = create_model("resnet18", LABELS)
    torch.manual_seed(0)
    loaded = create_model("resnet18", LABELS, weights=path)
    assert not torch.equal(random_init.backbone.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    assert torch.equal(loaded.backbone.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    assert torch.equal(loaded.backbone.bn1.running_var, ref.bn1.running_var)
    assert loaded.head.weight.shape == (len(LABELS), 512)  # ImageNet fc dropped, our head kept


def test_weights_of_another_architecture_are_rejected_naming_the_file(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(create_model("tiny", LABELS).backbone.state_dict(), path)
    with pytest.raises(CalciscopeError, match="tiny.pth.*resnet18"):
        create_model("resnet18", LABELS, weights=path)


def test_channels_last_bf16_autocast_matches_fp32():
    torch.manual_seed(0)
    model = create_model("tiny", LABELS).eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x.to(memory_format=torch.channels_last))
    assert out.shape == (4, len(LABELS))
    assert torch.allclose(out.float(), ref, atol=0.1, rtol=0.05)
