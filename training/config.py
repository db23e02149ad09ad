"""Training configuration: one dataclass per stage, loaded from YAML with every key checked.

A run directory gets the resolved configuration as ``config.yaml`` so the run can be read and repeated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from calciscope.errors import CalciscopeError
from calciscope.io import from_dict, read_yaml_mapping, save_yaml

__all__ = ["TrainConfig", "load_config", "save_config", "from_dict", "read_yaml_mapping"]  # the last two: calciscope.io

DEFAULT_LABELS = ["medial_calcification", "small_vessel_calcification", "thrombosis", "vasculitis"]
SOURCES = ("slides", "slide_labels", "tiles")


@dataclass
class DataConfig:
    """Where examples come from.

    source "slides": ``manifest`` CSV (slide_id, patient_id, path, annotations) + QuPath GeoJSON lesions → tile labels.
    source "slide_labels": ``manifest`` CSV with one 0/1 column per label → attention-MIL on cached tile embeddings.
    source "tiles": ``tiles`` is an ImageFolder tree (one folder per class) or a CSV (path, patient_id?, labels...).
    """

    source: str = "slides"
    manifest: str | None = None
    tiles: str | None = None
    labels: list[str] = field(default_factory=lambda: list(DEFAULT_LABELS))
    aliases: dict[str, str] = field(default_factory=dict)
    mpp: float = 0.5  # µm/px of the tiles the model sees
    tile_px: int = 224
    min_tissue: float = 0.5
    min_lesion_fraction: float = 0.05  # a tile is positive when the lesion covers this fraction of it ...
    min_lesion_um2: float = 150.0  # ... or this area
    negatives_per_slide: int | None = None  # keep at most this many all-negative tiles per slide (None: all)
    encoder: str | None = None  # MIL: checkpoint dir (or backbone name) whose embeddings the head learns from
    cache_dir: str | None = None  # MIL: embedding cache (default <out>/embeddings)
    stain_normalize: bool = False  # Macenko-normalise tiles (the same at inference: stored in the card)
    cache_tiles: bool = False  # source "slides": decode every tile once into memory (M × tile_px² × 3 bytes)
    sampling: str = "grid"  # source "slides": grid | vessels (tiles centred on annotated vessels) | both


@dataclass
class SplitConfig:
    """Patient-level splits: no patient is ever in two of train / validation / test."""

    val_fraction: float = 0.2
    test_fraction: float = 0.0  # a frozen test split, held out of every fold
    folds: int = 1  # > 1: k-fold cross-validation (StratifiedGroupKFold), metrics as mean ± sd


@dataclass
class ModelConfig:
    name: str = "calciscope-model"
    version: str = "0.1.0"
    backbone: str = "resnet18"
    weights: str | None = None  # local ImageNet weights file, "imagenet" (torch hub cache) or None
    head: str = "tile"  # "tile" (multi-label tile CNN) or "mil" (attention over tile embeddings)
    init: str | None = None  # start from this checkpoint's weights ("demo" or a folder; same backbone and labels)
    dropout: float = 0.0


@dataclass
class OptimConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0  # linear warm-up, then cosine decay to zero
    accumulate: int = 1  # gradient accumulation steps
    amp: str = "auto"  # auto (bf16 on CPUs that have it, fp16 on CUDA) | bf16 | fp16 | off
    channels_last: bool = True
    class_balance: str = "pos_weight"  # pos_weight | sampler | none
    patience: int = 5  # early stopping on validation macro AUROC; 0 disables
    workers: int = 2
    max_steps_per_epoch: int | None = None  # cap for quick runs


@dataclass
class AugmentConfig:
    """albumentations at train time only; 0 turns a step off."""

    flips: bool = True
    rot90: bool = True
    hed_jitter: float = 0.05  # H&E stain augmentation: per-channel scale/shift in HED space
    brightness_contrast: float = 0.1
    blur_prob: float = 0.1
    jpeg_prob: float = 0.1


@dataclass
class CalibrationConfig:
    temperature: bool = True  # temperature scaling fit on validation
    threshold: str = "youden"  # youden | sensitivity
    target_sensitivity: float = 0.9
    # Slide level (tile models on slides): a per-finding logistic (Platt) map from the aggregated tile probabilities
    # to a calibrated slide probability, fit on the validation slides; stored in the card's ``slide_calibration``
    # and applied by ``inference.aggregate.slide_probabilities``. The card's thresholds are then slide thresholds.
    slide: bool = False
    slide_prior_sd: float = 3.0  # Gaussian prior on (slope - 1, intercept): keeps the fit finite on separable slides


@dataclass
class MiningConfig:
    """Hard-negative mining (tile models on slides).

    At the start of each epoch listed in ``epochs`` (1-based), the model scores every tile of the training slides
    (negatives dropped by ``data.negatives_per_slide`` included); for each finding, the ``top_fraction`` of its
    negative tiles with the highest scores are that finding's hard negatives. Their union joins the training pool
    and is drawn ``weight`` times as often as before; the epoch length stays the same.
    """

    epochs: list[int] = field(default_factory=list)
    top_fraction: float = 0.02
    weight: float = 4.0


@dataclass
class AggregationConfig:
    """Tile probabilities → slide probability (tile models)."""

    method: str = "topk"  # topk (mean of the k highest) | max | quantile
    k: int = 3
    quantile: float = 0.98


@dataclass
class TrainConfig:
    out: str = "runs/calciscope"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    cua_rule: dict[str, Any] = field(default_factory=dict)
    synthetic_demo: bool = False
    description: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self, source: str | Path = "config") -> TrainConfig:
        checks = [
            (self.data.source in SOURCES, f"data.source must be one of {SOURCES}, got {self.data.source!r}"),
            (bool(self.data.labels), "data.labels is empty"),
            (len(set(self.data.labels)) == len(self.data.labels), f"data.labels has duplicates: {self.data.labels}"),
            (self.data.source == "tiles" or self.data.manifest, f"data.manifest is required for source {self.data.source!r}"),
            (self.data.source != "tiles" or self.data.tiles, "data.tiles is required for source 'tiles'"),
            (self.data.sampling in ("grid", "vessels", "both"),
             f"data.sampling must be grid, vessels or both, got {self.data.sampling!r}"),
            (self.data.sampling == "grid" or self.data.source == "slides", "data.sampling vessels|both needs source 'slides'"),
            (self.model.head in ("tile", "mil"), f"model.head must be 'tile' or 'mil', got {self.model.head!r}"),
            (self.optim.amp in ("auto", "bf16", "fp16", "off"), f"optim.amp must be auto|bf16|fp16|off, got {self.optim.amp!r}"),
            (self.optim.class_balance in ("pos_weight", "sampler", "none"), f"optim.class_balance invalid: {self.optim.class_balance!r}"),
            (self.optim.epochs >= 1 and self.optim.batch_size >= 1 and self.optim.accumulate >= 1, "optim.epochs, batch_size and accumulate must be ≥ 1"),
            (0 < self.split.val_fraction < 1, f"split.val_fraction must be in (0, 1), got {self.split.val_fraction}"),
            (0 <= self.split.test_fraction < 1, f"split.test_fraction must be in [0, 1), got {self.split.test_fraction}"),
            (self.split.folds >= 1, f"split.folds must be ≥ 1, got {self.split.folds}"),
            (self.calibration.threshold in ("youden", "sensitivity"), f"calibration.threshold invalid: {self.calibration.threshold!r}"),
            (self.aggregation.method in ("topk", "max", "quantile"), f"aggregation.method invalid: {self.aggregation.method!r}"),
            (self.calibration.slide_prior_sd > 0, f"calibration.slide_prior_sd must be > 0, got {self.calibration.slide_prior_sd}"),
            (all(2 <= e <= self.optim.epochs for e in self.mining.epochs),
             f"mining.epochs must lie in [2, optim.epochs = {self.optim.epochs}], got {self.mining.epochs}"),
            (not self.mining.epochs or self.data.source == "slides", "mining needs data.source 'slides'"),
            (0 < self.mining.top_fraction <= 1, f"mining.top_fraction must be in (0, 1], got {self.mining.top_fraction}"),
            (self.mining.weight >= 1, f"mining.weight must be >= 1, got {self.mining.weight}"),
        ]
        for ok, message in checks:
            if not ok:
                raise CalciscopeError(f"{source}: {message}")
        return self


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML (or JSON) training config; unknown keys and wrong types are errors naming the key."""
    path = Path(path)
    raw = read_yaml_mapping(path)
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    config = from_dict(TrainConfig, raw, str(path))
    _resolve_paths(config, path.parent)
    return config.validate(path)


def _resolve_paths(config: TrainConfig, base: Path) -> None:
    """Relative data paths in a config file are relative to that file; the output folder to the working dir."""
    for attr in ("manifest", "tiles", "cache_dir"):
        value = getattr(config.data, attr)
        if value and not Path(value).is_absolute():
            setattr(config.data, attr, str((base / value).resolve()))
    if config.model.init and config.model.init != "demo" and not Path(config.model.init).is_absolute():
        config.model.init = str((base / config.model.init).resolve())


def save_config(config: TrainConfig, path: str | Path) -> Path:
    """The resolved config as YAML (``config.yaml`` beside a run's outputs)."""
    return save_yaml(config, path)
