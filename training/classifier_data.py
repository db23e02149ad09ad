"""The vessel classifier's training config and data: per slide, crops of its vessels (the annotated outlines and,
with a segmenter, its detections as ``predict`` hands them over) with their extras and targets.

Each manifest row names a slide with vessel outlines (the row's ``vessels`` column or ``<slide>.vessels.geojson``,
each outline's ``findings`` property its targets) and, for the slide-level map, the finding columns (when absent, a
slide has a finding when one of its vessels has it). Training vessels are the annotated outlines and, with a
``segmenter``, the vessels it detects: a detection matched to an outline (IoU ≥ 0.5) takes that vessel's findings;
one overlapping no outline (IoU < 0.1) is a vessel with none (a lymphocytic cuff or debris taken for a vessel must
score low); the rest are left out. Detections include the faint outlines (``candidate_min_mean_probability``) that
inference shows the classifier too. Each training vessel gives ``copies`` crops with its scale and centre jittered;
flips, rot90 and HED stain jitter are drawn per step (``augment_crops``).

With ``judge_artifacts``, a ``calcium_artifact`` output learns which vessels lost calcium in sectioning: a vessel is
positive when a ``calcium_artifact`` region of the slide's artifact annotations (the row's ``artifacts`` column or
``<slide>.artifacts.geojson``; a slide without the file has none) comes within ``ARTIFACT_TOUCH_UM`` of its outline.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calciscope.data.slides import open_slide
from calciscope.data.stain import hed_scale_shift
from calciscope.data.synthetic import FINDINGS
from calciscope.data.tissue import TissueConfig, detect_tissue
from calciscope.data.vessels.match import iou_matrix, near_artifact
from calciscope.data.vessels.measure import shape_of
from calciscope.data.vessels.truth import read_artifact_polygons, read_vessels
from calciscope.errors import CalciscopeError
from calciscope.io import from_dict, read_yaml_mapping
from calciscope.model.precision import check_device
from calciscope.model.vessel_classifier import CropConfig, crop_geometry, read_crop, vessel_extras
from calciscope.model.vessel_detection import VesselConfig, detect_vessels
from calciscope.training.sources import read_manifest


@dataclass
class ClassifierTrainConfig:
    """``calciscope train-vessel-classifier`` settings (YAML keys of the same names; ``manifests`` and ``segmenter``
    relative to the YAML file, ``out`` to the working directory, as in the other training configs)."""

    manifests: list[str] = field(default_factory=list)
    out: str = "runs/vessel_classifier"
    segmenter: str | None = "demo"  # detections join the outlines (and validation judges them); null: outlines only
    labels: list[str] = field(default_factory=lambda: list(FINDINGS))
    crop: dict = field(default_factory=lambda: dataclasses.asdict(CropConfig()))
    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    hidden: int = 64
    dropout: float = 0.2
    copies: int = 4  # jittered crops per training vessel
    scale_jitter: float = 0.15  # crop side × U(1 - s, 1 + s)
    shift_jitter: float = 0.08  # crop centre + U(-s, s) × side, per axis
    hed_jitter: float = 0.05
    epochs: int = 15
    batch_size: int = 64
    lr: float = 0.002
    weight_decay: float = 0.0001
    max_pos_weight: float = 10.0  # per finding, negatives / positives, capped
    # faint segmenter outlines (mean probability from this up to the segmenter's filter) are training vessels too,
    # and at inference the classifier judges them and keeps those with a lesion (stored in the card); null: none
    candidate_min_mean_probability: float | None = 0.4
    # with a segmenter: a "vessel" output too (outline or matched detection 1, a detection overlapping no outline 0),
    # and validation picks the vessel threshold that lists outlines with the highest min(recall, precision)
    judge_vessels: bool = True
    # a "calcium_artifact" output too (see the module docstring); needs artifact annotations on some training slides
    judge_artifacts: bool = False
    # its flag threshold: the lowest (from 0.5) that flags at most this share of the validation vessels without one
    artifact_max_false_rate: float = 0.01
    val_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"  # auto (CUDA when there is one) | cpu | cuda | cuda:N; the classifier and segmenter run there
    synthetic_demo: bool = False
    description: str = ""


@dataclass
class VesselCrops:
    """Crops of one slide's vessels with their extras and 0/1 targets."""

    crops: np.ndarray  # (N, H, W, 3) uint8
    extras: np.ndarray  # (N, N_EXTRA) float32
    targets: np.ndarray  # (N, L + 2) float32: the findings, then "calcium artifact", then "is a vessel"
    candidate: np.ndarray  # (N,) bool: a faint outline (see ClassifierTrainConfig.candidate_min_mean_probability)
    n_outlines: int  # annotated vessels on the slide
    ambiguous: np.ndarray  # (N,) bool: a validation detection overlapping an outline without matching it (IoU 0.1-0.5)


