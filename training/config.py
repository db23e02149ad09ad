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
AUTO_EPOCH_SAMPLES = 4000  # optim.epochs unset: about this many training examples seen ...
AUTO_MIN_EPOCHS, AUTO_MAX_EPOCHS = 10, 100  # ... in this many epochs


def auto_epochs(n_train: int) -> int:
    """Epochs when ``optim.epochs`` is not set: about AUTO_EPOCH_SAMPLES examples seen, 10 to 100 epochs."""
    return int(min(AUTO_MAX_EPOCHS, max(AUTO_MIN_EPOCHS, -(-AUTO_EPOCH_SAMPLES // max(1, n_train)))))


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
    labels: list[str] | None = None  # None: the data's classes for "tiles", the four findings for slide sources
    aliases: dict[str, str] = field(default_factory=dict)
    mpp: float = 0.5  # µm/px of the tiles the model sees
    tile_px: int = 224
    min_tissue: float = 0.5
    min_lesion_fraction: float = 0.05  # a tile is positive when the lesion covers this fraction of it ...
    min_lesion_um2: float = 150.0  # ... or this area
    negatives_per_slide: int | None = None  # keep at most this many all-negative tiles per slide (None: all)
    encoder: str | None = None  # MIL / frozen encoder: a foundation encoder name (model.encoders), a checkpoint dir
    encoder_weights: str | None = None  # the foundation encoder's local weights (file or folder, publisher's layout)
    cache_dir: str | None = None  # embedding cache (default <out>/embeddings; or what `calciscope features` wrote)
    stain_normalize: bool | str = False  # true / "macenko" or "reinhard": normalise tiles, the same at inference
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
    hidden_dim: int = 0  # tile head on a frozen encoder (data.encoder): 0 linear, > 0 an MLP with this width


SELECT = ("auto", "best_val", "last", "swa")


@dataclass
class OptimConfig:
    """AdamW, linear warm-up then cosine decay to zero over the run.

    ``epochs`` None: enough epochs to show the model about ``AUTO_EPOCH_SAMPLES`` training examples (10 to 100).
    ``select`` says which weights ship (``model/``): ``best_val`` the epoch with the best validation score (a later
    epoch within ``tie_tolerance`` of the best wins the tie); ``last`` the last epoch; ``swa`` the average of the last
    ``swa_epochs`` epochs' weights; ``auto`` (default) ``last`` when the validation split is small (fewer than
    ``select_min_val`` examples, or fewer than ``select_min_per_class`` positives or negatives of a label) or
    saturates (best score >= ``saturation``), else ``best_val``. metrics.csv and the card say which epoch shipped
    and why.
    """

    epochs: int | None = None
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0  # linear warm-up, then cosine decay to zero
    accumulate: int = 1  # gradient accumulation steps
    amp: str = "auto"  # auto (bf16 on CPUs that have it, fp16 on CUDA) | bf16 | fp16 | off
    channels_last: bool = True
    class_balance: str = "pos_weight"  # pos_weight | sampler | none
    patience: int = 0  # early stopping on validation macro AUROC (saturated epochs never count); 0 disables
    workers: int = 2
    max_steps_per_epoch: int | None = None  # cap for quick runs
    select: str = "auto"  # auto | best_val | last | swa
    tie_tolerance: float = 0.002  # validation scores this close to the best are ties (the later epoch wins)
    saturation: float = 0.999  # a validation AUROC this high cannot rank epochs
    select_min_val: int = 200
    select_min_per_class: int = 20
    swa_epochs: int = 5


STAIN_AUGMENT = ("hestain", "hed", "none")


@dataclass
class AugmentConfig:
    """albumentations at train time only; 0 turns a step off (training/augment.py lists the order).

    ``stain``: ``hestain`` (albumentations ``HEStain``: random preset stain matrices, intensities scaled by
    1 ± ``hestain_scale`` and shifted by ± ``hestain_shift``, with probability ``stain_prob``), ``hed`` (HED jitter
    of ± ``hed_jitter``, Tellez et al. 2018) or ``none``. ``hue`` / ``saturation``: ColorJitter ranges.
    ``crop_scale``: tiles larger than ``data.tile_px`` get a RandomResizedCrop of this to 1 of their area (1: the
    centre crop every epoch).
    """

    flips: bool = True
    rot90: bool = True
    stain: str = "hestain"
    stain_prob: float = 0.8
    hestain_scale: float = 0.3
    hestain_shift: float = 0.2
    hed_jitter: float = 0.05  # stain "hed": per-channel scale/shift in HED space
    hue: float = 0.05
    saturation: float = 0.2
    brightness_contrast: float = 0.1
    crop_scale: float = 0.5
    blur_prob: float = 0.1
    jpeg_prob: float = 0.1


@dataclass
class CalibrationConfig:
    """Temperature and thresholds from validation, when validation can support them.

    ``robust`` (default): a label whose validation has fewer than ``min_per_class`` positives or negatives gets a
    temperature bounded to [1, ``max_temperature``] (never sharpened by a handful of examples); one whose validation
    is separable (every positive above every negative) keeps T = 1 and the max-margin threshold (the middle of the
    gap, in logits), and the card carries a calibration warning: its probabilities were not checked on data.
    ``robust: false`` fits T in [0.05, 20] and Youden thresholds whatever validation holds.
    """

    temperature: bool = True  # temperature scaling fit on validation
    threshold: str = "youden"  # youden | sensitivity
    target_sensitivity: float = 0.9
    robust: bool = True
    min_per_class: int = 20
    max_temperature: float = 5.0
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
            (self.data.labels is None or bool(self.data.labels), "data.labels is empty (leave it out: the data's "
                                                                 "classes)"),
            (self.data.labels is None or len(set(self.data.labels)) == len(self.data.labels),
             f"data.labels has duplicates: {self.data.labels}"),
            (self.data.stain_normalize in (False, True, "macenko", "reinhard", "none"),
             f"data.stain_normalize must be false, true, macenko or reinhard, got {self.data.stain_normalize!r}"),
            (self.data.source == "tiles" or self.data.manifest, f"data.manifest is required for source {self.data.source!r}"),
            (self.data.source != "tiles" or self.data.tiles, "data.tiles is required for source 'tiles'"),
            (self.data.sampling in ("grid", "vessels", "both"),
             f"data.sampling must be grid, vessels or both, got {self.data.sampling!r}"),
            (self.data.sampling == "grid" or self.data.source == "slides", "data.sampling vessels|both needs source 'slides'"),
            (self.model.head in ("tile", "mil"), f"model.head must be 'tile' or 'mil', got {self.model.head!r}"),
            (self.optim.amp in ("auto", "bf16", "fp16", "off"), f"optim.amp must be auto|bf16|fp16|off, got {self.optim.amp!r}"),
            (self.optim.class_balance in ("pos_weight", "sampler", "none"), f"optim.class_balance invalid: {self.optim.class_balance!r}"),
            ((self.optim.epochs is None or self.optim.epochs >= 1) and self.optim.batch_size >= 1
             and self.optim.accumulate >= 1, "optim.epochs, optim.batch_size and optim.accumulate must be ≥ 1"),
            (self.optim.select in SELECT, f"optim.select must be one of {SELECT}, got {self.optim.select!r}"),
            (self.optim.swa_epochs >= 1, f"optim.swa_epochs must be ≥ 1, got {self.optim.swa_epochs}"),
            (self.augment.stain in STAIN_AUGMENT,
             f"augment.stain must be one of {STAIN_AUGMENT}, got {self.augment.stain!r}"),
            (0 < self.augment.crop_scale <= 1, f"augment.crop_scale must be in (0, 1], got {self.augment.crop_scale}"),
            (self.calibration.max_temperature >= 1,
             f"calibration.max_temperature must be ≥ 1, got {self.calibration.max_temperature}"),
            (0 < self.split.val_fraction < 1, f"split.val_fraction must be in (0, 1), got {self.split.val_fraction}"),
            (0 <= self.split.test_fraction < 1, f"split.test_fraction must be in [0, 1), got {self.split.test_fraction}"),
            (self.split.folds >= 1, f"split.folds must be ≥ 1, got {self.split.folds}"),
            (self.calibration.threshold in ("youden", "sensitivity"), f"calibration.threshold invalid: {self.calibration.threshold!r}"),
            (self.aggregation.method in ("topk", "max", "quantile"), f"aggregation.method invalid: {self.aggregation.method!r}"),
            (self.calibration.slide_prior_sd > 0, f"calibration.slide_prior_sd must be > 0, got {self.calibration.slide_prior_sd}"),
            (all(2 <= e <= (self.optim.epochs or AUTO_MAX_EPOCHS) for e in self.mining.epochs),
             f"mining.epochs must lie in [2, optim.epochs = {self.optim.epochs}], got {self.mining.epochs}"),
            (not self.mining.epochs or self.data.source == "slides", "mining needs data.source 'slides'"),
            (0 < self.mining.top_fraction <= 1, f"mining.top_fraction must be in (0, 1], got {self.mining.top_fraction}"),
            (self.mining.weight >= 1, f"mining.weight must be >= 1, got {self.mining.weight}"),
        ]
        for ok, message in checks:
            if not ok:
                raise CalciscopeError(f"{source}: {message}")
        if self.data.labels is None and self.data.source != "tiles":
            self.data.labels = list(DEFAULT_LABELS)
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
    for attr in ("manifest", "tiles", "cache_dir", "encoder_weights"):
        value = getattr(config.data, attr)
        if value and not Path(value).is_absolute():
            setattr(config.data, attr, str((base / value).resolve()))
    if config.model.init and config.model.init != "demo" and not Path(config.model.init).is_absolute():
        config.model.init = str((base / config.model.init).resolve())


def save_config(config: TrainConfig, path: str | Path) -> Path:
    """The resolved config as YAML (``config.yaml`` beside a run's outputs)."""
    return save_yaml(config, path)
