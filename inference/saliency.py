"""Where in a tile the model looks: Grad-CAM (default) or integrated gradients, with captum.

- Guided Grad-CAM (default; Selvaraju et al. 2017, section 3): Grad-CAM on the model's last convolutional block
  (``model.gradcam_layer``, from the backbone registry), which says *which* finding, multiplied pixel by pixel by
  guided backpropagation, which says *where* at tile resolution. One backward pass per tile.
- Grad-CAM alone: the class map of that block upsampled (one cell per ~16 px of tile for the small CNN). Cheap, but
  too coarse to point inside a small lesion: its peak tends to sit on the vessel wall beside a thrombus.
- Integrated gradients (Sundararajan et al. 2017) from a blank (white glass) baseline: pixel-level, about
  ``n_steps`` forward/backward passes per tile.

Maps are (K, H, W) float32 in [0, 1] at tile resolution. For an attention-MIL model the explained score is the
tile's own logit under the slide classifier (what the tile would say alone); for a tile model, its finding logit.
"""

from __future__ import annotations

import copy
import warnings
import weakref

import cv2
import numpy as np
import torch
from torch import nn

from calciscope.errors import CalciscopeError
from calciscope.inference.config import SALIENCY_METHODS as METHODS

BLUR_SIGMA_PER_PX = 1 / 56  # pixel attributions are speckled: a Gaussian of ~2 px per 112 px tile turns them into regions


class _TileLogits(nn.Module):
    """Tiles (N, 3, H, W) → per-finding logits (N, L), for tile and MIL models alike (fp32, gradients on)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self.model, "head_kind", "tile") == "mil":
            mil = self.model.mil
            h = mil.feature(self.model.embed(x))
            return h @ mil.classifier.weight.t() + mil.classifier.bias
        return self.model(x)


def _layer(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise CalciscopeError(f"Grad-CAM layer {name!r} not found in the model") from None


_OUT_OF_PLACE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model → its copy, made once per model


def _without_inplace_relu(model: nn.Module) -> nn.Module:
    """Guided backprop hooks every ReLU; an in-place one (torchvision's ResNets) breaks autograd's view tracking,
    so such a model is explained through a copy whose ReLUs are out of place (same function, same weights), made
    once per model (inference weights do not change)."""
    if not any(isinstance(m, nn.ReLU) and m.inplace for m in model.modules()):
        return model
    if model not in _OUT_OF_PLACE:
        copied = copy.deepcopy(model)
        for m in copied.modules():
            if isinstance(m, nn.ReLU):
                m.inplace = False
        _OUT_OF_PLACE[model] = copied
    return _OUT_OF_PLACE[model]


def saliency_maps(model: nn.Module, tiles: np.ndarray, targets: np.ndarray, mean, std, *,
                  method: str = "guided-gradcam", ig_steps: int = 32, device: torch.device | str = "cpu") -> np.ndarray:
    """Saliency of ``targets[i]`` (a label index) on ``tiles[i]`` (uint8 RGB (K, H, W, 3)) → (K, H, W) in [0, 1]."""
    from captum.attr import GuidedGradCam, IntegratedGradients, LayerAttribution, LayerGradCam

    if method not in METHODS or method == "none":
        raise CalciscopeError(f"unknown saliency method {method!r}; choose one of: {', '.join(METHODS[:-1])}")
    if len(tiles) == 0:
        return np.zeros((0, *tiles.shape[1:3]), np.float32)
    device = torch.device(device)
    x = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2).float().div(255.0).to(device)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    x = ((x - mean_t) / std_t).contiguous()
    target = torch.as_tensor(np.asarray(targets), dtype=torch.long, device=device)
    net = _TileLogits(_without_inplace_relu(model) if method == "guided-gradcam" else model).eval()
    size = tuple(tiles.shape[1:3])
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")  # captum's notice, by design
        if method == "guided-gradcam":
            guided = GuidedGradCam(net, _layer(net, f"model.{model.gradcam_layer}"))
            attr = guided.attribute(x.requires_grad_(True), target=target).detach().abs().sum(dim=1)
        elif method == "gradcam":
            cam = LayerGradCam(net, _layer(net, f"model.{model.gradcam_layer}"))
            attr = cam.attribute(x.requires_grad_(True), target=target, relu_attributions=True)
            attr = LayerAttribution.interpolate(attr.detach(), size, interpolate_mode="bilinear")[:, 0]
        else:
            baseline = (torch.ones_like(x[:1]) - mean_t) / std_t  # white glass
            ig = IntegratedGradients(net)
            attr = ig.attribute(x, baselines=baseline.expand_as(x), target=target, n_steps=ig_steps,
                                internal_batch_size=max(1, ig_steps))
            attr = attr.detach().abs().sum(dim=1)
    maps = attr.float().cpu().numpy()
    if method != "gradcam":  # pixel attributions
        sigma = max(1.0, size[0] * BLUR_SIGMA_PER_PX)
        maps = np.stack([cv2.GaussianBlur(m, (0, 0), sigma) for m in maps])
    return _normalise(maps)


def _normalise(maps: np.ndarray) -> np.ndarray:
    maps = np.nan_to_num(maps.astype(np.float32), nan=0.0)
    lo = maps.reshape(len(maps), -1).min(axis=1)[:, None, None]
    hi = maps.reshape(len(maps), -1).max(axis=1)[:, None, None]
    return np.where(hi > lo, (maps - lo) / np.maximum(hi - lo, 1e-12), 0.0).astype(np.float32)


def peak(saliency: np.ndarray) -> tuple[float, float]:
    """(x, y) in tile pixels (pixel centre) of the map's maximum."""
    y, x = np.unravel_index(int(np.argmax(saliency)), saliency.shape)
    return float(x) + 0.5, float(y) + 0.5


def overlay(tile: np.ndarray, saliency: np.ndarray, *, alpha: float = 0.45) -> np.ndarray:
    """The tile beside the tile with its saliency (jet colormap) blended on and the peak marked: RGB uint8."""
    colour = cv2.applyColorMap((np.clip(saliency, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    blended = cv2.addWeighted(tile, 1 - alpha, colour, alpha, 0)
    px, py = (int(v) for v in peak(saliency))
    arm = max(3, tile.shape[0] // 16)
    cv2.drawMarker(blended, (px, py), (255, 255, 255), cv2.MARKER_CROSS, 2 * arm, 2)
    gap = np.full((tile.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([tile, gap, blended], axis=1)
