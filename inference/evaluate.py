"""``calciscope evaluate``: a finished model's metrics on labelled data it never trained on.

Tiles and slides are scored the way training validated them (``training.train.evaluate_units``); with a vessel
classifier beside the model, the slide metrics are those of ``predict`` itself, and slides with vessel outlines add
the detection of the listed vessels and per-vessel metrics (``vessels``), with calcium-artifact QC where the
manifest has artifact annotations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from calciscope.data.vessels.match import ARTIFACT_TOUCH_UM, match_vessels, near_artifact, polygon_distance
from calciscope.data.vessels.truth import read_artifact_polygons, read_vessels
from calciscope.errors import CalciscopeError
from calciscope.inference.predict import PredictConfig, Predictor
from calciscope.io import write_json
from calciscope.model import load_card
from calciscope.model.cua import CUARule, cua_score
from calciscope.model.demo import demo_model_dir, resolve_model, resolve_segmenter
from calciscope.model.precision import choose_precision
from calciscope.training import metrics
from calciscope.training.config import AggregationConfig, DataConfig, OptimConfig, TrainConfig
from calciscope.training.data import load_data
from calciscope.training.sources import read_manifest
from calciscope.training.train import evaluate_units
from calciscope.training.train_segmenter import best_min_mean_probability, evaluate_segmenter, set_instance_setting


def evaluate_model(model_dir: str | Path, data_path: str | Path, out_dir: str | Path, *, workers: int = 0) -> dict:
    """``calciscope evaluate``: ``model_dir`` is a checkpoint or ``"demo"``; the model card fixes labels, tile size
    and mpp; ``data_path`` is a slide manifest (CSV with an ``annotations`` column) or tiles (a folder, or a CSV of
    tile paths)."""

    model_dir = resolve_model(model_dir)
    card = load_card(model_dir)
    data_path = Path(data_path)
    if not data_path.exists():
        raise CalciscopeError(f"{data_path}: no such data file or folder")
    header = data_path.read_text(encoding="utf-8", errors="replace").split("\n", 1)[0] if data_path.is_file() else ""
    is_manifest = "annotations" in header.split(",")
    source = "slide_labels" if card.head == "mil" else ("slides" if is_manifest else "tiles")
    aggregation = card.extra.get("aggregation", {})
    config = TrainConfig(
        out=str(out_dir),
        data=DataConfig(source=source, labels=list(card.labels), encoder=str(model_dir),
                        cache_dir=str(Path(out_dir) / "embeddings"),
                        manifest=str(data_path) if source != "tiles" else None,
                        tiles=str(data_path) if source == "tiles" else None,
                        mpp=card.mpp, tile_px=card.tile_px, stain_normalize=card.extra.get("stain_normalize") or False,
                        # the tiles it was trained on; vessel tiles from the manifest's annotated vessel outlines
                        sampling=str(card.extra.get("sampling", "grid")) if source == "slides" else "grid"),
        optim=OptimConfig(workers=workers, batch_size=64),
        aggregation=AggregationConfig(**aggregation) if aggregation else AggregationConfig(),
        cua_rule=card.cua_rule,
    )
    data = load_data(config)
    precision = choose_precision("auto", channels_last=True)
    report = evaluate_units(Path(model_dir), data, np.arange(len(data.groups)), config, precision, Path(out_dir))
    if source == "slides":
        report = _vessel_slides(model_dir, data_path, report, config, Path(out_dir))
    return report


def _vessel_slides(model_dir: Path, manifest: Path, report: dict, config: TrainConfig, out_dir: Path) -> dict:
    """With a vessel classifier beside the model (``predict`` then takes slide probabilities from the detected
    vessels), the slide metrics are those of ``predict`` itself on every slide of the manifest; the tile-aggregate
    ones move to ``slides_from_tiles``; slides with vessel outlines add ``vessels`` (detection of the listed vessels
    and per-vessel metrics of the matched ones; with calcium-artifact annotations, ``vessels.calcium_artifacts``, see
    ``_artifact_qc_metrics``). Without one, ``report`` is returned as it is."""

    predictor = Predictor(model_dir, PredictConfig(workers=0, saliency="none", top_k=0))
    if predictor.vessel_stage.vessel_classifier is None or predictor.sampling != "vessels":
        return report
    records = read_manifest(manifest, predictor.labels, need_labels=True)
    results = [predictor.predict(r.path) for r in records]
    y = np.stack([r.labels for r in records]).astype(int)
    probs = np.array([[res.probabilities[k] for k in predictor.labels] for res in results])
    slides = metrics.multilabel_metrics(y, probs, predictor.labels, thresholds=predictor.slide_thresholds())
    slides["n_slides"] = len(records)
    slides["source"] = "predict: highest vessel-classifier probability per finding, through its slide map"
    rule = CUARule.from_dict(config.cua_rule)
    if set(rule.labels) <= set(predictor.labels):
        truth = cua_score(y.astype(np.float64), rule, labels=predictor.labels)
        slides["cua_pattern"] = metrics.binary_metrics((truth > 0.5).astype(int),
                                                       np.array([res.cua["score"] for res in results]))
    report = {**report, "slides_from_tiles": report.get("slides"), "slides": slides}
    vessels = _listed_vessel_metrics(records, results, predictor.labels)
    if vessels is not None:
        report["vessels"] = vessels
    metrics.plot_reliability(y, probs, predictor.labels, out_dir / "reliability_slides.png", n_bins=10,
                             title="Reliability, slides (vessel classifier)")
    write_json(out_dir / "metrics.json", report)
    return report


def _listed_vessel_metrics(records, results, labels: list[str]) -> dict | None:
    """Detection (data.vessels.match: IoU ≥ 0.5, or a centroid within 4 µm under 20 µm; IoU-only recall beside) and
    per-vessel finding metrics of the vessels ``predict`` listed, against the slides' vessel outlines (None when no
    slide has outlines)."""

    y, p, n_true, n_found, n_pairs, n_iou = [], [], 0, 0, 0, 0
    matched = []  # (record, result, true vessels, matched pairs) per slide with outlines
    for record, result in zip(records, results):
        if record.vessels is None or result.vessels is None:
            continue
        truth, found = read_vessels(record.vessels), result.vessels.vessels
        m = match_vessels([v.polygon for v in found], [v.polygon for v in truth], result.slide.mpp)
        matched.append((record, result, truth, m.pairs))
        n_true, n_found, n_pairs = n_true + m.n_true, n_found + m.n_detected, n_pairs + len(m.pairs)
        n_iou += m.n_pairs_iou
        for d, t, _ in m.pairs:
            y.append([k in truth[t].findings for k in labels])
            p.append([found[d].probabilities[k] for k in labels])
    if not n_true:
        return None
    out = {"detection": {"vessels_true": n_true, "vessels_listed": n_found, "recall": n_pairs / n_true,
                         "precision": n_pairs / n_found if n_found else None, "count_error": (n_found - n_true) / n_true,
                         "recall_iou": n_iou / n_true}}
    if y:
        out["matched"] = metrics.multilabel_metrics(np.array(y, int), np.array(p), labels, thresholds=0.5)
    artifacts = _artifact_qc_metrics(matched)
    if artifacts is not None:
        out["calcium_artifacts"] = artifacts
    return out


def _artifact_qc_metrics(matched) -> dict | None:
    """The calcium-artifact QC of ``predict`` against the calcium_artifact regions of the slides' artifact annotations
    (the manifest's ``artifacts`` column or ``<slide>.artifacts.geojson``, as ``calciscope synth
    --calcium-artifacts`` writes them): regions found (an
    artifact region of the result overlaps them), and the matched vessels flagged, with and without a drawn region
    within ARTIFACT_TOUCH_UM (training's definition), with the per-vessel AUROC of the artifact probability.
    ``matched``: (record, result, true vessels, matched (listed, true, IoU) pairs) per slide with outlines. None when
    no slide has such a file."""

    drawn = found = 0
    touching, flagged, prob = [], [], []
    seen = False
    for record, result, truth, pairs in matched:
        if record.artifacts is None:
            continue
        seen = True
        regions, mpp = read_artifact_polygons(record.artifacts), result.slide.mpp
        drawn += len(regions)
        found += sum(any(polygon_distance(r, d) == 0 for d in result.vessels.artifact_polygons) for r in regions)
        listed = result.vessels.vessels
        for d, t, _ in pairs:
            touching.append(bool(regions) and near_artifact(truth[t].polygon, regions, mpp))
            flagged.append("calcium_artifact" in listed[d].flags)
            prob.append(listed[d].artifact_probability)
    if not seen:
        return None
    touching, flagged = np.array(touching, bool), np.array(flagged, bool)
    out = {"drawn": drawn, "found": found, "touch_um": ARTIFACT_TOUCH_UM,
           "matched_vessels_with": int(touching.sum()), "flagged_with": int(flagged[touching].sum()),
           "matched_vessels_without": int((~touching).sum()), "flagged_without": int(flagged[~touching].sum())}
    if 0 < touching.sum() < len(touching) and all(q is not None for q in prob):
        out["auroc"] = float(metrics.binary_metrics(touching.astype(int), np.array(prob, float))["auroc"])
    return out


def evaluate_vessels(segmenter: str | Path, manifest: str | Path, out_dir: str | Path,
                     min_mean_probabilities: list[float] | None = None, *, apply: bool = False,
                     progress: Callable[[str], None] | None = None) -> dict:
    """``calciscope evaluate-vessels``: detection figures of a segmenter (a folder or ``"demo"``) on slides with
    vessel outlines it never saw, at each instance filter asked for, written to ``out_dir/detection.json``. With
    ``apply``, the filter with the highest min(recall, precision) goes into the segmenter's card (``applied`` in the
    report says where); the shipped demo is refused."""
    if apply and str(segmenter) == "demo":
        raise CalciscopeError("--apply writes into the segmenter's card: copy the demo segmenter "
                              f"({demo_model_dir() / 'vessels'}) to a folder of your own and pass that")
    folder = resolve_segmenter(segmenter)
    report = evaluate_segmenter(folder, manifest, min_mean_probabilities, progress)
    if apply:
        best = best_min_mean_probability(report)
        card = set_instance_setting(folder, "min_mean_probability", best)
        report["applied"] = {"min_mean_probability": best, "card": str(card)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "detection.json", report)
    return report
