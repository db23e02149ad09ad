"""Train the vessel classifier (``calciscope train-vessel-classifier --config vessel_classifier.yaml``).

Each manifest row names a slide with vessel outlines (the row's ``vessels`` column or ``<slide>.vessels.geojson``,
each outline's ``findings`` property its targets) and, for the slide-level map, the finding columns (when absent, a
slide has a finding when one of its vessels has it). Training vessels are the annotated outlines and, with a
``segmenter``, the vessels it detects, as ``predict`` will hand them over: a detection matched to an outline (IoU ≥
0.5) takes that vessel's findings; one overlapping no outline (IoU < 0.1) is a vessel with none (a lymphocytic
cuff or debris taken for a vessel must score low); the rest are left out. Detections include the faint outlines
(``candidate_min_mean_probability``) that inference shows the classifier too. Each training vessel gives ``copies``
crops with its scale and centre jittered; flips, rot90 and HED stain jitter are drawn per step.

With ``judge_artifacts``, a ``calcium_artifact`` output learns which vessels lost calcium in sectioning: a vessel is
positive when a ``calcium_artifact`` region of the slide's artifact annotations (the row's ``artifacts`` column or
``<slide>.artifacts.geojson``; a slide without the file has none) comes within ``ARTIFACT_TOUCH_UM`` of its outline.

Patients are split into train and validation. Validation judges exactly what inference sees (the segmenter's
detections, one crop each): per-vessel AUROC, AUPRC, ECE; it fits each finding's temperature and threshold
(Youden) and the slide-level map from the highest vessel probability to a slide probability (``fit_platt``).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch

from calciscope.data.slides import open_slide
from calciscope.data.synthetic import FINDINGS
from calciscope.data.tissue import TissueConfig, detect_tissue
from calciscope.data.vessels.match import iou_matrix, near_artifact
from calciscope.data.vessels.measure import shape_of
from calciscope.data.vessels.truth import read_vessels
from calciscope.errors import CalciscopeError
from calciscope.model.precision import check_device, resolve_device
from calciscope.model.vessel_classifier import (
    ARTIFACT,
    VESSEL,
    ClassifierCard,
    CropConfig,
    VesselClassifier,
    calibrated,
    classifier_logits,
    crop_geometry,
    read_crop,
    save_classifier,
    to_input,
    vessel_extras,
)
from calciscope.model.vessel_detection import VESSEL_POSITIVE
from calciscope.io import from_dict, read_yaml_mapping

# a vessel threshold must beat the segmenter's own filter by this much min(recall, precision) on validation: the
# demo's first run chose 0.05 for +0.003 on its validation slides, and lost 0.07 precision on unseen phantoms
VESSEL_THRESHOLD_MARGIN = 0.01
# a vessel is a calcium-artifact vessel when an annotated artifact region (hole, tear, chatter) comes this close


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
class _Vessels:
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


def _check(config: ClassifierTrainConfig) -> CropConfig:
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


def _slides(config: ClassifierTrainConfig):
    """Every manifest row as (key, patient, slide path, vessel outline path, slide labels or None, artifact
    annotation path or None); keys and patients carry the manifest's folder name, so two manifests written by
    ``synth`` do not collide."""
    from calciscope.training.sources import read_manifest

    rows = []
    for manifest in config.manifests:
        tag = Path(manifest).parent.name
        for r in read_manifest(manifest, config.labels):
            if r.vessels is None:
                raise CalciscopeError(f"{manifest}: no vessel outlines for {r.path.name} (a 'vessels' column or "
                                      f"{r.path.stem}.vessels.geojson beside the slide)")
            rows.append((f"{tag}/{r.slide_id}", f"{tag}/{r.patient_id}", r.path, r.vessels, r.labels, r.artifacts))
    return rows


def _extract(path: Path, outlines_path: Path, labels: list[str], crop: CropConfig, segmenter, copies: int,
             rng: np.random.Generator | None, config: ClassifierTrainConfig,
             artifacts_path: Path | None = None) -> tuple[_Vessels, np.ndarray]:
    """Crops of one slide: the outlines (training, i.e. with ``rng``; or without a segmenter) and the segmenter's
    detections labelled by their matched outline. Validation (no ``rng``) keeps the detections that overlap an
    outline without matching it too, flagged ``ambiguous`` (inference lists them; their findings are their
    outline's, and they are no vessel match). Every crop's calcium-artifact target is its own outline's, from the
    ``calcium_artifact`` regions of ``artifacts_path``. Returns them and the slide's labels as its outlines give
    them."""
    from calciscope.data.vessels.truth import read_artifact_polygons
    from calciscope.model.vessel_detection import VesselConfig, detect_vessels  # (imports torch-heavy modules late)

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
    out = _Vessels(np.stack(crops) if crops else np.zeros(shape, np.uint8),
                   np.stack(extras) if extras else np.zeros((0, 2), np.float32),
                   np.stack(targets) if targets else np.zeros((0, len(labels) + 2), np.float32),
                   np.array(candidate, bool), len(truth), np.array(unsure, bool))
    return out, truth_y[:, : len(labels)].max(axis=0) if len(truth_y) else np.zeros(len(labels), np.float32)


def _augment(crops: np.ndarray, rng: np.random.Generator, hed_jitter: float) -> np.ndarray:
    from calciscope.data.stain import hed_scale_shift

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


def _vessel_threshold(listed_at: Callable[[float | None], np.ndarray], is_vessel: np.ndarray,
                      n_outlines: int) -> tuple[float | None, dict]:
    """The vessel threshold whose listed outlines (``listed_at(threshold)``) match the annotated vessels with the
    highest min(recall, precision) on the validation slides (ties: the lower threshold), or None unless that beats
    the segmenter's own filter (``listed_at(None)``) by VESSEL_THRESHOLD_MARGIN; with the figures of both."""
    def figures(listed: np.ndarray) -> dict:
        hits = int((listed & (is_vessel > 0.5)).sum())
        return {"recall": hits / max(n_outlines, 1), "precision": hits / max(int(listed.sum()), 1),
                "listed": int(listed.sum())}

    def score(f: dict) -> float:
        return min(f["recall"], f["precision"])

    alone = figures(listed_at(None))
    grid = np.round(np.arange(0.05, 0.951, 0.05), 2)
    best_t, best = max(((float(t), figures(listed_at(float(t)))) for t in grid),
                       key=lambda item: (score(item[1]), -item[0]))
    if score(best) < score(alone) + VESSEL_THRESHOLD_MARGIN:
        return None, {"vessels": n_outlines, "vessel_threshold": None, **alone, "segmenter_alone": alone,
                      "best_vessel_threshold": {"vessel_threshold": best_t, **best}}
    return best_t, {"vessels": n_outlines, "vessel_threshold": best_t, **best, "segmenter_alone": alone}


def _listed(probs: np.ndarray, candidate: np.ndarray, n_labels: int, vessel_output: bool,
            vessel_threshold: float | None) -> np.ndarray:
    """Which validation outlines ``listed_vessels`` would list (the same rule, on arrays)."""
    lesion = (probs[:, :n_labels] >= VESSEL_POSITIVE).any(axis=1)
    p_vessel = probs[:, -1] if vessel_output else np.ones(len(probs))
    if vessel_threshold is None:
        return ~candidate | (candidate & lesion & (p_vessel >= VESSEL_POSITIVE))
    return (~candidate & (lesion | (p_vessel >= vessel_threshold))) | (candidate & (p_vessel >= vessel_threshold))


def _columns(card: ClassifierCard) -> list[int]:
    """The target columns (findings, calcium artifact, vessel) that ``card``'s outputs predict, in output order."""
    n = len(card.labels)
    return list(range(n)) + ([n] if card.artifact_output else []) + ([n + 1] if card.vessel_output else [])


def _artifact_threshold(probs: np.ndarray, y: np.ndarray, max_false_rate: float) -> tuple[float, dict]:
    """The lowest threshold from 0.5 (grid of 0.01) at which at most ``max_false_rate`` of the vessels without a
    calcium artifact are flagged, with the share of those with one that it flags (validation vessels)."""
    negatives, positives = probs[y < 0.5], probs[y >= 0.5]
    grid = np.round(np.arange(0.5, 1.0, 0.01), 2)
    ok = [t for t in grid if (negatives >= t).mean() <= max_false_rate] if len(negatives) else [0.5]
    t = float(ok[0]) if ok else float(grid[-1])
    return t, {"threshold": t, "max_false_rate": max_false_rate, "vessels_with": int(len(positives)),
               "flagged_with": float((positives >= t).mean()) if len(positives) else None,
               "vessels_without": int(len(negatives)),
               "flagged_without": float((negatives >= t).mean()) if len(negatives) else None}


def validate(model: VesselClassifier, card: ClassifierCard, val: list[_Vessels], slide_y: np.ndarray,
             judge: bool, artifact_max_false_rate: float = 0.01) -> dict:
    """Fit ``card``'s temperatures, per-vessel thresholds, vessel threshold (with ``judge``), artifact threshold (with
    an artifact output) and slide map on the validation slides' detections (``val``, one entry per slide;
    ``slide_y`` their (S, L) labels) and return the validation metrics: per vessel, calcium artifacts, detection
    (with ``judge``) and per slide."""
    from calciscope.model.aggregate import apply_slide_calibration
    from calciscope.training import metrics
    from calciscope.training.calibration import fit_platt, fit_temperature

    labels = card.labels
    vx = np.concatenate([d.crops for d in val])
    vy = np.concatenate([d.targets for d in val])[:, _columns(card)]
    logits = classifier_logits(model, card, vx, np.concatenate([d.extras for d in val]))
    sure = ~np.concatenate([d.ambiguous for d in val])  # per-vessel figures: detections with a clear target
    card.temperature = {k: float(t) for k, t in zip(card.outputs, fit_temperature(logits[sure], vy[sure]))}
    probs = calibrated(logits, card)
    card.thresholds = {k: (float(metrics.choose_threshold(vy[sure, j], probs[sure, j]))
                           if 0 < vy[sure, j].sum() < sure.sum() else 0.5) for j, k in enumerate(labels)}
    out = {"vessels": metrics.multilabel_metrics(vy[sure], probs[sure], card.outputs, thresholds=card.thresholds)}
    candidate = np.concatenate([d.candidate for d in val])
    if card.artifact_output:
        j = card.outputs.index(ARTIFACT)
        card.artifact_threshold, out["calcium_artifact"] = _artifact_threshold(probs[sure, j], vy[sure, j],
                                                                               artifact_max_false_rate)
    if judge:
        card.vessel_threshold, out["detection"] = _vessel_threshold(
            lambda t: _listed(probs, candidate, len(labels), True, t), vy[:, -1], sum(d.n_outlines for d in val))
    # a slide's score is its highest listed vessel, as at inference
    listed = _listed(probs, candidate, len(labels), card.vessel_output, card.vessel_threshold)
    slide_of = np.where(listed, np.repeat(np.arange(len(val)), [len(d.targets) for d in val]), -1)
    top = np.array([[probs[slide_of == s, j].max() if (slide_of == s).any() else 0.0 for j in range(len(labels))]
                    for s in range(len(val))])
    card.slide_calibration = {}
    for j, k in enumerate(labels):
        a, b = fit_platt(top[:, j], slide_y[:, j])
        card.slide_calibration[k] = {"a": a, "b": b}
    if labels:  # (an artifact-only classifier judges no finding)
        out["slides"] = metrics.multilabel_metrics(slide_y, apply_slide_calibration(top, card.slide_calibration,
                                                                                    labels), labels, thresholds=0.5)
        out["slides"]["n_slides"] = int(len(slide_y))
    return out


def train_classifier(config: ClassifierTrainConfig, progress: Callable[[str], None] | None = None) -> Path:
    """Train, validate, calibrate and save the classifier into ``config.out``; returns that folder."""
    from calciscope.model.demo import resolve_segmenter
    from calciscope.model.segmenter import for_inference, load_segmenter
    from calciscope.training.train_segmenter import _split

    crop = _check(config)
    labels = list(config.labels)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    device = resolve_device(config.device)
    segmenter = None
    if config.segmenter:
        model, seg_card = load_segmenter(resolve_segmenter(config.segmenter))
        segmenter = (for_inference(model).to(device), seg_card)
    rows = _slides(config)
    train_ids, val_ids = _split([SimpleNamespace(slide_id=k, patient_id=p) for k, p, *_ in rows],
                                config.val_fraction, config.seed)
    if not train_ids:
        raise CalciscopeError("no training slides left after the validation split")
    start = time.perf_counter()
    train, val, val_slide_y = [], [], []
    for n, (key, _, path, outlines, slide_y, artifacts) in enumerate(rows, start=1):
        is_val = n - 1 in val_ids
        data, from_outlines = _extract(path, outlines, labels, crop, segmenter, config.copies,
                                       None if is_val else rng, config, artifacts if config.judge_artifacts else None)
        if is_val:
            val.append(data)
            val_slide_y.append(slide_y if slide_y is not None else from_outlines)
        else:
            train.append(data)
        if progress is not None:
            progress(f"cut {len(data.targets)} vessel crops from {key} ({n}/{len(rows)})")
    judge = bool(config.judge_vessels and segmenter is not None)
    card = ClassifierCard(labels=labels, crop=dataclasses.asdict(crop), widths=list(config.widths),
                          hidden=config.hidden, synthetic_demo=config.synthetic_demo,
                          candidate_min_mean_probability=config.candidate_min_mean_probability if segmenter else None,
                          vessel_output=judge, artifact_output=config.judge_artifacts)
    x = np.concatenate([d.crops for d in train])
    e = np.concatenate([d.extras for d in train])
    y = np.ascontiguousarray(np.concatenate([d.targets for d in train])[:, _columns(card)])
    positives = y.sum(axis=0)
    missing = [k for k, p in zip(card.outputs, positives) if p == 0 and k != VESSEL]
    if missing:
        raise CalciscopeError(f"no training vessel has {', '.join(missing)}: the classifier cannot learn it"
                              + (" (judge_artifacts needs calcium_artifact regions in the slides' artifact "
                                 "annotations)" if ARTIFACT in missing else ""))
    if not val or not sum(len(d.targets) for d in val):
        raise CalciscopeError("no validation vessels: the classifier's temperatures and slide map are fit on "
                              "validation slides, so val_fraction must leave at least one patient with vessels")
    pos_weight = torch.tensor(np.minimum((len(y) - positives) / np.maximum(positives, 1), config.max_pos_weight),
                              dtype=torch.float32, device=device)

    model = VesselClassifier(len(card.outputs), tuple(config.widths), config.hidden, config.dropout)
    model = model.to(device, memory_format=torch.channels_last)
    steps = max(1, config.epochs * len(x) // config.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=steps, pct_start=0.1)
    losses, tick = [], time.perf_counter()
    model.train()
    for step in range(steps):
        idx = rng.integers(0, len(x), config.batch_size)
        logits = model(to_input(_augment(x[idx], rng, config.hed_jitter), card).to(device),
                       torch.from_numpy(e[idx]).to(device))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.from_numpy(y[idx]).to(device),
                                                                    pos_weight=pos_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if progress is not None and ((step + 1) % 100 == 0 or step + 1 == steps):
            rate = (step + 1) * config.batch_size / (time.perf_counter() - tick)
            progress(f"step {step + 1}/{steps} loss {np.mean(losses[-100:]):.4f} ({rate:.0f} crops/s)")
    model.eval()
    window = max(1, min(100, steps // 5))
    positive_crops = {k: int(p) for k, p in zip(card.outputs, positives)}
    report: dict = {"train_loss_start": float(np.mean(losses[:window])), "train_loss_end": float(np.mean(losses[-window:])),
                    "train_vessels": {"crops": int(len(y)), "positive_crops": positive_crops}}
    report["validation"] = validate(model, card, val, np.stack(val_slide_y), judge, config.artifact_max_false_rate)
    card.metrics = report
    card.training = {"description": config.description,
                     "manifests": [str(Path(m).parent.name) + "/" + Path(m).name for m in config.manifests],
                     "segmenter": config.segmenter,
                     "slides": {"train": [rows[i][0] for i in train_ids], "validation": [rows[i][0] for i in val_ids]},
                     "config": dataclasses.asdict(config) | {"manifests": [Path(m).name for m in config.manifests]},
                     "seconds": round(time.perf_counter() - start, 1)}
    return save_classifier(config.out, model.to(memory_format=torch.contiguous_format), card)
