"""Fit a network's out-of-distribution reference (``model.ood``) at the end of its training, from its own data: the
training split is the reference, the validation split (slides no weights were fit on) calibrates it. The features
come through the taps ``predict`` checks them with (``model.ood_features``), and the reference goes into the card.

- tile model (``train``): the embeddings of every tissue tile of the training slides (tile folders: every training
  tile; attention-MIL: the cached bag embeddings), calibrated on the validation slides' tiles;
- vessel segmenter (``train-vessels``): its bottleneck per window of the training slides, windows cut as
  ``model.segmenter.segment_slide`` cuts them, calibrated on the validation slides' windows;
- vessel and calcium-artifact classifiers (``train-vessel-classifier``): the pooled features of the training crops,
  calibrated on the validation slides' detections.

At most ``MAX_UNITS`` units of each split are used (a seeded draw), so a large run stays quick.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from calciscope.model.card import CardBase, ModelCard
from calciscope.model.checkpoint import load_checkpoint, update_card
from calciscope.model.ood import OODReference, fit_reference
from calciscope.model.ood_features import FEATURES, UNITS, FeatureTap, pooled_features
from calciscope.model.precision import Precision, prepare_inputs
from calciscope.model.segmenter import MARGIN_PX, WINDOW_PX, SegmenterCard, normalise
from calciscope.model.vessel_classifier import ClassifierCard, to_input

MAX_UNITS = 20000
GLASS_LEVEL = 215  # a window touches tissue when some pixel of its centre is darker than this (grey level)


def reference_for(card: CardBase, train: np.ndarray, val: np.ndarray, val_groups: np.ndarray | None,
                  description: str) -> OODReference | None:
    """The reference, or None when a split has too few units to fit or calibrate one (the card then has none)."""
    if len(train) < 2 or len(val) < 1:
        return None
    return fit_reference(train, val, val_groups, unit=UNITS[card.KIND], features=FEATURES[card.KIND],
                         fit_info={"data": description})


def as_card_field(ref: OODReference | None) -> dict:
    return ref.to_dict() if ref is not None else {}


# -- tile model -------------------------------------------------------------------------------------------------
def tile_reference(model: torch.nn.Module, card: CardBase, data, fold, config, precision: Precision,
                   collate=None) -> OODReference | None:
    """The tile model's reference from a training run's data bundle and fold (``training.data.DataBundle``)."""
    if config.data.source == "slide_labels":  # bags of cached embeddings: what the model's encoder gave each tile
        train = _bags(data.make_dataset(fold.train, False))
        val_bags = data.make_dataset(fold.val, False)
        val_parts = [np.asarray(val_bags[i][0], np.float32) for i in range(len(val_bags))]
        groups = np.concatenate([[i] * len(b) for i, b in enumerate(val_parts)])
        return reference_for(card, train, np.concatenate(val_parts), groups, "training run: bag embeddings")
    train_x, _ = tile_embeddings(model, card, _subset(data.make_dataset(fold.train, False), config.seed), config,
                                 precision, collate)
    val_set = _subset(data.make_dataset(fold.val, False), config.seed)
    val_x, positions = tile_embeddings(model, card, val_set, config, precision, collate)
    groups = None
    if data.slide_of is not None:
        base, positions = (val_set.dataset, np.asarray(val_set.indices)[positions]) if isinstance(val_set, Subset) \
            else (val_set, positions)
        groups = data.slide_of(base, positions)
    return reference_for(card, train_x, val_x, groups, f"training run: {config.data.source} (every tissue tile of "
                                                       f"the training and validation splits, at most {MAX_UNITS})")


def add_tile_reference(model_dir: Path, data, fold, config, precision: Precision) -> OODReference | None:
    """Fit the reference of the tile model in ``model_dir`` on its run's fold and write it into its card."""
    model, card = load_checkpoint(model_dir, map_location=precision.device)
    ref = tile_reference(model, card, data, fold, config, precision, data.collate)
    update_card(ModelCard, model_dir, ood_reference=as_card_field(ref))
    return ref


