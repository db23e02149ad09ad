"""The vessel segmenter: a small U-Net that maps H&E at ``mpp`` µm/px to per-pixel maps of vessel wall and of
sectioning artifacts around calcium, saved as ``segmenter.safetensors`` + ``segmenter.json`` (never pickled).

Outputs (sigmoid channels, in ``SegmenterCard.channels`` order): ``vessel`` (inside the outer outline, lumen
included), ``lumen`` (inside the lumen outline, thrombus included) and ``calcium_artifact`` (holes, tears and knife
chatter where calcium was cut). The wall map instances are cut from is vessel × (1 − lumen): a ring around each
lumen, so touching vessels split at their lumens (calciscope.data.vessels.instances), while a whole-vessel target is
what a network learns reliably for thin-walled, packed or occluded vessels. A slide is segmented in overlapping windows of ``WINDOW_PX`` at ``card.mpp``; only
windows that touch tissue are run, and each keeps its centre (the margin only gives context), so the stitched map
does not depend on where the windows fall. Maps are uint8 (probability × 255) to keep memory at one byte per pixel.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
import torch
from torch import nn

from calciscope.data.slides import Slide
from calciscope.data.tissue import TissueMask
from calciscope.data.vessels.instances import InstanceConfig
from calciscope.model.backbones import fold_batchnorm
from calciscope.model.card import CardBase
from calciscope.model.checkpoint import load_net, save_net
from calciscope.model.precision import device_of

WEIGHTS_FILE = "segmenter.safetensors"
CARD_FILE = "segmenter.json"
CHANNELS = ("vessel", "lumen", "calcium_artifact")
WINDOW_PX = 512
MARGIN_PX = 32
SCHEMA_VERSION = 2  # 2: the card base's fields (name, version, created, intended_use); 1 still reads


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class VesselUNet(nn.Module):
    """U-Net with ``len(widths) - 1`` poolings; input sides must be multiples of 2**(len(widths) - 1)."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 96), out_channels: int = len(CHANNELS)):
        super().__init__()
        self.widths = tuple(int(w) for w in widths)
        self.down = nn.ModuleList()
        cin = 3
        for w in self.widths:
            self.down.append(_block(cin, w))
            cin = w
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for w_skip, w_in in zip(self.widths[-2::-1], self.widths[:0:-1]):
            self.up.append(nn.ConvTranspose2d(w_in, w_skip, 2, stride=2))
            self.merge.append(_block(2 * w_skip, w_skip))
        self.out = nn.Conv2d(self.widths[0], out_channels, 1)

    @property
    def multiple(self) -> int:
        return 2 ** (len(self.widths) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else nn.functional.max_pool2d(x, 2))
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, skips[-2::-1]):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.out(x)


@dataclass(kw_only=True)
class SegmenterCard(CardBase):
    """``segmenter.json``: what the segmenter needs at inference (the card base's fields say how it was made)."""

    KIND: ClassVar[str] = "vessel segmenter"
    WEIGHTS_FILE: ClassVar[str] = WEIGHTS_FILE
    CARD_FILE: ClassVar[str] = CARD_FILE
    SCHEMA_VERSION: ClassVar[int] = SCHEMA_VERSION

    name: str = "vessel-segmenter"
    mpp: float = 1.0
    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 96])
    channels: list[str] = field(default_factory=lambda: list(CHANNELS))
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])
    thresholds: dict[str, float] = field(default_factory=lambda: {c: 0.5 for c in CHANNELS})
    # InstanceConfig settings tuned for this segmenter (e.g. {"min_mean_probability": 0.6}); the rest default
    instance: dict[str, Any] = field(default_factory=dict)

    def build(self) -> VesselUNet:
        return VesselUNet(tuple(self.widths), len(self.channels))

    def problem(self) -> str | None:
        if not self.mpp > 0 or not {"vessel", "lumen"} <= set(self.channels) or len(self.widths) < 2:
            return "needs mpp > 0, 'vessel' and 'lumen' channels and at least two widths"
        unknown = set(self.instance) - set(InstanceConfig.__dataclass_fields__)
        if unknown:
            return f"unknown instance settings {sorted(unknown)}"
        return None

    def weights_metadata(self) -> dict[str, str]:
        return {"calciscope_segmenter": json.dumps(self.channels)}

    def fitted_to(self, model: nn.Module) -> dict[str, Any]:
        return {"widths": list(model.widths)}

    def describe(self) -> str:
        return f"U-Net widths {list(self.widths)}, {len(self.channels)} channels"

    def instance_config(self) -> InstanceConfig:
        """The instance settings this segmenter was tuned with (card ``instance``), defaults elsewhere."""
        return InstanceConfig(**self.instance)


