"""Tile transforms: optional stain normalisation (Macenko or Reinhard; train and eval alike), then albumentations at
train time.

A :class:`TileTransform` is called as ``transform(rgb, seed)`` and is a pure function of (image, seed): the
albumentations pipeline and the HED stain jitter draw from generators made from ``seed`` on every call, so any
process or DataLoader worker gives the same tile, and a resumed run sees exactly the augmentations an
uninterrupted one would. The training loop passes a seed fixed by (run seed, epoch, example).

Train pipeline (each step off when its setting is off / 0), in the order a slide is made and scanned:
random-resized crop (tiles larger than ``tile_px`` only) → flips → rot90 → stain (albumentations ``HEStain``, or HED
jitter) → hue / saturation → brightness / contrast → Gaussian blur → JPEG re-compression.
Cost per 224² tile on one core: about 1 ms without the stain step, +8 ms for ``HEStain`` (its random preset is
applied to 80 % of tiles), +0.5 ms for HED jitter, +2 ms with stain normalisation.

Why these defaults (issue 20): a model trained on one site must rank another site's tiles; HED jitter of ±0.05 and
brightness/contrast alone leave the hue of haematoxylin and eosin where the training site put them, so the model
learns the site's colours. ``HEStain`` swaps in other sites' stain matrices, ColorJitter moves hue and saturation,
and a random-resized crop stops a tile folder's every epoch from being the same centre crop.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import albumentations as A
import cv2
import numpy as np

from calciscope.data.stain import MacenkoNormalizer, ReinhardNormalizer, hed_scale_shift, normalizer_from_spec
from calciscope.data.tile_folders import fit_square
from calciscope.errors import CalciscopeError
from calciscope.training.config import AugmentConfig

Normalizer = MacenkoNormalizer | ReinhardNormalizer

BLUR_SIGMA = (0.1, 1.0)  # px: slight focus variation, not a smear
JPEG_QUALITY = (60, 95)


class HEDJitter(A.ImageOnlyTransform):
    """H&E stain augmentation (Tellez et al. 2018) as an albumentations step (see ``stain.hed_jitter``).

    Draws from the pipeline's ``random_generator``, so a seeded ``Compose`` seeds it too.
    """

    def __init__(self, sigma: float = 0.05, bias: float = 0.05, p: float = 1.0):
        super().__init__(p=p)
        self.sigma = float(sigma)
        self.bias = float(bias)

    def get_params(self) -> dict[str, Any]:
        rng = self.random_generator
        return {"scale": 1.0 + rng.uniform(-self.sigma, self.sigma, 3), "shift": rng.uniform(-self.bias, self.bias, 3)}

    def apply(self, img: np.ndarray, scale: np.ndarray, shift: np.ndarray, **params: Any) -> np.ndarray:
        return hed_scale_shift(img, scale, shift)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("sigma", "bias")


class RandomResizedCropToTile(A.ImageOnlyTransform):
    """A random crop of ``scale`` to 1 of the image's area (aspect ratio 3/4 to 4/3), resized to ``tile_px`` square.

    Only for images larger than ``tile_px`` (tile folders of bigger tiles): an image of ``tile_px`` or less is
    brought to ``tile_px`` by the centre crop alone, as evaluation does, so tiles cut at the model's size never zoom.
    """

    def __init__(self, tile_px: int, scale: float = 0.5, p: float = 1.0):
        super().__init__(p=p)
        self.tile_px, self.scale = int(tile_px), float(scale)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = data["image"].shape[:2]
        rng = self.random_generator
        area = rng.uniform(self.scale, 1.0) * h * w
        ratio = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        cw = int(round(min(w, max(1.0, np.sqrt(area * ratio)))))
        ch = int(round(min(h, max(1.0, np.sqrt(area / ratio)))))
        return {"x0": int(rng.integers(0, w - cw + 1)), "y0": int(rng.integers(0, h - ch + 1)), "cw": cw, "ch": ch}

    def apply(self, img: np.ndarray, x0: int = 0, y0: int = 0, cw: int = 0, ch: int = 0, **params: Any) -> np.ndarray:
        if min(img.shape[:2]) <= self.tile_px:
            return fit_square(img, self.tile_px)
        crop = img[y0:y0 + ch, x0:x0 + cw]
        return cv2.resize(crop, (self.tile_px, self.tile_px), interpolation=cv2.INTER_AREA)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("tile_px", "scale")


@dataclass
class TileTransform:
    """``(rgb uint8 HWC, seed) -> rgb uint8 HWC``: stain normalisation (if any), then augmentation (if any).

    One instance per process (DataLoader workers each get a copy); not for concurrent use from several threads.
    """

    augment: A.Compose | None = None
    normalizer: Normalizer | None = None
    steps: list[str] = field(default_factory=list)  # names of the steps, in order, for logs and tests
    crop_px: int | None = None  # the pipeline crops images larger than this itself: give it the whole image

    def __call__(self, rgb: np.ndarray, seed: int = 0) -> np.ndarray:
        if self.normalizer is not None:
            rgb = self.normalizer.transform(rgb)
        if self.augment is not None:
            seed = int(seed) % 2**64
            self.augment.set_random_state(np.random.default_rng(seed), random.Random(seed))
            rgb = self.augment(image=rgb)["image"]
        return np.ascontiguousarray(rgb)


def build_train_transform(config: AugmentConfig, *, stain_normalize: bool | str | dict | Normalizer | None = False,
                          tile_px: int | None = None) -> TileTransform:
    """The training transform ``config`` describes; ``stain_normalize``: True / "macenko" / "reinhard" (reference
    target), a normaliser or its ``to_dict()``, or False. With ``tile_px``, images larger than it get a random-resized
    crop (``augment.crop_scale`` < 1) instead of the centre crop."""
    _check(config)
    steps: list[A.BasicTransform] = []
    crop_px = tile_px if tile_px is not None and config.crop_scale < 1 else None
    if crop_px is not None:
        steps.append(RandomResizedCropToTile(crop_px, config.crop_scale))
    if config.flips:
        steps += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    if config.rot90:
        steps.append(A.RandomRotate90(p=1.0))
    steps += _colour_steps(config)
    if config.blur_prob > 0:
        steps.append(A.GaussianBlur(blur_limit=0, sigma_limit=BLUR_SIGMA, p=config.blur_prob))
    if config.jpeg_prob > 0:
        steps.append(A.ImageCompression(compression_type="jpeg", quality_range=JPEG_QUALITY, p=config.jpeg_prob))
    normalizer = stain_normalizer(stain_normalize)
    names = ([type(normalizer).__name__] if normalizer is not None else []) + [type(s).__name__ for s in steps]
    augment = A.Compose(steps, p=1.0, seed=0) if steps else None
    return TileTransform(augment=augment, normalizer=normalizer, steps=names, crop_px=crop_px)


def _colour_steps(config: AugmentConfig) -> list[A.BasicTransform]:
    """Stain (HEStain or HED jitter), then hue / saturation, then brightness / contrast."""
    steps: list[A.BasicTransform] = []
    if config.stain == "hestain" and config.stain_prob > 0:
        steps.append(A.HEStain(method="random_preset",
                               intensity_scale_range=(1 - config.hestain_scale, 1 + config.hestain_scale),
                               intensity_shift_range=(-config.hestain_shift, config.hestain_shift),
                               augment_background=False, p=config.stain_prob))
    elif config.stain == "hed" and config.hed_jitter > 0:
        steps.append(HEDJitter(sigma=config.hed_jitter, bias=config.hed_jitter, p=1.0))
    if config.hue > 0 or config.saturation > 0:
        steps.append(A.ColorJitter(brightness=0.0, contrast=0.0, saturation=(1 - config.saturation,
                                                                             1 + config.saturation),
                                   hue=(-config.hue, config.hue), p=1.0))
    if config.brightness_contrast > 0:
        limit = config.brightness_contrast
        steps.append(A.RandomBrightnessContrast(brightness_limit=limit, contrast_limit=limit, p=1.0))
    return steps


def build_eval_transform(*, stain_normalize: bool | str | dict | Normalizer | None = False) -> TileTransform:
    """Validation / inference: identity, or the same stain normalisation as training."""
    normalizer = stain_normalizer(stain_normalize)
    return TileTransform(normalizer=normalizer, steps=[type(normalizer).__name__] if normalizer is not None else [])


def stain_normalizer(spec: bool | str | dict | Normalizer | None) -> Normalizer | None:
    """The normaliser a config or card names (``data.stain.normalizer_from_spec``)."""
    return normalizer_from_spec(spec)


def _check(config: AugmentConfig) -> None:
    checks = [
        (0 <= config.hed_jitter < 1, f"augment.hed_jitter must be in [0, 1), got {config.hed_jitter}"),
        (0 <= config.stain_prob <= 1, f"augment.stain_prob must be in [0, 1], got {config.stain_prob}"),
        (0 <= config.hestain_scale < 1, f"augment.hestain_scale must be in [0, 1), got {config.hestain_scale}"),
        (0 <= config.hestain_shift <= 1, f"augment.hestain_shift must be in [0, 1], got {config.hestain_shift}"),
        (0 <= config.hue <= 0.5, f"augment.hue must be in [0, 0.5], got {config.hue}"),
        (0 <= config.saturation < 1, f"augment.saturation must be in [0, 1), got {config.saturation}"),
        (0 < config.crop_scale <= 1, f"augment.crop_scale must be in (0, 1], got {config.crop_scale}"),
        (0 <= config.brightness_contrast < 1,
         f"augment.brightness_contrast must be in [0, 1), got {config.brightness_contrast}"),
        (0 <= config.blur_prob <= 1, f"augment.blur_prob must be in [0, 1], got {config.blur_prob}"),
        (0 <= config.jpeg_prob <= 1, f"augment.jpeg_prob must be in [0, 1], got {config.jpeg_prob}"),
    ]
    for ok, message in checks:
        if not ok:
            raise CalciscopeError(message)
