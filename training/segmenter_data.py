"""The vessel segmenter's training config and data: slides read whole at the segmenter's mpp with their targets
(vessel, lumen, calcium-artifact maps) and per-pixel loss weights, patient-level splits, and seeded training crops.

Each manifest row names a slide; its vessel outlines come from the row's ``vessels`` column or, failing that,
``<slide>.vessels.geojson`` beside the slide (what ``calciscope synth`` writes; any QuPath export with class
``vessel`` works, a Polygon's first hole being the lumen). Calcium sectioning artifacts, when annotated, come
from ``artifacts`` / ``<slide>.artifacts.geojson`` (class ``calcium_artifact``); a slide without that file
teaches the ``calcium_artifact`` channel nothing (its loss is masked), so unannotated slides do no harm.
Every slide is read once, whole, at the segmenter's mpp (a 1 cm biopsy at 1 µm/px is 300 MB of RGB; phantoms are
far smaller).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from calciscope.data.annotations import norm_name
from calciscope.data.slides import open_slide
from calciscope.data.vessels.frames import level0_to_mask_px
from calciscope.data.vessels.truth import ARTIFACT_CLASS, Vessel, lumen_ring, read_artifact_polygons, read_vessels
from calciscope.errors import CalciscopeError
from calciscope.io import from_dict, read_yaml_mapping
from calciscope.model.precision import check_device
from calciscope.model.segmenter import CHANNELS, SegmenterCard
from calciscope.training.sources import read_manifest


@dataclass
class SegmenterTrainConfig:
    """``calciscope train-vessels`` settings (YAML keys of the same names; paths relative to the YAML file)."""

    manifest: str = ""
    # more slide manifests; their slide and patient ids get their folder's name in front ("more_phantoms/phantom_0001"),
    # as sets written by ``synth`` all count from phantom_0001 (``manifest``'s ids stay as they are, so a run that
    # continues with keep_init_validation still finds its init's validation slides)
    extra_manifests: list[str] = field(default_factory=list)
    out: str = "runs/vessels"
    mpp: float = 1.0
    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 96])
    crop_px: int = 160
    batch_size: int = 8
    steps: int = 1500
    lr: float = 0.003
    weight_decay: float = 0.0001
    pos_weight: list[float] = field(default_factory=lambda: [3.0, 3.0, 2.0])  # per channel
    vessel_crop_fraction: float = 0.5
    # which vessels vessel-centred crops favour: a vessel's draw weight is the largest weight among its kind and
    # findings (GeoJSON ``kind`` / ``findings``, case-insensitive; 1 when none is named), e.g. {capillary: 3,
    # vasculitis: 4} for the 4-6 µm capillaries and inflamed venules a uniform draw leaves rare; {} = uniform
    vessel_sampling: dict[str, float] = field(default_factory=dict)
    # hard crops: centred on annotated look-alikes and artifacts (artifacts.geojson classes below), where a
    # segmenter trained on vessel-centred and random crops calls lymphocytic cuffs, debris and folds vessels, and
    # where the calcium_artifact channel has its only positives
    hard_crop_fraction: float = 0.0
    hard_classes: list[str] = field(default_factory=lambda: [ARTIFACT_CLASS, "debris", "perivascular_infiltrate",
                                                             "fold"])
    # out-of-focus augmentation: that share of crops gets a Gaussian blur of sigma drawn from blur_sigma_um (the
    # phantom's blurred regions, and real scans' focus misses, hide vessels a segmenter trained on sharp crops misses)
    blur_fraction: float = 0.0
    blur_sigma_um: list[float] = field(default_factory=lambda: [1.0, 4.0])
    small_vessel_weight: float = 6.0  # the largest per-pixel loss weight a small vessel gets (1 = none)
    val_fraction: float = 0.2
    seed: int = 0
    amp: str = "auto"  # auto | off | bf16 | fp16 (fp16 on CUDA only, with a gradient scaler)
    device: str = "auto"  # auto (CUDA when there is one) | cpu | cuda | cuda:N
    synthetic_demo: bool = False
    description: str = ""
    init: str | None = None  # continue from this segmenter folder's weights (same widths)
    keep_init_validation: bool = False  # with init: validate on the init's validation patients, not a fresh split
    # steps between resume points (``last/state.pt``); each such chunk is an epoch of the training engine and a row
    # of metrics.csv (a number of steps, not a setting of the recipe: the result does not depend on it)
    checkpoint_every: int = 500


@dataclass
class SlideData:
    slide_id: str
    patient_id: str
    path: Path
    rgb: np.ndarray  # (H, W, 3) uint8 at config.mpp
    target: np.ndarray  # (C, H, W) uint8
    pixel_weight: np.ndarray  # (H, W) uint8 ≥ 1: small vessels and their rims weigh more (see small_vessel_weight)
    weight: np.ndarray  # (C,) 1 = channel annotated on this slide
    vessels: list[Vessel]
    slide_mpp: float
    downsample: float
    hard_centres: np.ndarray  # (K, 2) x, y map px of the hard-crop look-alikes and artifacts
    vessel_p: np.ndarray | None = None  # draw probability per vessel (config.vessel_sampling); None = uniform


def load_config(path: str | Path) -> SegmenterTrainConfig:
    path = Path(path)
    config = from_dict(SegmenterTrainConfig, read_yaml_mapping(path), str(path))
    if not config.manifest:
        raise CalciscopeError(f"{path}: 'manifest' is required")
    config.manifest, *config.extra_manifests = [m if Path(m).is_absolute() else str((path.parent / m).resolve())
                                                 for m in [config.manifest, *config.extra_manifests]]
    if config.init and not Path(config.init).is_absolute():
        config.init = str((path.parent / config.init).resolve())
    bad = {k: w for k, w in config.vessel_sampling.items() if not (isinstance(w, (int, float)) and w > 0)}
    if bad:
        raise CalciscopeError(f"{path}: vessel_sampling weights must be positive numbers; got {bad}")
    check_device(config.device, path)
    if config.steps < 1 or config.checkpoint_every < 1:
        raise CalciscopeError(f"{path}: steps and checkpoint_every must be at least 1")
    if config.crop_px % 2 ** (len(config.widths) - 1):
        raise CalciscopeError(f"{path}: crop_px must be a multiple of {2 ** (len(config.widths) - 1)}")
    return config


def load_slides(config: SegmenterTrainConfig, progress: Callable[[str], None] | None,
                 pixels: bool = True) -> list[SlideData]:
    """The slides of ``manifest`` and ``extra_manifests`` with their vessel outlines; ``pixels=False`` (evaluation,
    which segments each slide from the file) skips reading the slide whole and drawing the training targets."""
    out: list[SlideData] = []
    for n, manifest in enumerate([config.manifest, *config.extra_manifests]):
        prefix = f"{Path(manifest).parent.name}/" if n else ""
        out += _load_manifest(Path(manifest), prefix, config, progress, pixels)
    seen: set[str] = set()
    for s in out:
        if s.slide_id in seen:
            raise CalciscopeError(f"slide id {s.slide_id!r} appears twice in {config.manifest}"
                                  + "".join(f", {m}" for m in config.extra_manifests))
        seen.add(s.slide_id)
    named = {norm_name(n) for s in out for v in s.vessels for n in (v.kind or "", *v.findings)}
    unknown = sorted(k for k in config.vessel_sampling if norm_name(k) not in named)
    if unknown:
        raise CalciscopeError(f"vessel_sampling names {unknown}, which no vessel of {config.manifest}"
                              + "".join(f", {m}" for m in config.extra_manifests) + " has as its kind or a finding")
    return out


def _load_manifest(manifest: Path, prefix: str, config: SegmenterTrainConfig,
                   progress: Callable[[str], None] | None, pixels: bool) -> list[SlideData]:
    records = read_manifest(manifest, [])
    out = []
    for n, record in enumerate(records, start=1):
        path, vessels_path, artifacts_path = record.path, record.vessels, record.artifacts
        if vessels_path is None:
            raise CalciscopeError(f"{manifest} row {n + 1}: no vessel outlines for {path.name} (a 'vessels' column "
                                  f"or {path.stem}.vessels.geojson beside the slide)")
        vessels = read_vessels(vessels_path)
        with open_slide(path) as slide:
            ds = config.mpp / slide.mpp
            rgb = slide.read_downsampled(ds) if pixels else np.zeros((0, 0, 3), np.uint8)
            slide_mpp = slide.mpp
        slide_id, patient_id = prefix + record.slide_id, prefix + record.patient_id
        if not pixels:
            out.append(SlideData(slide_id, patient_id, path, rgb,
                                  np.zeros((len(CHANNELS), 0, 0), np.uint8), np.zeros((0, 0), np.uint8),
                                  np.zeros(len(CHANNELS), np.float32), vessels, slide_mpp, ds, np.zeros((0, 2))))
            continue
        h, w = rgb.shape[:2]
        target = np.zeros((len(CHANNELS), h, w), np.uint8)
        for v in vessels:
            cv2.fillPoly(target[0], [_fixed(v.polygon, ds)], 1, shift=4)
            lumen = lumen_ring(v)
            if lumen is not None:
                cv2.fillPoly(target[1], [_fixed(lumen, ds)], 1, shift=4)
        weight = np.array([1.0, 1.0, 0.0], np.float32)
        hard = np.zeros((0, 2))
        if artifacts_path is not None:
            for poly in read_artifact_polygons(artifacts_path):
                cv2.fillPoly(target[2], [_fixed(poly, ds)], 1, shift=4)
            weight[2] = 1.0
            hard_polys = read_artifact_polygons(artifacts_path, tuple(config.hard_classes))
            if hard_polys:
                hard = np.array([level0_to_mask_px(p, ds).mean(axis=0) for p in hard_polys])
        out.append(SlideData(slide_id, patient_id, path, rgb, target,
                              small_vessel_weight(vessels, (h, w), ds, config.small_vessel_weight, config.mpp),
                              weight, vessels,
                              slide_mpp, ds, hard, vessel_draw_p(vessels, config.vessel_sampling)))
        if progress is not None:
            progress(f"read {slide_id} ({n}/{len(records)} of {manifest.name})")
    return out


def vessel_draw_p(vessels: list[Vessel], weights: dict[str, float]) -> np.ndarray | None:
    """Probability of each vessel being a vessel-centred crop's centre: the largest of ``weights`` over its kind
    and findings (1 when none is named), normalised; None (a uniform draw) when ``weights`` is empty."""
    if not weights or not vessels:
        return None
    w = {norm_name(k): float(v) for k, v in weights.items()}
    each = np.array([max([w[n] for n in map(norm_name, (v.kind or "", *v.findings)) if n in w], default=1.0)
                     for v in vessels])
    return each / each.sum()


def small_vessel_weight(vessels: list[Vessel], shape: tuple[int, int], downsample: float, top: float,
                         mpp: float) -> np.ndarray:
    """Per-pixel loss weight at ``mpp`` µm/px: 1, and min(top, sqrt(400 µm² / area)) over each vessel grown by
    3 µm, smallest vessels drawn last. Without it a 6 µm capillary (~30 µm²) is noise beside a 200 µm artery
    (~30 000 µm²). (In µm, not pixels, so a segmenter trained at another mpp weighs the same vessels alike.)"""
    weight = np.ones(shape, np.uint8)
    shapes = []
    for v in vessels:
        pts = level0_to_mask_px(v.polygon, downsample)
        area = max(float(cv2.contourArea(pts.astype(np.float32))), 1.0)
        r = np.sqrt(area / np.pi)
        centre = pts.mean(axis=0)
        shapes.append((area * mpp**2, centre + (pts - centre) * (r + 3 / mpp) / r))
    for area, pts in sorted(shapes, key=lambda a: -a[0]):
        value = int(round(min(top, max(1.0, np.sqrt(400.0 / area)))))
        cv2.fillPoly(weight, [np.round(pts * 16).astype(np.int32)], value, shift=4)
    return weight


def _fixed(poly: np.ndarray, downsample: float) -> np.ndarray:
    return np.round(level0_to_mask_px(poly, downsample) * 16).astype(np.int32)


def validation_of(card: SegmenterCard | None) -> list[str] | None:
    """The validation slide ids of the segmenter a run continues from (None: not a continuation)."""
    if card is None:
        return None
    return list(((card.training or {}).get("slides") or {}).get("validation") or [])


def split_patients(slides: list[SlideData], fraction: float, seed: int,
           keep_validation: list[str] | None = None) -> tuple[list[int], list[int]]:
    """(train, validation) slide indices, whole patients on one side; a continued run (``keep_validation``: its
    init's validation slide ids) keeps those patients in validation, so its validation slides stay unseen."""
    held = {s.patient_id for s in slides if s.slide_id in set(keep_validation or ())}
    if held:  # (an init trained on other slides: a fresh split)
        val = [i for i, s in enumerate(slides) if s.patient_id in held]
        return [i for i in range(len(slides)) if i not in val], val
    patients = sorted({s.patient_id for s in slides})
    rng = np.random.default_rng(seed)
    n_val = max(1, int(round(fraction * len(patients)))) if len(patients) > 1 and fraction > 0 else 0
    val_patients = set(rng.permutation(patients)[:n_val].tolist())
    val = [i for i, s in enumerate(slides) if s.patient_id in val_patients]
    return [i for i in range(len(slides)) if i not in val], val


def random_crop(s: SlideData, rng: np.random.Generator, size: int, vessel_fraction: float, hard_fraction: float = 0.0,
          blur_fraction: float = 0.0, blur_sigma_px: tuple[float, float] = (1.0, 4.0)):
    """A seeded training crop: centred near a hard look-alike (``hard_fraction`` of the time, when the slide
    has any), near a vessel (``vessel_fraction``), else anywhere; random rot90 / flip / stain gain, and a Gaussian
    blur ``blur_fraction`` of the time (no draw at all when 0, so older recipes keep their random stream)."""
    h, w = s.rgb.shape[:2]
    u = rng.random()
    if len(s.hard_centres) and u < hard_fraction:
        cx, cy = s.hard_centres[int(rng.integers(len(s.hard_centres)))] + rng.normal(0, size / 6, 2)
    elif s.vessels and u < hard_fraction + vessel_fraction:
        n = len(s.vessels)
        v = s.vessels[int(rng.integers(n)) if s.vessel_p is None else int(rng.choice(n, p=s.vessel_p))]
        cx, cy = v.polygon.mean(axis=0) / s.downsample + rng.normal(0, size / 4, 2)
    else:
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    x0 = int(np.clip(cx - size / 2, 0, max(w - size, 0)))
    y0 = int(np.clip(cy - size / 2, 0, max(h - size, 0)))
    rgb = np.full((size, size, 3), 255, np.uint8)
    tgt = np.zeros((len(CHANNELS) + 1, size, size), np.uint8)  # the channels, then the pixel weight
    tgt[-1] = 1
    rgb[: min(size, h - y0), : min(size, w - x0)] = s.rgb[y0 : y0 + size, x0 : x0 + size]
    tgt[:-1, : min(size, h - y0), : min(size, w - x0)] = s.target[:, y0 : y0 + size, x0 : x0 + size]
    tgt[-1, : min(size, h - y0), : min(size, w - x0)] = s.pixel_weight[y0 : y0 + size, x0 : x0 + size]
    k = int(rng.integers(4))
    rgb, tgt = np.rot90(rgb, k, (0, 1)), np.rot90(tgt, k, (1, 2))
    if rng.random() < 0.5:
        rgb, tgt = rgb[:, ::-1], tgt[:, :, ::-1]
    # stain / scanner variation: per-channel gain and offset
    rgb = np.clip(rgb.astype(np.float32) * rng.uniform(0.9, 1.1, 3) + rng.uniform(-12, 12, 3), 0, 255)
    if blur_fraction > 0 and rng.random() < blur_fraction:
        rgb = cv2.GaussianBlur(rgb, (0, 0), float(rng.uniform(*blur_sigma_px)))
    return rgb.astype(np.uint8), np.ascontiguousarray(tgt)
