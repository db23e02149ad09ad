"""Backbone registry: name -> trunk that maps tiles (N, 3, H, W) to embeddings (N, D): torchvision CNNs, the small
CNNs, and the pathology foundation encoders of ``model.encoders`` (timm, local publisher weights).

Backbones are always built with ``weights=None`` (torchvision never downloads). ImageNet weights
come from a local file: a path the user gives, or torchvision's standard file name in the torch hub
cache (``torch.hub.get_dir()/checkpoints/``). Each trunk keeps torchvision's module names, so an
ImageNet state dict loads as-is once its classifier layers are dropped.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.fx.experimental.optimization import fuse
from torchvision import models

from calciscope.errors import CalciscopeError
from calciscope.model.encoders import ENCODERS, EncoderSpec, build_encoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and what it produces.

    build: returns a module mapping (N, 3, H, W) -> (N, feature_dim), global pooling included.
    gradcam_layer: dotted name (inside the trunk) of the last conv block, for Grad-CAM.
    imagenet_weights: torchvision weight enum (its file names locate cached ImageNet weights).
    classifier_prefixes: state-dict key prefixes of the ImageNet classifier, dropped on load.
    """

    name: str
    build: Callable[[], nn.Module]
    feature_dim: int
    gradcam_layer: str
    imagenet_weights: type[models.WeightsEnum] | None = None
    classifier_prefixes: tuple[str, ...] = field(default_factory=tuple)
    encoder: EncoderSpec | None = None  # a foundation encoder (model.encoders): weights from the publisher's file


def _conv_bn_relu(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]


