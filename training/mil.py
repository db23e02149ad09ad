"""Slide-level labels → attention-MIL on cached tile embeddings (data source "slide_labels").

Each slide's tissue tiles are encoded once with a frozen tile encoder; the embeddings and their level-0
coordinates are cached per slide as one safetensors file named by a key that covers the slide's bytes, the
encoder's weights and preprocessing, and the tiling. Training the attention head then reads only the cache.

    paths = build_bag_cache(slides, "runs/tiles/model", TilingConfig(), "runs/mil/embeddings")
    loader = DataLoader(BagDataset(paths, labels, max_tiles=2048), batch_size=8, collate_fn=collate_bags)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn
from torch.utils.data import DataLoader, Dataset

from calciscope.data.datasets import SlideTileDataset
from calciscope.data.slides import open_slide
from calciscope.data.tiling import TilingConfig, make_grid
from calciscope.data.tissue import TissueConfig, detect_tissue
from calciscope.errors import CalciscopeError
from calciscope.io import sha256_file, write_bytes_atomic
from calciscope.model import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MILSlideModel,
    create_model,
    get_backbone_spec,
    load_card,
    load_checkpoint,
)
from calciscope.model.encoders import ENCODERS, build_encoder, resolve_weights
from calciscope.model.precision import device_of

CACHE_FORMAT = 1  # bump when what a cache file holds, or how it is computed, changes
_RANDOM_INIT_SEED = 0


class _Embed(nn.Module):
    """``model.embed`` as a module: normalised tiles (N, 3, H, W) → embeddings (N, D)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.embed(x)


