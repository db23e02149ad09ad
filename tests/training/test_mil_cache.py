"""Slide labels → cached tile embeddings → bags → attention-MIL."""

from __future__ import annotations

import dataclasses
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from calciscope.data.synthetic import generate_slide
from calciscope.data.tiling import TilingConfig
from calciscope.model import GatedAttentionMIL, ModelCard, create_model, load_checkpoint, save_checkpoint
from calciscope.training.mil import (
    BagDataset,
    CachedBagMIL,
    EmbeddingCache,
    build_bag_cache,
    collate_bags,
    encode_slide,
    load_encoder,
    mil_head_for,
)

TILING = TilingConfig(mpp=1.0, tile_px=64)  # ~30 tissue tiles on a 1024² phantom


class CountingEncoder(nn.Module):
    """Wraps an encoder and counts the tiles it is asked to embed."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.tiles_seen = 0

    def forward(self, x):
        self.tiles_seen += len(x)
        return self.encoder(x)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """Eight 1024² phantoms, alternately thrombosis-positive and negative; labels (8, 1)."""
    root = tmp_path_factory.mktemp("mil_slides")
    made = [generate_slide(root, f"s{i}", {"thrombosis": i % 2, "vasculitis": 0}, size_px=1024, seed=100 + i,
                           artifacts=False) for i in range(8)]
    return [s.path for s in made], np.array([[i % 2] for i in range(8)], np.float32)


@pytest.fixture(scope="module")
def encoder():
    return load_encoder("tiny", labels_hint=["thrombosis"])


@pytest.fixture(scope="module")
def cached(slides, encoder, tmp_path_factory):
    paths, labels = slides
    return build_bag_cache(paths, encoder, TILING, tmp_path_factory.mktemp("cache")), labels


def test_random_encoder_is_the_same_every_load(encoder):
    module, info = encoder
    again, _ = load_encoder("tiny")
    assert info["weights_sha256"] == "random:tiny" and info["embed_dim"] == 64
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(module(x), again(x))


def test_cache_key_follows_slide_bytes_encoder_and_tiling(slides, encoder, tmp_path):
    paths, _ = slides
    cache, info = EmbeddingCache(tmp_path), encoder[1]
    key = cache.key(paths[0], info, TILING)
    copy = shutil.copy(paths[0], tmp_path / "renamed.tiff")
    assert cache.key(paths[0], dict(info), TilingConfig(mpp=1.0, tile_px=64)) == key
    assert cache.key(copy, info, TILING) == key  # content, not name
    with open(copy, "ab") as f:
        f.write(b"\0")
    assert cache.key(copy, info, TILING) != key
    assert cache.key(paths[1], info, TILING) != key
    assert cache.key(paths[0], {**info, "weights_sha256": "0" * 64}, TILING) != key
    assert cache.key(paths[0], {**info, "mean": [0.5, 0.5, 0.5]}, TILING) != key
    assert cache.key(paths[0], info, dataclasses.replace(TILING, tile_px=96)) != key
    assert cache.key(paths[0], info, dataclasses.replace(TILING, min_tissue=0.25)) != key


def test_second_build_encodes_nothing(slides, encoder, tmp_path):
    paths, _ = slides
    module, info = encoder
    counting = CountingEncoder(module)
    first = build_bag_cache(paths[:3], (counting, info), TILING, tmp_path)
    assert counting.tiles_seen > 0
    counting.tiles_seen = 0
    calls = []
    second = build_bag_cache(paths[:3], (counting, info), TILING, tmp_path, progress=lambda d, n: calls.append(d))
    assert counting.tiles_seen == 0
    assert second == first and len(set(first)) == 3 and all(p.is_file() for p in first)
    assert calls == [1, 2, 3]


def test_a_damaged_cache_file_is_recomputed(slides, encoder, tmp_path):
    paths, _ = slides
    module, info = encoder
    (path,) = build_bag_cache(paths[:1], encoder, TILING, tmp_path)
    path.write_bytes(path.read_bytes()[:100])
    counting = CountingEncoder(module)
    build_bag_cache(paths[:1], (counting, info), TILING, tmp_path)
    assert counting.tiles_seen > 0 and EmbeddingCache(tmp_path).has(path.stem)


def test_cached_embeddings_equal_fresh_ones(slides, encoder, cached):
    paths, _ = slides
    cache_paths, _ = cached
    module, info = encoder
    fresh, xy = encode_slide(paths[1], module, info, TILING, batch_size=7)
    stored = EmbeddingCache(cache_paths[1].parent).get(cache_paths[1].stem)
    assert stored is not None and fresh.shape[1] == 64 and len(fresh) > 10
    torch.testing.assert_close(stored[0], fresh)
    np.testing.assert_array_equal(stored[1], xy)
    assert stored[1].dtype == np.int64 and stored[1].shape == (len(fresh), 2)


def test_bags_collate_padded_with_mask_and_subsample_by_seed_and_epoch(cached):
    cache_paths, labels = cached
    full = BagDataset(cache_paths, labels)
    sizes = [len(full[i][0]) for i in range(len(full))]
    x, y, i = full[2]
    assert x.dtype == torch.float32 and x.shape == (sizes[2], 64) and y.tolist() == [0.0] and i == 2

    (emb, mask), y, idx = collate_bags([full[0], full[1], full[2]])
    assert emb.shape == (3, max(sizes[:3]), 64) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == sizes[:3] and idx.tolist() == [0, 1, 2] and y.shape == (3, 1)
    assert torch.all(emb[~mask] == 0)

    sub = BagDataset(cache_paths, labels, max_tiles=5, seed=3)
    a, b = sub[0][0], BagDataset(cache_paths, labels, max_tiles=5, seed=3)[0][0]
    torch.testing.assert_close(a, b)
    sub.set_epoch(1)
    assert a.shape == (5, 64) and not torch.equal(sub[0][0], a)


def test_attention_mil_learns_from_cached_bags(cached):
    cache_paths, labels = cached
    torch.manual_seed(0)
    dataset = BagDataset(cache_paths, labels)
    every_tile = torch.cat([dataset[i][0] for i in range(len(dataset))])
    mean, std = every_tile.mean(0), every_tile.std(0) + 1e-6  # a random encoder's features are tiny: standardise
    head = GatedAttentionMIL(64, 1, hidden_dim=32)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    criterion = nn.BCEWithLogitsLoss()
    losses = []
    for epoch in range(13):  # 52 steps of 4 bags
        dataset.set_epoch(epoch)
        for (emb, mask), y, _ in DataLoader(dataset, batch_size=4, shuffle=True, collate_fn=collate_bags):
            logits, attention = head((emb - mean) / std, mask)
            loss = criterion(logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert attention.shape == (*mask.shape, 1)
    assert np.mean(losses[-8:]) < 0.6 * np.mean(losses[:8]), losses


def test_checkpoint_encoder_and_mil_head_round_trip(tmp_path, cached):
    cache_paths, labels = cached
    tile_model = create_model("tiny", ["thrombosis"]).eval()
    card = ModelCard(name="tiles", labels=["thrombosis"], backbone="tiny", tile_px=64, mpp=1.0)
    save_checkpoint(tmp_path / "enc", tile_model, card)
    module, info = load_encoder(str(tmp_path / "enc"))
    x = torch.randn(3, 3, 64, 64)
    torch.testing.assert_close(module(x), tile_model.embed(x))
    assert info["backbone"] == "tiny" and len(info["weights_sha256"]) == 64 and info["mpp"] == 1.0

    config = SimpleNamespace(data=SimpleNamespace(encoder=str(tmp_path / "enc")), model=SimpleNamespace(dropout=0.0))
    model = mil_head_for(config, SimpleNamespace(labels=["thrombosis"]))
    assert isinstance(model, CachedBagMIL) and not any(p.requires_grad for p in model.backbone.parameters())
    torch.testing.assert_close(model.embed(x), tile_model.embed(x))
    (emb, mask), _, _ = collate_bags([BagDataset(cache_paths, labels)[i] for i in range(2)])
    logits, _ = model(emb, mask)
    assert logits.shape == (2, 1)
    save_checkpoint(tmp_path / "mil", model, ModelCard(name="mil", labels=["thrombosis"], backbone="tiny",
                                                        tile_px=64, mpp=1.0, head="mil"))
    loaded, _ = load_checkpoint(tmp_path / "mil")
    torch.testing.assert_close(loaded.aggregate(emb, mask)[0], logits)
