"""Training throughput with the real data pipeline vs the same model on tensors already in memory, side by side.

Real pipeline: tiles read from phantom slides, albumentations + HED augmentation, DataLoader workers.
In memory: the same tiles decoded once into a uint8 tensor, no augmentation, no workers.
Ratio = real ÷ in-memory samples/s (target ≥ 0.85), and the peak RSS of this process.

    python benchmarks/bench_train.py [--backbone tiny --mpp 1.0 --tile-px 112] [--workers 2] [--steps 40]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from calciscope.data.synthetic import FINDINGS, generate_dataset
from calciscope.model import IMAGENET_MEAN, IMAGENET_STD, create_model
from calciscope.model.precision import choose_precision
from calciscope.training.augment import build_train_transform
from calciscope.training.config import AugmentConfig, DataConfig, OptimConfig, TrainConfig
from calciscope.training.engine import train_one_epoch, warmup_cosine
from calciscope.training.sources import TileTrainingDataset, build_tile_examples, read_manifest


def peak_rss_mb() -> float:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024


def run(model, loader, precision, steps: int) -> float:
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, 0))
    criterion = torch.nn.BCEWithLogitsLoss()
    train_one_epoch(model, loader, criterion, optimizer, scheduler, precision, mean, std, max_steps=3)  # warm-up
    stats = train_one_epoch(model, loader, criterion, optimizer, scheduler, precision, mean, std, max_steps=steps)
    return stats.samples_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--mpp", type=float, default=1.0)
    parser.add_argument("--tile-px", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--slides", type=int, default=8)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    manifest = generate_dataset(work, args.slides, size_px=4096, seed=7)
    config = TrainConfig(data=DataConfig(manifest=str(manifest), mpp=args.mpp, tile_px=args.tile_px,
                                            labels=list(FINDINGS)),
                         optim=OptimConfig(batch_size=args.batch_size, workers=args.workers), augment=AugmentConfig())
    examples = build_tile_examples(read_manifest(manifest, config.data.labels), config)
    everything = np.arange(len(examples.labels))
    precision = choose_precision("auto", channels_last=True)
    labels = config.data.labels

    real = TileTrainingDataset(examples, everything, transform=build_train_transform(config.augment), seed=0)
    real_loader = DataLoader(real, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                             prefetch_factor=4 if args.workers else None, persistent_workers=args.workers > 0)
    plain = TileTrainingDataset(examples, everything)
    images = torch.stack([plain[i][0] for i in range(len(plain))])
    memory = TensorDataset(images, torch.from_numpy(examples.labels), torch.arange(len(images)))
    memory_loader = DataLoader(memory, batch_size=args.batch_size, shuffle=True)

    torch.manual_seed(0)
    model_a = create_model(args.backbone, labels).to(memory_format=torch.channels_last)
    torch.manual_seed(0)
    model_b = create_model(args.backbone, labels).to(memory_format=torch.channels_last)
    in_memory = run(model_a, memory_loader, precision, args.steps)
    pipeline = run(model_b, real_loader, precision, args.steps)

    print(f"{args.backbone} at {args.tile_px} px, {args.mpp} µm/px, batch {args.batch_size}, {precision.describe()}, "
          f"{len(images)} tiles from {args.slides} phantoms, {args.workers} workers, {args.steps} steps")
    print(f"in-memory tensors      : {in_memory:8.1f} samples/s")
    print(f"real data pipeline     : {pipeline:8.1f} samples/s  ratio {pipeline / in_memory:.2f} (target ≥ 0.85)")
    print(f"peak RSS (this process): {peak_rss_mb():8.1f} MB")


if __name__ == "__main__":
    main()