def save_segmenter(directory: str | Path, model: VesselUNet, card: SegmenterCard) -> Path:
    """Write ``segmenter.safetensors`` then ``segmenter.json`` (with the weights' sha256) into ``directory``."""
    return save_net(directory, model, card)


def load_segmenter(directory: str | Path) -> tuple[VesselUNet, SegmenterCard]:
    """Model (eval mode, CPU) and card from a segmenter folder; checks the sha256, key set and shapes first."""
    return load_net(SegmenterCard, directory)


def for_inference(model: VesselUNet) -> nn.Module:
    """The segmenter with BatchNorm folded into its convolutions, in channels_last: the same maps to ~1e-5, about
    10 % faster inside predict on 2 CPU cores."""
    return fold_batchnorm(model).to(memory_format=torch.channels_last)


def normalise(rgb: np.ndarray, card: SegmenterCard) -> torch.Tensor:
    """uint8 (..., H, W, 3) → float (..., 3, H, W) standardised with the card's mean/std."""
    x = torch.from_numpy(np.ascontiguousarray(rgb)).float().div_(255.0)
    x = x.movedim(-1, -3)
    mean = torch.tensor(card.mean).view(3, 1, 1)
    std = torch.tensor(card.std).view(3, 1, 1)
    return (x - mean) / std


@dataclass
class VesselMaps:
    """Segmenter output for one slide: uint8 maps (probability × 255) at ``downsample`` of level 0."""

    maps: dict[str, np.ndarray]
    downsample: float
    mpp: float  # µm per map pixel

    def probability(self, channel: str) -> np.ndarray:
        return self.maps[channel].astype(np.float32) / 255.0

    def wall(self) -> np.ndarray:
        """Vessel-wall probability: inside a vessel and not in its lumen."""
        return self.probability("vessel") * (1.0 - self.probability("lumen"))


def segment_slide(slide: Slide, model: nn.Module, card: SegmenterCard, tissue: TissueMask | None = None, *,
                  batch_size: int = 4) -> VesselMaps:
    """Run the segmenter over a slide (windows touching tissue only, when ``tissue`` is given), on the device the
    model is on."""
    device = device_of(model)
    downsample = card.mpp / slide.mpp
    level = slide.best_level_for_downsample(downsample)
    level_ds = slide.level_downsamples[level]
    w0, h0 = slide.dimensions
    out_w, out_h = int(np.ceil(w0 / downsample)), int(np.ceil(h0 / downsample))
    maps = np.zeros((len(card.channels), out_h, out_w), np.uint8)
    step = WINDOW_PX - 2 * MARGIN_PX
    windows = [(x, y) for y in range(0, out_h, step) for x in range(0, out_w, step)
               if tissue is None or _touches_tissue(tissue, x, y, step, downsample)]
    read_px = int(np.ceil(WINDOW_PX * downsample / level_ds))
    with torch.inference_mode():
        for i in range(0, len(windows), batch_size):
            batch = windows[i : i + batch_size]
            rgb = np.stack([_read_window(slide, x, y, downsample, level, read_px) for x, y in batch])
            x = normalise(rgb, card).to(device).contiguous(memory_format=torch.channels_last)
            prob = torch.sigmoid(model(x)).float().cpu().contiguous().numpy()
            for (x, y), p in zip(batch, prob):
                h, w = min(step, out_h - y), min(step, out_w - x)
                maps[:, y : y + h, x : x + w] = np.round(p[:, MARGIN_PX : MARGIN_PX + h, MARGIN_PX : MARGIN_PX + w]
                                                         * 255).astype(np.uint8)
    return VesselMaps({c: maps[k] for k, c in enumerate(card.channels)}, downsample, card.mpp)


def _read_window(slide: Slide, x: int, y: int, downsample: float, level: int, read_px: int) -> np.ndarray:
    """WINDOW_PX² RGB at the map's scale whose centre ``step``² starts at map pixel (x, y); outside = glass."""
    x0, y0 = int(round((x - MARGIN_PX) * downsample)), int(round((y - MARGIN_PX) * downsample))
    region = slide.read_region((x0, y0), level, (read_px, read_px))
    return cv2.resize(region, (WINDOW_PX, WINDOW_PX), interpolation=cv2.INTER_AREA)


def _touches_tissue(tissue: TissueMask, x: int, y: int, step: int, downsample: float) -> bool:
    scale = downsample / tissue.downsample  # map px → tissue-mask px
    r0, c0 = int(y * scale), int(x * scale)
    r1, c1 = int(np.ceil((y + step) * scale)) + 1, int(np.ceil((x + step) * scale)) + 1
    return bool(tissue.tissue[r0:r1, c0:c1].any())