def load_encoder(spec: str, *, labels_hint: Sequence[str] = (), weights: str | Path | None = None,
                 device: str | torch.device | None = None) -> tuple[nn.Module, dict]:
    """The tile encoder named by ``spec`` (in eval mode, on ``device``) and what it expects.

    spec: a foundation encoder's name (``model.encoders``; ``weights`` is then the publisher's local file or folder),
    a calciscope checkpoint directory (its tile model's ``embed``; mean/std/tile_px/mpp from its card), or a
    backbone name, built with a fixed-seed random init: only sensible for tests, the embeddings mean nothing.
    Returns (module mapping normalised float (N, 3, H, W) → (N, D), info) with info keys name, backbone,
    embed_dim, mean, std, tile_px, mpp (None for a bare backbone), weights_sha256 (``"random:<name>"``) and, for a
    foundation encoder, encoder_weights (the file) and preprocessing.
    """
    if spec in ENCODERS:
        encoder, info = _foundation_encoder(spec, weights)
        return encoder.to(device or "cpu").eval(), info
    path = Path(spec)
    if path.exists():
        model, card = load_checkpoint(path)
        info = _card_info(card, model.feature_dim, card.weights_sha256 or _state_sha256(model))
    else:
        try:
            with torch.random.fork_rng(devices=[]):  # same weights every call, so the cache key stays honest
                torch.manual_seed(_RANDOM_INIT_SEED)
                model = create_model(spec, list(labels_hint) or ["x"])
        except CalciscopeError as exc:
            raise CalciscopeError(f"data.encoder {spec!r}: no checkpoint directory there, and not a backbone "
                                  f"name ({exc})") from None
        info = {"name": spec, "backbone": spec, "embed_dim": int(model.feature_dim), "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD), "tile_px": None, "mpp": None, "weights_sha256": f"random:{spec}"}
    return _Embed(model).eval(), info


def _foundation_encoder(name: str, weights: str | Path | None) -> tuple[nn.Module, dict]:
    if weights is None:
        raise CalciscopeError(f"encoder {name!r} needs its weights: the publisher's local file or folder "
                              f"(data.encoder_weights, or --weights); nothing is downloaded")
    encoder = build_encoder(name, weights)
    return encoder, foundation_info(name, encoder.weights)


def foundation_info(name: str, weights_file: Path) -> dict:
    """What a foundation encoder's embeddings depend on (the cache key and ``features.json`` hold it)."""
    spec = ENCODERS[name]
    return {"name": name, "backbone": name, "embed_dim": spec.embed_dim, "mean": list(spec.mean),
            "std": list(spec.std), "tile_px": None, "mpp": None, "weights_sha256": sha256_file(weights_file),
            "encoder_weights": str(Path(weights_file).resolve()), "preprocessing": spec.preprocessing()}


def _card_info(card, embed_dim: int, weights_sha256: str | None = None) -> dict:
    return {"name": card.name, "backbone": card.backbone, "embed_dim": int(embed_dim), "mean": list(card.mean),
            "std": list(card.std), "tile_px": card.tile_px, "mpp": card.mpp,
            "weights_sha256": weights_sha256 or card.weights_sha256}


def _state_sha256(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    try:
        return sha256_file(path)
    except OSError as exc:
        raise CalciscopeError(f"{path}: cannot read slide ({exc.strerror or exc})") from None


class EmbeddingCache:
    """One safetensors file per (slide content, encoder, tiling): ``<root>/<key>.safetensors``.

    Files hold ``embeddings`` (N, D) float32 and ``level0_xy`` (N, 2) int64; their metadata says what made them.
    Writes go to a temporary name and are renamed into place, so a reader never sees half a file.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def key(self, slide_path, encoder_info: dict, tiling: TilingConfig) -> str:
        """sha256 over the slide file's bytes, the encoder (weights hash, preprocessing) and the tiling config."""
        encoder = {k: encoder_info.get(k) for k in ("weights_sha256", "backbone", "embed_dim", "mean", "std")}
        recipe = {"format": CACHE_FORMAT, "slide_sha256": _file_sha256(Path(slide_path)), "encoder": encoder,
                  "tiling": dataclasses.asdict(tiling), "tissue": dataclasses.asdict(TissueConfig())}
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        """Whether a well-formed entry exists (reads the file header only, not the embeddings)."""
        path = self.path(key)
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), framework="pt") as f:
                emb, xy = f.get_slice("embeddings").get_shape(), f.get_slice("level0_xy").get_shape()
        except Exception:  # unreadable or incomplete: recompute it
            return False
        return len(emb) == 2 and list(xy) == [emb[0], 2]

    def get(self, key: str) -> tuple[torch.Tensor, np.ndarray] | None:
        """(embeddings (N, D) float32, level-0 xy (N, 2) int64), or None when not cached (or unreadable)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            embeddings, xy, _ = read_bag(path)
        except CalciscopeError as exc:
            warnings.warn(f"ignoring unreadable cache entry ({exc}); it will be recomputed", stacklevel=2)
            return None
        return embeddings, xy

    def put(self, key: str, embeddings: torch.Tensor, xy: np.ndarray, metadata: dict[str, str] | None = None) -> Path:
        embeddings = torch.as_tensor(embeddings).detach().to("cpu", torch.float32).contiguous()
        xy_t = torch.as_tensor(np.asarray(xy, dtype=np.int64).reshape(-1, 2)).contiguous()
        if embeddings.dim() != 2 or len(embeddings) != len(xy_t):
            raise ValueError(f"embeddings {tuple(embeddings.shape)} and xy {tuple(xy_t.shape)} do not match")
        self.root.mkdir(parents=True, exist_ok=True)
        blob = save({"embeddings": embeddings, "level0_xy": xy_t},
                    metadata={"calciscope_cache_format": str(CACHE_FORMAT), **(metadata or {})})
        return write_bytes_atomic(self.path(key), blob)


def read_bag(path: str | Path) -> tuple[torch.Tensor, np.ndarray, dict[str, str]]:
    """A cache file's (embeddings (N, D) float32, level-0 xy (N, 2) int64, metadata)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            embeddings, xy = f.get_tensor("embeddings"), f.get_tensor("level0_xy")
    except Exception as exc:  # safetensors raises its own types for short files, bad headers, missing keys
        raise CalciscopeError(f"{path}: not a readable embedding cache file ({type(exc).__name__}: {exc})") from None
    if embeddings.dim() != 2 or xy.shape != (len(embeddings), 2):
        raise CalciscopeError(f"{path}: embeddings {tuple(embeddings.shape)} and xy {tuple(xy.shape)} do not match")
    return embeddings.float(), xy.numpy().astype(np.int64), metadata