def load_config(path: str | Path) -> ClassifierTrainConfig:
    path = Path(path)
    config = from_dict(ClassifierTrainConfig, read_yaml_mapping(path), str(path))
    if not config.manifests:
        raise CalciscopeError(f"{path}: 'manifests' (one or more slide manifests) is required")
    config.manifests = [str(Path(m) if Path(m).is_absolute() else (path.parent / m).resolve()) for m in config.manifests]
    if config.segmenter and config.segmenter != "demo" and not Path(config.segmenter).is_absolute():
        config.segmenter = str((path.parent / config.segmenter).resolve())
    check_device(config.device, path)
    return config


def check_config(config: ClassifierTrainConfig) -> CropConfig:
    try:
        crop = CropConfig(**config.crop)
    except TypeError as exc:
        raise CalciscopeError(f"crop: {exc}") from None
    checks = [(config.copies >= 1, f"copies must be at least 1, got {config.copies}"),
              (0 <= config.scale_jitter < 1, f"scale_jitter must be in [0, 1), got {config.scale_jitter}"),
              (0 <= config.shift_jitter < 0.5, f"shift_jitter must be in [0, 0.5), got {config.shift_jitter}"),
              (0 <= config.artifact_max_false_rate < 1,
               f"artifact_max_false_rate must be in [0, 1), got {config.artifact_max_false_rate}"),
              (config.epochs >= 1 and config.batch_size >= 1, "epochs and batch_size must be at least 1"),
              (len(config.widths) >= 2, f"widths needs at least two entries, got {config.widths}"),
              (crop.context > 0, f"crop.context must be positive, got {crop.context}"),
              (crop.crop_px % 2 ** (len(config.widths) - 1) == 0,
               f"crop.crop_px must be a multiple of {2 ** (len(config.widths) - 1)}"),
              (0 < crop.min_side_um <= crop.max_side_um, "crop: need 0 < min_side_um <= max_side_um")]
    for ok, message in checks:
        if not ok:
            raise CalciscopeError(message)
    return crop


def manifest_slides(config: ClassifierTrainConfig):
    """Every manifest row as (key, patient, slide path, vessel outline path, slide labels or None, artifact
    annotation path or None); keys and patients carry the manifest's folder name, so two manifests written by
    ``synth`` do not collide."""
    rows = []
    for manifest in config.manifests:
        tag = Path(manifest).parent.name
        for r in read_manifest(manifest, config.labels):
            if r.vessels is None:
                raise CalciscopeError(f"{manifest}: no vessel outlines for {r.path.name} (a 'vessels' column or "
                                      f"{r.path.stem}.vessels.geojson beside the slide)")
            rows.append((f"{tag}/{r.slide_id}", f"{tag}/{r.patient_id}", r.path, r.vessels, r.labels, r.artifacts))
    return rows


