"""What the tile / attention-MIL trainer feeds its model: loaders in a seeded order, class balance, hard-negative
mining, and the distributed setup (torchrun's environment)."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, WeightedRandomSampler
from torch.utils.data.distributed import DistributedSampler

from calciscope.errors import CalciscopeError
from calciscope.model import IMAGENET_MEAN, IMAGENET_STD
from calciscope.model.precision import Precision
from calciscope.training.config import OptimConfig, TrainConfig
from calciscope.training.data import DataBundle
from calciscope.training.engine import predict_logits


def setup_distributed() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; a single process is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return (dist.get_rank() if world > 1 else 0), world


def imagenet_norm() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def dataset_labels(dataset) -> np.ndarray:
    return dataset.examples.labels[dataset.indices]


def pos_weight(labels: np.ndarray) -> torch.Tensor:
    """neg/pos per label, clipped to [1, 100]: rare findings weigh as much as common ones in the loss."""
    pos = labels.sum(axis=0)
    neg = len(labels) - pos
    return torch.tensor(np.clip(neg / np.maximum(pos, 1), 1.0, 100.0), dtype=torch.float32)


def steps_per_epoch(n: int, optim: OptimConfig, world: int) -> int:
    """Optimiser steps in an epoch of ``n`` examples (batches capped by ``max_steps_per_epoch``, accumulated)."""
    batches = -(-n // (optim.batch_size * world))
    if optim.max_steps_per_epoch is not None:
        batches = min(batches, optim.max_steps_per_epoch * optim.accumulate)
    return max(1, -(-batches // optim.accumulate))


def train_loader(dataset, weights, config: TrainConfig, epoch: int, rank: int, world: int, collate,
                 num_samples: int | None = None) -> DataLoader:
    """Shuffled, or drawn by ``weights`` (class balance, mined hard negatives), in an order fixed by (seed, epoch):
    a resumed run sees the same batches. ``num_samples`` fixes the length of a weighted epoch."""
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    if world > 1:
        if weights is not None:
            raise CalciscopeError("optim.class_balance 'sampler' is not supported with DDP; use 'pos_weight'")
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=config.seed)
        sampler.set_epoch(epoch)
    elif weights is not None:
        sampler = WeightedRandomSampler(np.asarray(weights, np.float64).tolist(), num_samples or len(weights),
                                        replacement=True, generator=generator)
    else:
        sampler = RandomSampler(dataset, generator=generator)
    workers = config.optim.workers
    return DataLoader(dataset, batch_size=config.optim.batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate, drop_last=False, persistent_workers=False,
                      prefetch_factor=4 if workers > 0 else None)


def eval_loader(dataset, config: TrainConfig, collate) -> DataLoader:
    workers = config.optim.workers
    return DataLoader(dataset, batch_size=config.optim.batch_size, shuffle=False, num_workers=workers,
                      collate_fn=collate, prefetch_factor=4 if workers > 0 else None)


def sampling_weights(train_set, base_indices, mined, config: TrainConfig, unit_labels: np.ndarray):
    """Point the training set at its base pool plus the mined tiles; the sampling weights (None = uniform).
    ``unit_labels``: the training examples' labels for sources other than slides."""
    if base_indices is not None:
        train_set.indices = np.union1d(base_indices, np.asarray(mined, np.int64))
    weights = None
    if config.optim.class_balance == "sampler":
        labels = dataset_labels(train_set) if config.data.source == "slides" else unit_labels
        rarity = 1.0 / np.maximum(labels.mean(axis=0), 1e-3)
        weights = np.where(labels.sum(axis=1) > 0, (labels * rarity).max(axis=1), 1.0)
    if len(mined):
        hard = np.isin(train_set.indices, np.asarray(mined, np.int64))
        weights = (np.ones(len(train_set)) if weights is None else weights) * np.where(hard, config.mining.weight, 1.0)
    return weights


def mine_hard_negatives(model: nn.Module, data: DataBundle, units: np.ndarray, config: TrainConfig,
                        precision: Precision, mean, std) -> np.ndarray:
    """Tile ids (into ``data.examples``) of the hard negatives of the slides ``units``: per finding, the
    ``mining.top_fraction`` of its negative tiles that the model scores highest (ties: lower tile id first)."""
    dataset = data.make_dataset(units, False)  # every tissue tile, no augmentation
    logits, y, positions = predict_logits(model, eval_loader(dataset, config, data.collate), precision, mean, std)
    tiles = np.asarray(dataset.indices)[positions]
    hard = []
    for j in range(y.shape[1]):
        negatives = np.flatnonzero(y[:, j] == 0)
        n = int(np.ceil(config.mining.top_fraction * len(negatives)))
        order = np.lexsort((tiles[negatives], -logits[negatives, j]))
        hard.append(tiles[negatives[order[:n]]])
    return np.unique(np.concatenate(hard)) if hard else np.zeros(0, np.int64)