def encode_slide(slide_path, encoder: nn.Module, encoder_info: dict, tiling: TilingConfig, *, batch_size: int = 64,
                 workers: int = 0, slide_mpp: float | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Embed every tissue tile of one slide: (embeddings (N, D) float32 on the CPU, level-0 xy (N, 2) int64).

    Tissue mask → grid → tiles (uint8) → float / 255, normalised with the encoder's mean/std → encoder.
    A slide without tissue tiles gives N = 0.
    """
    with open_slide(slide_path, mpp=slide_mpp) as slide:
        grid = make_grid(slide, detect_tissue(slide), tiling)
    dim = int(encoder_info["embed_dim"])
    if len(grid) == 0:
        return torch.zeros(0, dim), np.zeros((0, 2), np.int64)
    device = device_of(encoder)
    mean = torch.tensor(encoder_info["mean"], dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(encoder_info["std"], dtype=torch.float32, device=device).view(1, 3, 1, 1)
    loader = DataLoader(SlideTileDataset(slide_path, grid, slide_mpp=slide_mpp), batch_size=batch_size,
                        shuffle=False, num_workers=workers)
    encoder.eval()
    out = []
    with torch.inference_mode():
        for images, _ in loader:
            x = (images.to(device, non_blocking=True).float().div_(255.0) - mean) / std
            out.append(encoder(x).float().cpu())
    embeddings = torch.cat(out)
    if embeddings.shape != (len(grid), dim):
        raise CalciscopeError(f"encoder {encoder_info.get('name')!r} returned {tuple(embeddings.shape)}, "
                              f"expected ({len(grid)}, {dim})")
    return embeddings, grid.xy.astype(np.int64)


def build_bag_cache(slide_paths: Sequence[str | Path], encoder_spec: str | tuple[nn.Module, dict],
                    tiling: TilingConfig, cache_dir: str | Path, *, batch_size: int = 64, workers: int = 0,
                    progress: Callable[[int, int], None] | None = None, weights: str | Path | None = None,
                    device: str | torch.device | None = None, slide_ids: Sequence[str] | None = None) -> list[Path]:
    """Cache every slide's embeddings (slides already cached under the same key are skipped: a stopped run resumes
    per slide); paths in input order.

    encoder_spec: what :func:`load_encoder` takes (with ``weights`` for a foundation encoder), or an already loaded
    ``(encoder, info)`` pair. The encoder is loaded only when some slide needs encoding. The cache folder's
    ``features.json`` names the encoder and tiling that wrote it: a folder written by another is refused, before
    anything is written. ``index.csv`` lists each slide's file. ``progress(done, total)`` follows each slide.
    """
    cache = EmbeddingCache(cache_dir)
    if isinstance(encoder_spec, tuple):
        encoder, info = encoder_spec
    else:
        encoder, info = _encoder_info_only(encoder_spec, weights)
    _check_preprocessing(info, tiling)
    claim_cache(cache.root, info, tiling)
    paths, index = [], []
    for n, slide_path in enumerate(slide_paths, start=1):
        key = cache.key(slide_path, info, tiling)
        path = cache.path(key)
        if not cache.has(key):
            if encoder is None:
                encoder, info = load_encoder(encoder_spec, weights=weights, device=device)
            embeddings, xy = encode_slide(slide_path, encoder, info, tiling, batch_size=batch_size, workers=workers)
            path = cache.put(key, embeddings, xy, metadata={
                "slide": Path(slide_path).name, "encoder": str(info["name"]),
                "encoder_weights_sha256": str(info["weights_sha256"]),
                "tiling": json.dumps(dataclasses.asdict(tiling), sort_keys=True)})
        paths.append(path)
        index.append({"slide_id": slide_ids[n - 1] if slide_ids else Path(slide_path).name,
                      "path": str(slide_path), "file": path.name})
        write_index(cache.root / "index.csv", index)
        if progress is not None:
            progress(n, len(slide_paths))
    return paths


def claim_cache(root: Path, info: dict, tiling: TilingConfig) -> None:
    """Write ``root/features.json`` (the encoder and tiling), or refuse a folder another encoder or tiling wrote."""
    identity = {"format": CACHE_FORMAT, "encoder": info["name"], "weights_sha256": info["weights_sha256"],
                "embed_dim": int(info["embed_dim"]), "mean": list(info["mean"]), "std": list(info["std"]),
                "tiling": dataclasses.asdict(tiling), "preprocessing": info.get("preprocessing")}
    path = root / "features.json"
    if path.is_file():
        try:
            held = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CalciscopeError(f"{path}: unreadable ({exc}); remove it or use another cache folder") from None
        for key in ("encoder", "weights_sha256", "embed_dim", "tiling"):
            if held.get(key) != identity[key]:
                raise CalciscopeError(
                    f"{path}: this cache was written by encoder {held.get('encoder')!r} (weights sha256 "
                    f"{str(held.get('weights_sha256'))[:12]}, tiling {held.get('tiling')}); its {key} differs from "
                    f"{identity['encoder']!r}'s here: use another cache folder (--out, or data.cache_dir)")
        return
    root.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, (json.dumps(identity, indent=2) + "\n").encode())


def write_index(path: Path, rows: list[dict]) -> None:
    text = "slide_id,path,file\n" + "".join(f"{r['slide_id']},{r['path']},{r['file']}\n" for r in rows)
    write_bytes_atomic(path, text.encode())


def _encoder_info_only(spec: str, weights: str | Path | None = None) -> tuple[nn.Module | None, dict]:
    """(None, info) from a checkpoint's card, or a foundation encoder's weights file hash, alone, so a fully cached
    run loads no weights; else load_encoder."""
    if spec in ENCODERS:
        if weights is None:
            return _foundation_encoder(spec, weights)  # the one-line error
        return None, foundation_info(spec, resolve_weights(ENCODERS[spec], weights))
    path = Path(spec)
    if path.exists():
        card = load_card(path)
        if card.weights_sha256:
            return None, _card_info(card, card.embed_dim or get_backbone_spec(card.backbone).feature_dim)
    return load_encoder(spec)


def _check_preprocessing(info: dict, tiling: TilingConfig) -> None:
    for name, want in (("mpp", tiling.mpp), ("tile_px", tiling.tile_px)):
        trained = info.get(name)
        if trained is not None and trained != want:
            warnings.warn(f"encoder {info['name']!r} was trained on tiles at {name} {trained}, "
                          f"but bags are tiled at {name} {want}", stacklevel=3)


class BagDataset(Dataset):
    """One bag of cached embeddings per slide: ``(embeddings (N_i, D) float32, labels (L,) float32, i)``.

    With ``max_tiles``, a bag larger than that is a random subset of its tiles drawn from (seed, epoch, i), so
    training is deterministic and each epoch sees another subset (:meth:`set_epoch`). Files are read per item.
    """

    def __init__(self, cache_paths: Sequence[str | Path], labels: np.ndarray, *, max_tiles: int | None = None,
                 seed: int = 0):
        labels = np.asarray(labels, dtype=np.float32)
        if labels.ndim != 2 or len(labels) != len(cache_paths):
            raise ValueError(f"labels {labels.shape} do not match {len(cache_paths)} bags (expected (S, L))")
        if max_tiles is not None and max_tiles < 1:
            raise CalciscopeError(f"max_tiles must be ≥ 1, got {max_tiles}")
        self.paths = [Path(p) for p in cache_paths]
        self.labels = torch.from_numpy(labels)
        self.max_tiles = max_tiles
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        embeddings, _, _ = read_bag(self.paths[i])
        if self.max_tiles is not None and len(embeddings) > self.max_tiles:
            rng = np.random.default_rng([self.seed, self.epoch, int(i)])
            keep = np.sort(rng.choice(len(embeddings), self.max_tiles, replace=False))
            embeddings = embeddings[torch.from_numpy(keep)]
        return embeddings, self.labels[i], i


def collate_bags(batch) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Pad bags to the longest: ((embeddings (B, N_max, D), mask (B, N_max) True = real tile), labels, indices).

    N_max is at least 1, so a batch of empty bags still has a shape (its mask is all False).
    """
    bags, labels, indices = zip(*batch)
    dim = bags[0].shape[1]
    n_max = max(1, max(len(b) for b in bags))
    x = torch.zeros(len(bags), n_max, dim, dtype=torch.float32)
    mask = torch.zeros(len(bags), n_max, dtype=torch.bool)
    for b, bag in enumerate(bags):
        x[b, : len(bag)] = bag
        mask[b, : len(bag)] = True
    return (x, mask), torch.stack(labels), torch.as_tensor(indices, dtype=torch.long)


