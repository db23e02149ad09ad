"""The vessel classifier: a small CNN that judges each vessel from a crop centred on it and scaled to it.

A grid tile sees a fixed 112 µm window, so a 20 µm thrombosed arteriole is a few pixels of it and a 250 µm
calcified artery does not fit. The classifier instead reads, per vessel, a square of ``context`` × the vessel's
longest side (clamped to [``min_side_um``, ``max_side_um``]) centred on its outline, resampled to ``crop_px``:
every vessel fills the same share of its crop, whatever its calibre. The calibre itself (log outer diameter, what
separates medial from small-vessel calcification) and the compartment (subcutaneous fat or not) join the pooled
image features before the last layer. One logit per finding; per-finding temperatures, thresholds and a slide-level
map (highest vessel probability → slide probability) are fit on validation slides and stored in the card.

Saved as ``classifier.safetensors`` + ``classifier.json`` (never pickled), by convention in a ``classifier/``
folder inside the vessel segmenter's folder, where ``predict`` finds it (``calciscope train-vessel-classifier``).
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import cv2
import numpy as np
import torch
from torch import nn

from calciscope.data.slides import Slide
from calciscope.model.aggregate import slide_from_vessels
from calciscope.model.calibration import apply_temperature
from calciscope.model.card import CardBase
from calciscope.model.checkpoint import load_net, save_net
from calciscope.model.precision import Precision, choose_precision, device_of

WEIGHTS_FILE = "classifier.safetensors"
CARD_FILE = "classifier.json"
SCHEMA_VERSION = 2  # 2: the card base's fields (name, version, created, intended_use); 1 still reads
N_EXTRA = 2  # standardised log outer diameter, in subcutaneous fat (0/1)
VESSEL = "vessel"  # the extra output of a classifier that also judges whether an outline is a vessel at all
# the extra output of a classifier that also judges whether calcium was lost at the vessel in sectioning (a hole where
# the deposit fell out, a tear it dragged, knife chatter): the vessel is flagged, a negative call there is weaker
ARTIFACT = "calcium_artifact"


@dataclass(frozen=True)
class CropConfig:
    """How a vessel's crop is cut: ``context`` × the outline's longest side (min-area rectangle), clamped."""

    crop_px: int = 64
    context: float = 2.0
    min_side_um: float = 48.0
    max_side_um: float = 400.0


def crop_geometry(polygon: np.ndarray, mpp: float, crop: CropConfig, scale: float = 1.0,
                  shift: tuple[float, float] = (0.0, 0.0)) -> tuple[float, float, float]:
    """(centre x, centre y, side) in level-0 px of ``polygon``'s crop; ``scale`` and ``shift`` (fractions of the
    side) jitter it for training."""
    poly = np.asarray(polygon, np.float32).reshape(-1, 2)
    m = cv2.moments(poly)
    cx, cy = (m["m10"] / m["m00"], m["m01"] / m["m00"]) if m["m00"] > 0 else tuple(poly.mean(axis=0))
    (_, _), (a, b), _ = cv2.minAreaRect(poly)
    side_um = float(np.clip(crop.context * max(a, b) * mpp, crop.min_side_um, crop.max_side_um)) * scale
    side = side_um / mpp
    return float(cx + shift[0] * side), float(cy + shift[1] * side), side


def read_crop(slide: Slide, cx: float, cy: float, side: float, crop_px: int) -> np.ndarray:
    """(crop_px, crop_px, 3) uint8: the level-0 square of ``side`` px centred on (cx, cy), read from the finest level
    at or below the needed downsample and resampled (area when shrinking, bilinear when enlarging)."""
    level = slide.best_level_for_downsample(side / crop_px)
    level_ds = slide.level_downsamples[level]
    n = max(1, int(math.ceil(side / level_ds)))
    region = slide.read_region((int(round(cx - side / 2)), int(round(cy - side / 2))), level, (n, n))
    interp = cv2.INTER_AREA if n > crop_px else cv2.INTER_LINEAR
    return cv2.resize(region, (crop_px, crop_px), interpolation=interp)


def vessel_extras(outer_um: np.ndarray, in_fat: np.ndarray) -> np.ndarray:
    """(N, N_EXTRA) float32: log outer diameter (µm) centred on 30 µm and scaled, and the fat flag."""
    d = np.maximum(np.asarray(outer_um, np.float64), 1.0)
    return np.column_stack([(np.log(d) - math.log(30.0)) / 1.0, np.asarray(in_fat, np.float64)]).astype(np.float32)


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class VesselClassifier(nn.Module):
    """Conv blocks (one conv in the first, two after, max-pool between) → global average pool, concatenated with
    the vessel's extras → a hidden layer → one logit per finding."""

    def __init__(self, n_labels: int, widths: tuple[int, ...] = (16, 32, 64, 128), hidden: int = 64,
                 dropout: float = 0.2):
        super().__init__()
        self.widths = tuple(int(w) for w in widths)
        layers: list[nn.Module] = _conv(3, self.widths[0])
        for cin, cout in zip(self.widths, self.widths[1:]):
            layers += [nn.MaxPool2d(2), *_conv(cin, cout), *_conv(cout, cout)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(self.widths[-1] + N_EXTRA, hidden), nn.ReLU(inplace=True),
                                  nn.Dropout(dropout), nn.Linear(hidden, n_labels))

    def forward(self, x: torch.Tensor, extras: torch.Tensor) -> torch.Tensor:
        pooled = self.features(x).mean(dim=(2, 3))
        return self.head(torch.cat([pooled, extras.to(pooled.dtype)], dim=1))