def extract_vessels(path: Path, outlines_path: Path, labels: list[str], crop: CropConfig, segmenter, copies: int,
             rng: np.random.Generator | None, config: ClassifierTrainConfig,
             artifacts_path: Path | None = None) -> tuple[VesselCrops, np.ndarray]:
    """Crops of one slide: the outlines (training, i.e. with ``rng``; or without a segmenter) and the segmenter's
    detections labelled by their matched outline. Validation (no ``rng``) keeps the detections that overlap an
    outline without matching it too, flagged ``ambiguous`` (inference lists them; their findings are their
    outline's, and they are no vessel match). Every crop's calcium-artifact target is its own outline's, from the
    ``calcium_artifact`` regions of ``artifacts_path``. Returns them and the slide's labels as its outlines give
    them."""
    truth = read_vessels(outlines_path)
    regions = read_artifact_polygons(artifacts_path) if artifacts_path is not None else []
    truth_y = np.array([[k in v.findings for k in labels] + [0, 1] for v in truth], np.float32)
    truth_y = truth_y.reshape(-1, len(labels) + 2)
    # (polygon, outer µm, fat, targets, faint, ambiguous)
    items: list[tuple[np.ndarray, float, bool, np.ndarray, bool, bool]] = []
    with open_slide(path) as slide:
        mpp = slide.mpp
        if rng is not None or segmenter is None:
            items += [(v.polygon, shape_of(v.polygon, mpp).minor_um, v.compartment == "fat", y, False, False)
                      for v, y in zip(truth, truth_y)]
        if segmenter is not None:
            model, card = segmenter
            found, faint, _ = detect_vessels(slide, detect_tissue(slide, TissueConfig()), model, card, VesselConfig(),
                                             config.candidate_min_mean_probability)
            found = found + faint
            iou = iou_matrix([v.polygon for v in found], [v.polygon for v in truth])
            for d, v in enumerate(found):
                best = int(iou[d].argmax()) if len(truth) else -1
                ambiguous = False
                if best >= 0 and iou[d, best] >= 0.5:
                    y = truth_y[best]
                elif best < 0 or iou[d, best] < 0.1:
                    y = np.zeros(len(labels) + 2, np.float32)
                elif rng is None:
                    y, ambiguous = np.r_[truth_y[best][:-1], 0.0].astype(np.float32), True
                else:
                    continue
                items.append((v.polygon, v.geometry.outer_diameter_um, v.compartment == "fat", y,
                              d >= len(found) - len(faint), ambiguous))
        crops, extras, targets, candidate, unsure = [], [], [], [], []
        for poly, outer, fat, y, is_faint, ambiguous in items:
            y = y.copy()
            y[len(labels)] = float(bool(regions) and near_artifact(poly, regions, mpp))
            for _ in range(copies if rng is not None else 1):
                scale, shift = 1.0, (0.0, 0.0)
                if rng is not None:
                    scale = float(rng.uniform(1 - config.scale_jitter, 1 + config.scale_jitter))
                    shift = tuple(rng.uniform(-config.shift_jitter, config.shift_jitter, 2))
                crops.append(read_crop(slide, *crop_geometry(poly, mpp, crop, scale, shift), crop.crop_px))
                extras.append(vessel_extras([outer * (scale if rng is not None else 1.0)], [fat])[0])
                targets.append(y)
                candidate.append(is_faint)
                unsure.append(ambiguous)
    shape = (0, crop.crop_px, crop.crop_px, 3)
    out = VesselCrops(np.stack(crops) if crops else np.zeros(shape, np.uint8),
                   np.stack(extras) if extras else np.zeros((0, 2), np.float32),
                   np.stack(targets) if targets else np.zeros((0, len(labels) + 2), np.float32),
                   np.array(candidate, bool), len(truth), np.array(unsure, bool))
    return out, truth_y[:, : len(labels)].max(axis=0) if len(truth_y) else np.zeros(len(labels), np.float32)


def augment_crops(crops: np.ndarray, rng: np.random.Generator, hed_jitter: float) -> np.ndarray:
    out = np.empty_like(crops)
    for i, c in enumerate(crops):
        c = np.rot90(c, int(rng.integers(4)))
        if rng.random() < 0.5:
            c = c[:, ::-1]
        if hed_jitter > 0:
            c = hed_scale_shift(np.ascontiguousarray(c), 1 + rng.uniform(-hed_jitter, hed_jitter, 3),
                                rng.uniform(-hed_jitter, hed_jitter, 3))
        out[i] = c
    return out