def tile_embeddings(model: torch.nn.Module, card: ModelCard, dataset, config, precision: Precision,
                    collate=None) -> tuple[np.ndarray, np.ndarray]:
    """((N, D) embeddings, (N,) dataset positions) of a tile dataset, as ``predict``'s tap sees them."""
    mean = torch.tensor(card.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(card.std, dtype=torch.float32).view(1, 3, 1, 1)
    loader = DataLoader(dataset, batch_size=config.optim.batch_size, shuffle=False, collate_fn=collate,
                        num_workers=config.optim.workers, prefetch_factor=4 if config.optim.workers else None)
    model.eval()
    tap = FeatureTap(model.backbone, card)
    positions = []
    try:
        with torch.inference_mode():
            for inputs, _, idx in loader:
                if isinstance(inputs, (tuple, list)):  # training.features.collate_embeddings: ((B, D),)
                    inputs = inputs[0]
                if inputs.ndim == 2:  # the dataset holds cached embeddings (a frozen encoder): they are the features
                    tap._rows.append(inputs.float().numpy())
                else:
                    with precision.autocast():
                        model.backbone(prepare_inputs(inputs, mean, std, precision))
                positions.append(np.asarray(idx))
        return tap.take(), np.concatenate(positions) if positions else np.zeros(0, int)
    finally:
        tap.close()


def _subset(dataset, seed: int):
    if len(dataset) <= MAX_UNITS:
        return dataset
    keep = np.sort(np.random.default_rng(seed).choice(len(dataset), MAX_UNITS, replace=False))
    return Subset(dataset, keep.tolist())


def _bags(dataset) -> np.ndarray:
    rows = np.concatenate([np.asarray(dataset[i][0], np.float32) for i in range(len(dataset))])
    if len(rows) > MAX_UNITS:
        rows = rows[np.sort(np.random.default_rng(0).choice(len(rows), MAX_UNITS, replace=False))]
    return rows


# -- vessel segmenter -------------------------------------------------------------------------------------------
def segmenter_reference(model: torch.nn.Module, card: SegmenterCard, slides: list, train_ids: list[int],
                        val_ids: list[int], batch_size: int = 4) -> OODReference | None:
    """The segmenter's reference from its training slides (``training.segmenter_data.SlideData``, whole at its mpp)."""
    def windows_of(ids):
        rows, groups = [], []
        for i in ids:
            x = segmenter_windows(model, card, slides[i].rgb, batch_size)
            rows.append(x)
            groups += [slides[i].slide_id] * len(x)
        return np.concatenate(rows), np.array(groups)

    if not val_ids:
        return None
    train, _ = windows_of(train_ids)
    val, groups = windows_of(val_ids)
    return reference_for(card, train, val, groups, "training run: every window touching tissue of the training and "
                                                   "validation slides")


def segmenter_windows(model: torch.nn.Module, card: SegmenterCard, rgb: np.ndarray, batch_size: int = 4) -> np.ndarray:
    """(W, D) bottleneck features of the windows of a slide image at the segmenter's mpp that hold tissue, cut as
    ``segment_slide`` cuts them (WINDOW_PX, centres every WINDOW_PX - 2 MARGIN_PX, glass beyond the image)."""
    step = WINDOW_PX - 2 * MARGIN_PX
    h, w = rgb.shape[:2]
    padded = np.pad(rgb, ((MARGIN_PX, step + MARGIN_PX), (MARGIN_PX, step + MARGIN_PX), (0, 0)), constant_values=242)
    grey = rgb.mean(axis=2)
    origins = [(x, y) for y in range(0, h, step) for x in range(0, w, step)
               if (grey[y : y + step, x : x + step] < GLASS_LEVEL).any()]
    device = next(model.parameters()).device
    model.eval()

    def run():
        for i in range(0, len(origins), batch_size):
            batch = np.stack([padded[y : y + WINDOW_PX, x : x + WINDOW_PX] for x, y in origins[i : i + batch_size]])
            model(normalise(batch, card).to(device))

    return pooled_features(model, card, run) if origins else np.zeros((0, card.widths[-1]), np.float32)


# -- vessel classifiers -----------------------------------------------------------------------------------------
def classifier_reference(model: torch.nn.Module, card: ClassifierCard, train_crops: np.ndarray,
                         train_extras: np.ndarray, val: list, val_ids: list[str]) -> OODReference | None:
    """The classifier's reference from its training crops, calibrated on the validation slides' crops
    (``training.classifier_data.VesselCrops`` per slide)."""
    keep = np.arange(len(train_crops))
    if len(keep) > MAX_UNITS:
        keep = np.sort(np.random.default_rng(0).choice(len(keep), MAX_UNITS, replace=False))
    train = crop_features(model, card, train_crops[keep], train_extras[keep])
    parts = [crop_features(model, card, d.crops, d.extras) for d in val]
    if not parts:
        return None
    groups = np.concatenate([[sid] * len(p) for sid, p in zip(val_ids, parts)])
    return reference_for(card, train, np.concatenate(parts), groups, "training run: the training crops, and the "
                                                                     "validation slides' crops")


def crop_features(model: torch.nn.Module, card: ClassifierCard, crops: np.ndarray, extras: np.ndarray,
                  batch_size: int = 128) -> np.ndarray:
    """(N, D) pooled features of (N, H, W, 3) uint8 crops, as ``predict``'s tap sees them."""
    device = next(model.parameters()).device
    model.eval()

    def run():
        for i in range(0, len(crops), batch_size):
            model(to_input(crops[i : i + batch_size], card).to(device),
                  torch.from_numpy(np.asarray(extras[i : i + batch_size], np.float32)).to(device))

    return pooled_features(model, card, run) if len(crops) else np.zeros((0, card.widths[-1]), np.float32)