@dataclass(kw_only=True)
class ClassifierCard(CardBase):
    """``classifier.json``: what the classifier needs at inference (the card base's fields say how it was made)."""

    KIND: ClassVar[str] = "vessel classifier"
    WEIGHTS_FILE: ClassVar[str] = WEIGHTS_FILE
    CARD_FILE: ClassVar[str] = CARD_FILE
    SCHEMA_VERSION: ClassVar[int] = SCHEMA_VERSION

    labels: list[str] = field(default_factory=list)
    crop: dict[str, Any] = field(default_factory=lambda: asdict(CropConfig()))
    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    hidden: int = 64
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])
    temperature: dict[str, float] = field(default_factory=dict)  # per finding; logits are divided by it
    # per-vessel Youden thresholds on validation, for reference (per-vessel calls use VESSEL_POSITIVE, 0.5)
    thresholds: dict[str, float] = field(default_factory=dict)
    # {label: {"a", "b"[, "grid"]}}: logistic map from a slide's highest calibrated vessel probability (and, with
    # "grid", the tile model's grid-tile slide probability: model.aggregate.apply_slide_calibration) to a slide one
    slide_calibration: dict[str, dict[str, float]] = field(default_factory=dict)
    slide_thresholds: dict[str, float] = field(default_factory=dict)  # on calibrated slide probabilities; else 0.5
    # segmenter outlines with a mean probability from this up to the segmenter's own filter are judged too (see
    # calciscope.inference.vessels.listed_vessels); None: no candidates
    candidate_min_mean_probability: float | None = None
    vessel_output: bool = False  # a "vessel" output after the findings: is the outline a vessel at all
    # with it: a vessel is listed when its vessel probability reaches this or a finding reaches 0.5, a faint outline
    # when its vessel probability reaches this (chosen on validation slides for the highest min(detection recall,
    # precision)); None: the segmenter's vessels, and faint outlines with vessel probability ≥ 0.5 and a lesion
    vessel_threshold: float | None = None
    artifact_output: bool = False  # a "calcium_artifact" output after the findings (before "vessel")
    artifact_threshold: float = 0.5  # a vessel is flagged calcium_artifact at this calibrated probability

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.name:  # cards from before the base had no name
            self.name = "calcium-artifact-classifier" if self.artifact_output and not self.labels \
                else "vessel-classifier"

    @property
    def crop_config(self) -> CropConfig:
        return CropConfig(**self.crop)

    @property
    def outputs(self) -> list[str]:
        """The model's output columns: the findings, then ``ARTIFACT`` and ``VESSEL`` when it judges those too."""
        return (list(self.labels) + ([ARTIFACT] if self.artifact_output else [])
                + ([VESSEL] if self.vessel_output else []))

    def build(self) -> VesselClassifier:
        return VesselClassifier(len(self.outputs), tuple(self.widths), self.hidden)

    def problem(self) -> str | None:
        try:
            crop = self.crop_config
        except TypeError as exc:
            return f"crop: {exc}"
        if not (self.labels or self.artifact_output) or len(self.widths) < 2 \
                or crop.crop_px < 2 ** (len(self.widths) - 1) \
                or not 0 < crop.min_side_um <= crop.max_side_um or crop.context <= 0:
            return "needs labels (or an artifact output), at least two widths and a crop of positive size"
        return None

    def weights_metadata(self) -> dict[str, str]:
        return {"calciscope_vessel_classifier": json.dumps(self.labels)}

    def fitted_to(self, model: nn.Module) -> dict[str, Any]:
        return {"widths": list(model.widths)}

    def describe(self) -> str:
        return f"classifier widths {list(self.widths)}, hidden {self.hidden}, {len(self.outputs)} outputs"


