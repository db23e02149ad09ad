"""Tile transforms: a pure function of (tile, seed) in any process, each step switchable, HED jitter in range."""

import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import read_rgb
from torch.utils.data import DataLoader, Dataset

from calciscope.data.stain import MacenkoNormalizer, rgb_to_hed
from calciscope.errors import CalciscopeError
from calciscope.training.augment import build_eval_transform, build_train_transform
from calciscope.training.config import AugmentConfig

ALL_OFF = AugmentConfig(flips=False, rot90=False, stain="none", hed_jitter=0.0, hue=0.0, saturation=0.0,
                        brightness_contrast=0.0, blur_prob=0.0, jpeg_prob=0.0)


@pytest.fixture(scope="module")
def tiles(cmu_svs) -> list[np.ndarray]:
    """Sixteen 224² tiles of the real scan (tissue and background)."""
    region = read_rgb(cmu_svs, (0, 0), (896, 896))
    return [np.ascontiguousarray(region[y:y + 224, x:x + 224]) for y in range(0, 896, 224) for x in range(0, 896, 224)]


@pytest.fixture(scope="module")
def tissue(cmu_svs) -> np.ndarray:
    return read_rgb(cmu_svs, (1000, 1000), (224, 224))


def test_same_seed_gives_the_same_tile_whatever_ran_before_or_which_copy_runs_it(tissue, tiles):
    transform = build_train_transform(AugmentConfig(blur_prob=0.5, jpeg_prob=0.5))
    first = [transform(tissue, seed) for seed in range(20)]
    for tile in tiles:  # other calls in between must not move any random state
        transform(tile, 12345)
    copy = pickle.loads(pickle.dumps(transform))  # as a DataLoader worker gets it
    fresh = build_train_transform(AugmentConfig(blur_prob=0.5, jpeg_prob=0.5))
    for seed in reversed(range(20)):
        assert np.array_equal(copy(tissue, seed), first[seed]) and np.array_equal(fresh(tissue, seed), first[seed])


class SeededTiles(Dataset):
    def __init__(self, tile, transform):
        self.tile, self.transform = tile, transform

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.from_numpy(self.transform(self.tile, seed=1000 + i))


def test_dataloader_workers_produce_the_same_tiles_as_the_main_process(tissue):
    transform = build_train_transform(AugmentConfig())
    expected = torch.stack([torch.from_numpy(transform(tissue, seed=1000 + i)) for i in range(8)])
    loader = DataLoader(SeededTiles(tissue, transform), batch_size=4, num_workers=2)
    assert torch.equal(torch.cat(list(loader)), expected)


def test_different_seeds_give_different_tiles(tissue):
    transform = build_train_transform(AugmentConfig())
    outputs = [transform(tissue, seed).tobytes() for seed in range(30)]
    assert len(set(outputs)) == 30


def test_output_keeps_dtype_and_shape(tissue):
    out = build_train_transform(AugmentConfig(blur_prob=1.0, jpeg_prob=1.0))(tissue, 3)
    assert out.dtype == np.uint8 and out.shape == (224, 224, 3) and out.flags["C_CONTIGUOUS"]


@pytest.mark.parametrize("changes, step, removed", [
    ({"flips": False}, "HorizontalFlip", 2), ({"rot90": False}, "RandomRotate90", 1),
    ({"stain": "none"}, "HEStain", 1), ({"stain_prob": 0.0}, "HEStain", 1),
    ({"hue": 0.0, "saturation": 0.0}, "ColorJitter", 1),
    ({"brightness_contrast": 0.0}, "RandomBrightnessContrast", 1), ({"blur_prob": 0.0}, "GaussianBlur", 1),
    ({"jpeg_prob": 0.0}, "ImageCompression", 1),
])
def test_each_step_is_switched_off_by_its_setting(changes, step, removed):
    on = build_train_transform(AugmentConfig(blur_prob=0.5, jpeg_prob=0.5))
    off = build_train_transform(replace(AugmentConfig(blur_prob=0.5, jpeg_prob=0.5), **changes))
    assert step in on.steps and step not in off.steps
    assert len(off.steps) == len(on.steps) - removed


def test_the_default_stain_step_is_albumentations_hestain_and_hed_jitter_is_the_alternative():
    assert build_train_transform(AugmentConfig()).steps[3:5] == ["HEStain", "ColorJitter"]
    hed = build_train_transform(AugmentConfig(stain="hed", hed_jitter=0.05)).steps
    assert "HEDJitter" in hed and "HEStain" not in hed
    assert "HEDJitter" not in build_train_transform(AugmentConfig(stain="hed", hed_jitter=0.0)).steps


