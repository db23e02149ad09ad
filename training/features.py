"""``calciscope features``: cache tile embeddings of slides with a frozen encoder, for attention-MIL and tile heads.

    extract_features(["scans/"], "uni", "/models/UNI/pytorch_model.bin", "features/uni")

Per slide, the tissue tiles (``mpp`` / ``tile_px``; default the encoder's recommended 0.5 µm/px and its tile size)
go through the encoder once; ``DIR/<key>.safetensors`` holds the embeddings (N, D) and their level-0 ``x, y``
(``level0_xy``), the key covering the slide's bytes, the encoder's weights and preprocessing, and the tiling, so a
stopped run resumes slide by slide and nothing is encoded twice. ``DIR/features.json`` names the encoder and tiling
(a folder written by another encoder is refused), ``DIR/index.csv`` maps slide ids to files. Training reads the same
folder: ``data.source: slide_labels``, ``data.encoder``, ``data.encoder_weights``, ``data.cache_dir: DIR``.

A tile head (linear, or an MLP with ``model.hidden_dim``) on a frozen encoder: sources "tiles" and "slides" with
``data.encoder`` set and ``model.head: tile`` embed every example once (:func:`embed_examples`, cached in
``data.cache_dir``) and train the head on the embeddings; the saved model embeds tiles with the encoder at predict.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save
from torch.utils.data import DataLoader, Dataset

from calciscope.data.slides import find_slides, is_slide_path, slide_id_from_path, slides_among
from calciscope.data.tiling import TilingConfig
from calciscope.errors import CalciscopeError
from calciscope.io import write_bytes_atomic
from calciscope.model.encoders import ENCODERS
from calciscope.model.precision import device_of, resolve_device
from calciscope.training.mil import build_bag_cache, load_encoder
from calciscope.training.sources import read_manifest


def list_slides(inputs: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """(slide paths, slide ids) from files, folders (their slides), globs, or a manifest CSV (``path`` column)."""
    paths: list[Path] = []
    ids: list[str] | None = []
    for item in map(str, inputs):
        path = Path(item)
        if path.suffix.lower() == ".csv" and path.is_file():
            records = read_manifest(path, [])
            paths += [r.path for r in records]
            ids += [r.slide_id for r in records]
            continue
        if path.is_dir() and not is_slide_path(path):
            found = find_slides(path)
        elif any(c in item for c in "*?["):
            found = slides_among(sorted(glob.glob(item, recursive=True)))
        elif path.exists():
            found = [path]
        else:
            raise CalciscopeError(f"{path}: no such slide, folder, glob match or manifest")
        paths += found
        ids += [slide_id_from_path(p) for p in found]
    if not paths:
        raise CalciscopeError(f"no slides in {', '.join(map(str, inputs))}")
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise CalciscopeError(f"slide id(s) {twice[:3]} appear twice; list each slide once (or use a manifest with "
                              "a slide_id column)")
    return paths, ids


def extract_features(inputs: Sequence[str | Path], encoder: str, weights: str | Path | None, out: str | Path, *,
                     mpp: float | None = None, tile_px: int | None = None, min_tissue: float = 0.5,
                     batch_size: int = 64, workers: int = 2, device: str = "auto",
                     progress: Callable[[str], None] | None = None) -> list[Path]:
    """Cache the embeddings of every slide in ``inputs`` under ``out``; returns the cache files in slide order.

    Everything is checked before anything is written: the slides exist, the encoder name is known, its weights file
    matches it (names and shapes), and ``out`` was not written by another encoder or tiling."""
    paths, ids = list_slides(inputs)
    spec = ENCODERS.get(encoder)
    tiling = TilingConfig(mpp=mpp or (spec.mpp if spec else 0.5), tile_px=tile_px or (spec.tile_px if spec else 224),
                          min_tissue=min_tissue)
    target = resolve_device(device)
    model, info = load_encoder(encoder, weights=weights, device=target)
    start = time.perf_counter()

    def report(n: int, total: int) -> None:
        if progress is not None:
            progress(f"features: {n}/{total} slides ({ids[n - 1]}), {time.perf_counter() - start:.0f} s")

    return build_bag_cache(paths, (model, info), tiling, out, batch_size=batch_size, workers=workers,
                           progress=report, device=target, slide_ids=ids)


# -- a tile head on a frozen encoder's embeddings ------------------------------------------------------------------
class EmbeddingDataset(Dataset):
    """The examples of a tile dataset as cached embeddings: ``((embedding,), labels, i)``; ``indices`` (and
    ``examples``, for slide sources) are the tile dataset's, so slide metrics and mining work as on images."""

    def __init__(self, embeddings: torch.Tensor, labels: torch.Tensor, source):
        self.embeddings, self.labels = embeddings, labels
        self.indices = source.indices
        self.examples = getattr(source, "examples", None)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return len(self.embeddings)

    def __getitem__(self, i: int):
        return self.embeddings[i], self.labels[i], i