def save_classifier(directory: str | Path, model: VesselClassifier, card: ClassifierCard) -> Path:
    """Write ``classifier.safetensors`` then ``classifier.json`` (with the weights' sha256) into ``directory``."""
    return save_net(directory, model, card)


def load_classifier(directory: str | Path) -> tuple[VesselClassifier, ClassifierCard]:
    """Model (eval mode, CPU) and card from a classifier folder; checks the sha256, key set and shapes first."""
    return load_net(ClassifierCard, directory)


def to_input(crops: np.ndarray, card: ClassifierCard) -> torch.Tensor:
    """(B, H, W, 3) uint8 → normalised (B, 3, H, W) float32, channels_last."""
    x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(card.mean).view(1, 3, 1, 1)
    std = torch.tensor(card.std).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def calibrated(logits: np.ndarray, card: ClassifierCard) -> np.ndarray:
    """(N, outputs) probabilities: logits divided by each output's temperature (1 when the card has none)."""
    return apply_temperature(logits, card.temperature, card.outputs)


@torch.inference_mode()
def classifier_logits(model: nn.Module, card: ClassifierCard, crops: np.ndarray, extras: np.ndarray,
                      batch_size: int = 128, precision: Precision | None = None) -> np.ndarray:
    """(N, outputs) raw logits of (N, H, W, 3) uint8 crops with their (N, N_EXTRA) extras, on the model's device, in
    ``precision`` (None: fp32)."""
    device = device_of(model)
    out = [np.zeros((0, len(card.outputs)), np.float32)]
    for i in range(0, len(crops), batch_size):
        x = to_input(crops[i : i + batch_size], card).to(device)
        extra = torch.from_numpy(extras[i : i + batch_size]).to(device)
        if precision is None:
            out.append(model(x, extra).float().cpu().numpy())
            continue
        with precision.autocast():
            out.append(model(x, extra).float().cpu().numpy())
    return np.vstack(out)


def classify_vessels(slide: Slide, polygons: list[np.ndarray], outer_um: np.ndarray, in_fat: np.ndarray,
                     model: nn.Module, card: ClassifierCard, batch_size: int = 128, *,
                     precision: Precision | None = None,
                     progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """(N, outputs) calibrated per-vessel probabilities of the vessels outlined by ``polygons`` on ``slide``.

    Runs in ``precision`` (default: as the tile model would on the model's device: bf16 autocast on CPUs that have
    it, channels_last); the crops of the next batch are read in a thread while a batch runs.
    ``progress(vessels done, vessels total)`` after each batch."""
    if not polygons:
        return np.zeros((0, len(card.outputs)), np.float64)
    precision = precision or choose_precision("auto", channels_last=True, device=device_of(model))
    crop = card.crop_config
    extras = vessel_extras(outer_um, in_fat)
    starts = range(0, len(polygons), batch_size)

    def read(i: int) -> np.ndarray:
        return np.stack([read_crop(slide, *crop_geometry(p, slide.mpp, crop), crop.crop_px)
                         for p in polygons[i : i + batch_size]])

    logits = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(read, 0)
        for i in starts:
            crops = future.result()
            if i + batch_size < len(polygons):
                future = pool.submit(read, i + batch_size)
            logits.append(classifier_logits(model, card, crops, extras[i : i + batch_size], batch_size, precision))
            if progress is not None:
                progress(min(i + batch_size, len(polygons)), len(polygons))
    return calibrated(np.vstack(logits), card)


def slide_probabilities(vessel_probs: np.ndarray, card: ClassifierCard, labels: list[str] | None = None,
                        grid: np.ndarray | None = None) -> np.ndarray:
    """(L,) slide probabilities from (N, L) calibrated vessel probabilities (columns ``labels``, default the card's):
    the highest per finding (0 without vessels), through the card's ``slide_calibration`` (``grid``: the tile
    model's slide probabilities over the grid tiles, for findings whose map has a grid route)."""
    return slide_from_vessels(vessel_probs, card.slide_calibration,
                              list(card.labels if labels is None else labels), grid).astype(np.float32)
