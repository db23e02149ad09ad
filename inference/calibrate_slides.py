"""``calciscope calibrate-slides``: refit a vessel classifier's slide map on labelled slides it never saw.

With a vessel classifier, a slide's probability of a finding is its highest listed vessel's probability through a
Platt map (the classifier card's ``slide_calibration``: p = sigmoid(a · logit(top) + b)).
``train-vessel-classifier`` fits that map on its validation slides, which are few (16 for the demo) and hold the
vessels its temperatures and thresholds were also chosen on; a map fit on so few slides is flat, so slides with a
clear lesion come out near 0.5. This refits the map on any labelled slide manifest: ``predict`` runs on every slide
(the same segmenter, listing and classifier as in use), each finding's highest listed-vessel probability is taken,
and :func:`calciscope.training.calibration.fit_platt` fits the map per finding. The map is monotone, so per-finding
slide AUROC does not change; the probabilities, their calibration and the CUA-pattern score (a product of them) do.

``grid_route`` findings get a second input: the tile model's own slide probability over the grid tiles (its card's
aggregation and slide map), fit jointly (``fit_platt_with_grid``) so that a finding on a vessel the segmenter never
outlined still reaches the slide. It is meant for the exclusion finding, vasculitis: an inflamed venule inside an
infiltrate is often not outlined, and "without vasculitis" must not depend on an outline. Such a map changes the
finding's slide AUROC (two inputs, not one), and its figures say by how much.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Callable

import numpy as np

from calciscope.errors import CalciscopeError
from calciscope.inference.predict import PredictConfig, Predictor
from calciscope.model.aggregate import apply_slide_calibration, slide_probabilities
from calciscope.model.checkpoint import update_card
from calciscope.model.demo import demo_model_dir
from calciscope.model.vessel_classifier import ClassifierCard, load_classifier
from calciscope.training.calibration import fit_platt, fit_platt_with_grid
from calciscope.training.metrics import binary_metrics
from calciscope.training.sources import read_manifest


def slide_tops(model: str | Path, classifier: str | Path, manifests: Sequence[str | Path],
               progress: Callable[[str], None] | None = None) -> tuple[list[str], list[str], np.ndarray, np.ndarray,
                                                                       np.ndarray]:
    """(labels, slide ids, (S, L) highest listed-vessel probability per finding, (S, L) labels, (S, L) the tile
    model's grid-tile slide probabilities) of ``predict`` with ``classifier`` judging the vessels on every slide of
    ``manifests`` (a slide without listed vessels: 0)."""
    predictor = Predictor(model, PredictConfig(workers=0, saliency="none", top_k=0, vessel_classifier=str(classifier)))
    if predictor.vessel_stage.vessel_classifier is None or predictor.sampling != "vessels":
        raise CalciscopeError(f"{model}: predict does not take slide probabilities from the vessel classifier "
                              f"{classifier} with this model (no segmenter, or another sampling)")
    labels = list(predictor.labels)
    records = [r for m in manifests for r in read_manifest(Path(m), labels, need_labels=True)]
    tops, grids = [], []
    for n, record in enumerate(records, start=1):
        result = predictor.predict(record.path)
        found = result.vessels.vessels
        probs = np.array([[v.probabilities[k] for k in labels] for v in found], np.float64).reshape(-1, len(labels))
        tops.append(probs.max(axis=0) if len(probs) else np.zeros(len(labels)))
        grids.append(slide_probabilities(result.tile_probs, predictor.card))
        if progress is not None:
            progress(f"scored {record.slide_id} ({n}/{len(records)})")
    return (labels, [r.slide_id for r in records], np.array(tops), np.array([r.labels for r in records], np.float64),
            np.array(grids, np.float64))


def calibrate_slides(model: str | Path, classifier: str | Path, manifests: Sequence[str | Path],
                     progress: Callable[[str], None] | None = None, prior_sd: float = 3.0,
                     grid_route: Sequence[str] = ()) -> dict:
    """Refit ``classifier``'s slide map on the slides of ``manifests`` (see the module docstring) and write it into
    the classifier's card, with what it was fit on under ``metrics["slide_calibration"]``; returns that record. Per
    finding it holds the map and the expected calibration error and Brier score of the slide probabilities on these
    slides under the old map and the new one (fit on them: an in-sample figure; judge the map on other slides). A
    finding whose slides are all positive or all negative has nothing to fit and keeps its map (``kept_previous_map``)."""
    folder = Path(classifier)
    if folder.resolve().is_relative_to(demo_model_dir().resolve()):
        raise CalciscopeError(f"{folder}: calibrate-slides writes into the classifier's card; copy the shipped one "
                              f"({folder}) to a folder of your own and pass that")
    _, card = load_classifier(folder)
    unknown = sorted(set(grid_route) - set(card.labels))
    if unknown:
        raise CalciscopeError(f"--grid-route {', '.join(unknown)}: not a finding of {folder} "
                              f"({', '.join(card.labels)})")
    labels, slide_ids, top, y, grid = slide_tops(model, folder, manifests, progress)
    if len(slide_ids) < 2:
        raise CalciscopeError(f"{', '.join(map(str, manifests))}: {len(slide_ids)} slide(s); a slide map needs "
                              f"labelled slides of both kinds")
    old = apply_slide_calibration(top, card.slide_calibration, labels, grid)
    new_map, kept = {}, []
    for j, k in enumerate(labels):
        if 0 < y[:, j].sum() < len(y) and k in grid_route:
            a, g, b = fit_platt_with_grid(top[:, j], grid[:, j], y[:, j], prior_sd=prior_sd)
            new_map[k] = {"a": a, "b": b, "grid": g}
        elif 0 < y[:, j].sum() < len(y):
            a, b = fit_platt(top[:, j], y[:, j], prior_sd=prior_sd)
            new_map[k] = {"a": a, "b": b}
        elif card.slide_calibration.get(k):  # one kind of slide only: nothing to fit, the old map stays
            new_map[k] = dict(card.slide_calibration[k])
            kept.append(k)
    new = apply_slide_calibration(top, new_map, labels, grid)
    per_label = {}
    for j, k in enumerate(labels):
        before, after = binary_metrics(y[:, j], old[:, j]), binary_metrics(y[:, j], new[:, j])
        per_label[k] = {"positives": int(y[:, j].sum()), "kept_previous_map": k in kept, **new_map.get(k, {}),
                        "ece_before": before["ece"], "ece_after": after["ece"],
                        "brier_before": before["brier"], "brier_after": after["brier"],
                        "auroc_before": before["auroc"], "auroc_after": after["auroc"]}
    record = {"data": [f"{Path(m).parent.name}/{Path(m).name}" for m in manifests], "n_slides": len(slide_ids),
              "model": str(model), "prior_sd": prior_sd,
              "previous_map": {k: card.slide_calibration.get(k) for k in labels}, "per_label": per_label}
    update_card(ClassifierCard, folder, slide_calibration={**card.slide_calibration, **new_map},
                metrics={**card.metrics, "slide_calibration": record})
    return record