def collate_embeddings(batch):
    emb, labels, idx = zip(*batch)
    return (torch.stack(emb),), torch.stack([torch.as_tensor(y) for y in labels]), torch.as_tensor(idx)


def embed_examples(bundle, config, progress=None):
    """The bundle with every example embedded once by the frozen encoder ``data.encoder`` (cached in
    ``data.cache_dir`` as ``tiles-<key>.safetensors``): datasets of embeddings, for a linear or MLP tile head."""
    encoder, info = load_encoder(config.data.encoder, weights=config.data.encoder_weights,
                                 device=resolve_device("auto"))
    everything = bundle.make_dataset(np.arange(len(bundle.groups)), False)
    key = hashlib.sha256(json.dumps({"units": bundle.unit_ids, "weights": info["weights_sha256"],
                                     "mpp": config.data.mpp, "tile_px": config.data.tile_px,
                                     "stain": str(config.data.stain_normalize), "n": len(everything)},
                                    sort_keys=True).encode()).hexdigest()[:24]
    path = Path(config.data.cache_dir or str(config.out) + "/embeddings") / f"tiles-{key}.safetensors"
    if path.is_file():
        embeddings = load_file(str(path))["embeddings"]
    else:
        embeddings = _embed_all(everything, encoder, info, config, progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, save({"embeddings": embeddings.contiguous()}))
    row = {int(i): k for k, i in enumerate(everything.indices)}

    def make(units: np.ndarray, train: bool) -> Dataset:
        source = bundle.make_dataset(units, train)
        rows = torch.as_tensor([row[int(i)] for i in source.indices], dtype=torch.long)
        labels = torch.as_tensor(np.asarray(_labels_of(source)), dtype=torch.float32)
        return EmbeddingDataset(embeddings[rows], labels, source)

    return dataclasses.replace(bundle, make_dataset=make, collate=collate_embeddings,
                               describe={**bundle.describe, "encoder": info["name"], "embeddings": str(path)})


def _labels_of(dataset) -> np.ndarray:
    if getattr(dataset, "examples", None) is not None:
        return dataset.examples.labels[dataset.indices]
    return dataset.table.labels[dataset.indices]


@torch.inference_mode()
def _embed_all(dataset, encoder, info, config, progress) -> torch.Tensor:
    device = device_of(encoder)
    mean = torch.tensor(info["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(info["std"], device=device).view(1, 3, 1, 1)
    loader = DataLoader(dataset, batch_size=config.optim.batch_size, shuffle=False, num_workers=config.optim.workers)
    out, done = [], 0
    for images, _, _ in loader:
        x = (images.to(device).float() / 255.0 - mean) / std
        out.append(encoder(x).float().cpu())
        done += len(images)
        if progress is not None:
            progress(done, len(dataset))
    return torch.cat(out)