def test_hestain_moves_the_stain_colours_of_real_tissue(tissue):
    transform = build_train_transform(replace(ALL_OFF, stain="hestain", stain_prob=1.0))
    hue = [np.median(rgb_to_hed(transform(tissue, seed))[..., 0]) for seed in range(12)]
    assert np.ptp(hue) > 0.05  # haematoxylin amount varies from seed to seed


def test_tiles_larger_than_tile_px_get_a_random_resized_crop_and_smaller_ones_the_centre_crop(tissue):
    big = np.ascontiguousarray(np.concatenate([tissue, tissue[::-1]], axis=0))  # 448 x 224
    big = np.ascontiguousarray(np.concatenate([big, big], axis=1))  # 448 x 448
    transform = build_train_transform(replace(ALL_OFF, crop_scale=0.5), tile_px=112)
    assert transform.steps == ["RandomResizedCropToTile"] and transform.crop_px == 112
    crops = {transform(big, seed).tobytes() for seed in range(8)}
    assert len(crops) == 8 and all(transform(big, s).shape == (112, 112, 3) for s in range(3))
    assert np.array_equal(transform(big, 3), transform(big, 3))
    small = tissue[:100, :100]
    assert transform(small, 0).shape == (112, 112, 3)
    assert build_train_transform(replace(ALL_OFF, crop_scale=1.0), tile_px=112).crop_px is None


def test_everything_off_is_the_identity(tissue):
    transform = build_train_transform(ALL_OFF)
    assert transform.steps == [] and all(np.array_equal(transform(tissue, s), tissue) for s in range(5))


def test_geometry_only_gives_one_of_the_eight_dihedral_images(tissue):
    transform = build_train_transform(replace(ALL_OFF, flips=True, rot90=True))
    dihedral = {np.rot90(t, k).tobytes() for t in (tissue, tissue[:, ::-1]) for k in range(4)}
    seen = {transform(tissue, s).tobytes() for s in range(64)}
    assert seen <= dihedral and len(seen) == 8


def test_hed_jitter_scales_and_shifts_h_and_e_within_the_configured_range(tissue):
    sigma = 0.1
    transform = build_train_transform(replace(ALL_OFF, stain="hed", hed_jitter=sigma))
    before = rgb_to_hed(tissue)
    slopes, intercepts = [], []
    for seed in range(20):
        out = transform(tissue, seed)
        ok = np.all((tissue > 20) & (tissue < 235) & (out > 20) & (out < 235), axis=2)
        fits = [np.polyfit(before[ok][:, c], rgb_to_hed(out)[ok][:, c], 1) for c in (0, 1)]  # H, E
        slopes += [f[0] for f in fits]
        intercepts += [f[1] for f in fits]
    slopes, intercepts = np.array(slopes), np.array(intercepts)
    assert np.all(np.abs(slopes - 1) <= sigma + 0.02) and np.all(np.abs(intercepts) <= sigma + 0.01)
    assert np.ptp(slopes) > sigma and np.ptp(intercepts) > sigma  # and they do spread over the range


def test_stain_normalisation_runs_first_in_train_and_eval_alike(tissue):
    normalized = MacenkoNormalizer().transform(tissue)
    assert not np.array_equal(normalized, tissue)
    assert np.array_equal(build_eval_transform(stain_normalize=True)(tissue, 0), normalized)
    assert np.array_equal(build_train_transform(ALL_OFF, stain_normalize=True)(tissue, 7), normalized)
    assert np.array_equal(build_eval_transform()(tissue, 0), tissue)
    target = MacenkoNormalizer.from_dict(MacenkoNormalizer().to_dict()).to_dict()
    assert build_eval_transform(stain_normalize=target).normalizer.to_dict() == target


def test_invalid_settings_are_refused():
    with pytest.raises(CalciscopeError, match="augment.blur_prob must be in \\[0, 1\\], got 1.5"):
        build_train_transform(AugmentConfig(blur_prob=1.5))
    with pytest.raises(CalciscopeError, match="augment.hed_jitter"):
        build_train_transform(AugmentConfig(hed_jitter=-0.1))
    with pytest.raises(CalciscopeError, match="augment.crop_scale"):
        build_train_transform(AugmentConfig(crop_scale=0.0))

