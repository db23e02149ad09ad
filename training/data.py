"""One interface over the three data sources, so the recipe in ``train.py`` does not care where examples come from.

A *unit* is what splits are made of (a slide, or a tile for the "tiles" source); a dataset is built from unit
indices. For slide sources, ``slide_of`` maps dataset positions back to slides for slide-level metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from torch.utils.data import Dataset

from calciscope.data.tile_folders import TileFileDataset, read_tile_table
from calciscope.errors import CalciscopeError
from calciscope.model.encoders import ENCODERS
from calciscope.model.precision import resolve_device
from calciscope.training.augment import build_eval_transform, build_train_transform
from calciscope.training.config import TrainConfig
from calciscope.training.features import embed_examples
from calciscope.training.mil import BagDataset, build_bag_cache, collate_bags
from calciscope.training.sources import TileTrainingDataset, build_tile_examples, read_manifest, tiling_config


@dataclass
class DataBundle:
    labels: list[str]
    groups: list[str]  # patient id per unit
    unit_labels: np.ndarray  # (U, L) for stratification and slide-level metrics
    fixed_split: list[str | None] | None
    make_dataset: Callable[[np.ndarray, bool], Dataset]  # (unit indices, train?) -> dataset
    slide_of: Callable[[Dataset, np.ndarray], np.ndarray] | None  # dataset positions -> unit (slide) index
    collate: Callable | None = None
    describe: dict = field(default_factory=dict)
    unit_ids: list[str] = field(default_factory=list)
    examples: object | None = None  # source "slides": the TileExamples behind the datasets (hard-negative mining)


def load_data(config: TrainConfig, progress=None) -> DataBundle:
    source = config.data.source
    frozen = config.data.encoder in ENCODERS and config.model.head == "tile"
    if source == "slides":
        bundle = _slides_bundle(config, progress)
        return embed_examples(bundle, config, progress) if frozen else bundle
    if source == "tiles":
        bundle = _tiles_bundle(config)
        return embed_examples(bundle, config, progress) if frozen else bundle
    if source == "slide_labels":
        return _bags_bundle(config, progress)
    raise CalciscopeError(f"unknown data source {source!r}")


def _fixed(values: list[str | None]) -> list[str | None] | None:
    return values if any(v is not None for v in values) else None


def _slides_bundle(config: TrainConfig, progress) -> DataBundle:
    records = read_manifest(config.data.manifest, config.data.labels, need_annotations=True)
    examples = build_tile_examples(records, config, progress)
    train_tf = build_train_transform(config.augment, stain_normalize=config.data.stain_normalize)
    eval_tf = build_eval_transform(stain_normalize=config.data.stain_normalize)

    def make(units: np.ndarray, train: bool) -> Dataset:
        """Training: the trainable tiles of ``units``; evaluation: every tissue tile of them."""
        return TileTrainingDataset(examples, examples.tiles_of(units, trainable_only=train),
                                   transform=train_tf if train else eval_tf, seed=config.seed)

    def slide_of(dataset: TileTrainingDataset, positions: np.ndarray) -> np.ndarray:
        return examples.slide_index[dataset.indices[positions]]

    positives = examples.labels.sum(axis=0).astype(int).tolist()
    return DataBundle(
        labels=list(config.data.labels),
        groups=[r.patient_id for r in records],
        unit_labels=examples.slide_labels(),
        fixed_split=_fixed([r.split for r in records]),
        make_dataset=make,
        slide_of=slide_of,
        describe={"source": "slides", "slides": len(records), "tiles": int(len(examples.labels)),
                  "trainable_tiles": int(examples.trainable.sum()),
                  "positive_tiles": dict(zip(config.data.labels, positives))},
        unit_ids=[r.slide_id for r in records],
        examples=examples,
    )


def _tiles_bundle(config: TrainConfig) -> DataBundle:
    table = read_tile_table(config.data.tiles, config.data.labels or None)
    config.data.labels = list(table.label_names)
    train_tf = build_train_transform(config.augment, stain_normalize=config.data.stain_normalize,
                                     tile_px=config.data.tile_px)
    eval_tf = build_eval_transform(stain_normalize=config.data.stain_normalize)

    def make(units: np.ndarray, train: bool) -> Dataset:
        return TileFileDataset(table, units, tile_px=config.data.tile_px, transform=train_tf if train else eval_tf,
                               seed=config.seed)

    return DataBundle(
        labels=list(table.label_names),
        groups=list(table.groups),
        unit_labels=np.asarray(table.labels, np.float32),
        fixed_split=table.fixed_split,
        make_dataset=make,
        slide_of=None,
        describe={"source": "tiles", "tiles": len(table.paths), "multiclass": table.multiclass},
        unit_ids=[str(p) for p in table.paths],
    )


def _bags_bundle(config: TrainConfig, progress) -> DataBundle:
    if not config.data.encoder:
        raise CalciscopeError("data.encoder is required for source 'slide_labels' (a foundation encoder name with "
                              "data.encoder_weights, a checkpoint folder, or a backbone name)")
    records = read_manifest(config.data.manifest, config.data.labels, need_labels=True)
    cache_dir = config.data.cache_dir or str(config.out) + "/embeddings"
    paths = build_bag_cache([r.path for r in records], config.data.encoder, tiling_config(config), cache_dir,
                            workers=config.optim.workers, progress=progress, weights=config.data.encoder_weights,
                            device=resolve_device("auto"), slide_ids=[r.slide_id for r in records])
    labels = np.stack([r.labels for r in records]).astype(np.float32)

    def make(units: np.ndarray, train: bool) -> Dataset:
        return BagDataset([paths[i] for i in units], labels[units], seed=config.seed)

    return DataBundle(
        labels=list(config.data.labels),
        groups=[r.patient_id for r in records],
        unit_labels=labels,
        fixed_split=_fixed([r.split for r in records]),
        make_dataset=make,
        slide_of=None,
        collate=collate_bags,
        describe={"source": "slide_labels", "slides": len(records), "cache_dir": cache_dir},
        unit_ids=[r.slide_id for r in records],
    )
