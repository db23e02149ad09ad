"""Validation of a vessel classifier, on exactly what inference sees (the segmenter's detections on the validation
slides, one crop each): per-vessel AUROC, AUPRC and ECE; it fits each output's temperature, each finding's threshold
(Youden), the vessel threshold (with a vessel output), the artifact flag threshold (with an artifact output) and the
slide-level map from the highest listed vessel probability to a slide probability (``fit_platt``), into the card."""

from __future__ import annotations

from typing import Callable

import numpy as np

from calciscope.model.aggregate import apply_slide_calibration
from calciscope.model.vessel_classifier import ARTIFACT, ClassifierCard, VesselClassifier, calibrated, classifier_logits
from calciscope.model.vessel_detection import VESSEL_POSITIVE
from calciscope.training import metrics
from calciscope.training.calibration import fit_platt, fit_temperature
from calciscope.training.classifier_data import VesselCrops

# a vessel threshold must beat the segmenter's own filter by this much min(recall, precision) on validation: the
# demo's first run chose 0.05 for +0.003 on its validation slides, and lost 0.07 precision on unseen phantoms
VESSEL_THRESHOLD_MARGIN = 0.01


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


def output_columns(card: ClassifierCard) -> list[int]:
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


def validate(model: VesselClassifier, card: ClassifierCard, val: list[VesselCrops], slide_y: np.ndarray,
             judge: bool, artifact_max_false_rate: float = 0.01) -> dict:
    """Fit ``card``'s temperatures, per-vessel thresholds, vessel threshold (with ``judge``), artifact threshold (with
    an artifact output) and slide map on the validation slides' detections (``val``, one entry per slide;
    ``slide_y`` their (S, L) labels) and return the validation metrics: per vessel, calcium artifacts, detection
    (with ``judge``) and per slide."""
    labels = card.labels
    vx = np.concatenate([d.crops for d in val])
    vy = np.concatenate([d.targets for d in val])[:, output_columns(card)]
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