class CachedBagMIL(MILSlideModel):
    """A ``MILSlideModel`` trained on cached embeddings: ``forward(embeddings, mask)`` runs only the attention head.

    Its backbone holds the encoder's weights (frozen), so the saved checkpoint is an ordinary MILSlideModel that
    embeds tiles at inference exactly as the cache did. Tile input (4-D / 5-D) still goes through the backbone.
    """

    def train(self, mode: bool = True) -> CachedBagMIL:
        super().train(mode)
        self.backbone.eval()  # frozen: BatchNorm keeps the encoder's statistics
        return self

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() in (2, 3):
            return self.aggregate(x, mask)
        return super().forward(x, mask)


def mil_head_for(config, data) -> CachedBagMIL:
    """The model the "slide_labels" recipe trains: the encoder's backbone (frozen) + a fresh attention head. A
    foundation encoder's weights stay the publisher's file, named in the card (``head_config.encoder_weights``)."""
    if config.data.encoder in ENCODERS:
        model = CachedBagMIL(config.data.encoder, data.labels, dropout=config.model.dropout,
                             encoder_weights=str(resolve_weights(ENCODERS[config.data.encoder],
                                                                 config.data.encoder_weights or "")))
        model.backbone.requires_grad_(False)
        return model
    encoder, info = load_encoder(config.data.encoder, labels_hint=data.labels)
    model = CachedBagMIL(info["backbone"], data.labels, dropout=config.model.dropout)
    model.backbone.load_state_dict(encoder.model.backbone.state_dict())
    model.backbone.requires_grad_(False)
    model.backbone.eval()
    return model