class TinyCNN(nn.Module):
    """Plain conv blocks, each halving the resolution: ``tiny`` (~48k parameters) for fast tests, ``small``
    (two convs per block, ~1M parameters, ~4 MB) for the synthetic demo model."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 48, 64), convs_per_block: int = 1):
        super().__init__()
        blocks, in_ch = [], 3
        for out_ch in widths:
            layers = _conv_bn_relu(in_ch, out_ch)
            for _ in range(convs_per_block - 1):
                layers += _conv_bn_relu(out_ch, out_ch)
            blocks.append(nn.Sequential(*layers, nn.MaxPool2d(2)))
            in_ch = out_ch
        self.features = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.features(x)), 1)


def _resnet(factory: Callable[..., nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        m = factory(weights=None)
        m.fc = nn.Identity()
        return m

    return build


def _drop_classifier(factory: Callable[..., nn.Module]) -> Callable[[], nn.Module]:
    """efficientnet / mobilenet_v3: features -> avgpool -> flatten, classifier removed."""

    def build() -> nn.Module:
        m = factory(weights=None)
        m.classifier = nn.Identity()
        return m

    return build


def _convnext_tiny() -> nn.Module:
    # Keep the pretrained LayerNorm2d + Flatten of the classifier; drop only the final Linear.
    m = models.convnext_tiny(weights=None)
    m.classifier[2] = nn.Identity()
    return m


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("tiny", TinyCNN, 64, "features.3"),
        BackboneSpec("small", partial(TinyCNN, (32, 64, 128, 192), convs_per_block=2), 192, "features.3"),
        BackboneSpec("resnet18", _resnet(models.resnet18), 512, "layer4", models.ResNet18_Weights, ("fc.",)),
        BackboneSpec("resnet34", _resnet(models.resnet34), 512, "layer4", models.ResNet34_Weights, ("fc.",)),
        BackboneSpec("resnet50", _resnet(models.resnet50), 2048, "layer4", models.ResNet50_Weights, ("fc.",)),
        BackboneSpec(
            "efficientnet_b0", _drop_classifier(models.efficientnet_b0), 1280, "features.8",
            models.EfficientNet_B0_Weights, ("classifier.",),
        ),
        BackboneSpec(
            "mobilenet_v3_large", _drop_classifier(models.mobilenet_v3_large), 960, "features.16",
            models.MobileNet_V3_Large_Weights, ("classifier.",),
        ),
        BackboneSpec(
            "convnext_tiny", _convnext_tiny, 768, "features.7",
            models.ConvNeXt_Tiny_Weights, ("classifier.2.",),
        ),
    )
}


def _encoder_backbone(spec: EncoderSpec) -> BackboneSpec:
    # Grad-CAM needs a spatial map: the patch embedding's convolution is the one a ViT has
    return BackboneSpec(spec.name, partial(build_encoder, spec.name), spec.embed_dim, "net.patch_embed.proj",
                        encoder=spec)


def register_encoder_backbone(spec: EncoderSpec) -> EncoderSpec:
    """Add a foundation encoder (e.g. a small ViT in a publisher's layout, for tests) as an encoder and a backbone."""
    ENCODERS[spec.name] = spec
    BACKBONES[spec.name] = _encoder_backbone(spec)
    return spec


for _spec in ENCODERS.values():
    register_encoder_backbone(_spec)


def get_backbone_spec(name: str) -> BackboneSpec:
    """The registry entry for ``name``; an unknown name is a CalciscopeError listing the valid ones."""
    try:
        return BACKBONES[name]
    except (KeyError, TypeError):
        raise CalciscopeError(
            f"unknown backbone {name!r}; choose one of: {', '.join(sorted(BACKBONES))}"
        ) from None


def imagenet_cache_paths(name: str) -> list[Path]:
    """Where torchvision's ImageNet file(s) for ``name`` would sit in the torch hub cache, default first."""
    spec = get_backbone_spec(name)
    if spec.imagenet_weights is None:
        return []
    enum = spec.imagenet_weights
    ordered = [enum.DEFAULT] + [w for w in enum if w is not enum.DEFAULT]
    root = Path(torch.hub.get_dir()) / "checkpoints"
    return [root / w.url.rsplit("/", 1)[-1] for w in ordered]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a local .safetensors or .pth/.pt file (loaded with weights_only: nothing unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise CalciscopeError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # corrupt file, pickle with forbidden globals, ...
        raise CalciscopeError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from None
    for key in ("state_dict", "model"):  # common training-checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CalciscopeError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_backbone_weights(trunk: nn.Module, name: str, weights: str | Path) -> Path:
    """Load ImageNet (or other compatible) weights into ``trunk``; returns the file used.

    ``weights`` is a local file, or "imagenet" for torchvision's file in the torch hub cache.
    The ImageNet classifier is dropped; every other tensor must match the architecture.
    """
    spec = get_backbone_spec(name)
    if isinstance(weights, str) and weights.lower() == "imagenet":
        candidates = imagenet_cache_paths(name)
        if not candidates:
            raise CalciscopeError(f"backbone {name!r} has no ImageNet weights; use weights=None or a local file")
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise CalciscopeError(
                f"ImageNet weights for {name} not found at {candidates[0]} "
                f"(nothing is downloaded; put torchvision's file there or pass its path)"
            )
    else:
        path = Path(weights)
    state = read_state_dict(path)
    state = {k: v for k, v in state.items() if not k.startswith(spec.classifier_prefixes)}
    expected = trunk.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        problems = [
            f"{label} {keys[:3]}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
            if keys
        ]
        raise CalciscopeError(f"{path}: does not hold {name} weights ({'; '.join(problems)})")
    trunk.load_state_dict(state, strict=True)
    return path


def build_backbone(name: str, weights: str | Path | None = None) -> nn.Module:
    """The trunk for ``name`` (randomly initialised, or loaded from local ``weights``; a foundation encoder's are
    the publisher's file or folder)."""
    spec = get_backbone_spec(name)
    if spec.encoder is not None:
        return build_encoder(name, weights)
    trunk = spec.build()
    if weights is not None:
        load_backbone_weights(trunk, name, weights)
    return trunk


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """An eval-mode copy of ``module`` with BatchNorm folded into the convolutions before it (torch.fx): the same
    outputs to ~1e-5, faster on CPU. A module fx cannot trace, or without BatchNorm (a foundation encoder: no copy
    of its weights is made), is returned as it is (in eval mode)."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        return module.eval()
    try:
        return fuse(copy.deepcopy(module).eval())
    except Exception:  # noqa: BLE001 - any tracing failure just means no fusion
        return module.eval()
