"""``calciscope fit-vessel-head``: fit the vessel head (calciscope.model.vessel_head) of a tile model on annotated slides.

Every slide of the manifest goes through vessel analysis exactly as ``predict`` runs it (segmenter, instances,
measurement, compartments, vessel tiles through the tile model); each detected vessel is matched to the annotated
outlines (``<slide>.vessels.geojson`` or the manifest's ``vessels`` column) at IoU ≥ 0.5 and takes that vessel's
``findings`` as its targets; a detection without a match is a vessel with no finding. Use slides the tile model
never trained on: its scores on its own training slides are overconfident. The head goes into the checkpoint's
card (``extra.vessel_head``, with grouped cross-validated per-vessel AUROC in its ``metrics``); the weights are
untouched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from calciscope.data.slides import open_slide
from calciscope.data.tissue import TissueConfig, detect_tissue
from calciscope.data.vessels.match import match_vessels
from calciscope.data.vessels.truth import read_vessels
from calciscope.errors import CalciscopeError
from calciscope.inference.predict import PredictConfig, Predictor
from calciscope.inference.vessels import analyze_vessels, features_of
from calciscope.model.card import ModelCard
from calciscope.model.checkpoint import CARD_FILE, update_card
from calciscope.model.vessel_head import VesselHead, fit_vessel_head
from calciscope.training.calibration import fit_platt
from calciscope.training.sources import read_manifest


def collect(model: str | Path, manifest: str | Path, vessels: str = "auto",
            progress: Callable[[int, int], None] | None = None):
    """(features, 0/1 targets, patient of each vessel, slide of each vessel, (S, L) slide labels or None, labels)
    over every detected vessel of the manifest's slides."""
    # the head is fit on tile-model scores: no vessel classifier (it would take their place)
    predictor = Predictor(model, PredictConfig(workers=0, saliency="none", top_k=0, vessels=vessels,
                                               vessel_classifier="none"))
    if predictor.vessel_stage.segmenter is None:
        raise CalciscopeError(f"{model}: no vessel segmenter (put one in the model folder's vessels/ or pass --vessels)")
    labels = predictor.labels
    records = read_manifest(manifest, labels)
    seg, seg_card = predictor.vessel_stage.segmenter
    feats, targets, groups, slide_of = [], [], [], []
    for n, record in enumerate(records, start=1):
        if record.vessels is None:
            raise CalciscopeError(f"{record.path}: no vessel outlines (a 'vessels' column or "
                                  f"{record.path.stem}.vessels.geojson beside the slide)")
        truth = read_vessels(record.vessels)
        with open_slide(record.path) as slide:
            analysis = analyze_vessels(slide, detect_tissue(slide, TissueConfig()), seg, seg_card,
                                       lambda t: predictor.score_tiles(torch.from_numpy(t)), predictor.tiling,
                                       labels, predictor.vessel_stage.vessel_config)
            mpp = slide.mpp
        found = analysis.vessels
        y = np.zeros((len(found), len(labels)), np.int64)
        for d, t, _ in match_vessels([v.polygon for v in found], [v.polygon for v in truth], mpp).pairs:
            y[d] = [k in truth[t].findings for k in labels]
        if found:
            feats.append(features_of(found, labels))
            targets.append(y)
            groups += [record.patient_id] * len(found)
            slide_of += [n - 1] * len(found)
        if progress is not None:
            progress(n, len(records))
    if not feats:
        raise CalciscopeError(f"{manifest}: no vessel was detected on any slide")
    slide_labels = (np.stack([r.labels for r in records]) if all(r.labels is not None for r in records) else None)
    return np.vstack(feats), np.vstack(targets), np.asarray(groups), np.asarray(slide_of), slide_labels, labels


def fit_into_card(model_dir: str | Path, manifest: str | Path, vessels: str = "auto",
                  progress: Callable[[int, int], None] | None = None) -> VesselHead:
    """Fit the head on ``manifest`` and store it in ``model_dir``'s card; returns it."""
    model_dir = Path(model_dir)
    if not (model_dir / CARD_FILE).is_file():
        raise CalciscopeError(f"{model_dir}: not a checkpoint folder (no {CARD_FILE}); fit-vessel-head writes into it")
    card = ModelCard.from_json(model_dir / CARD_FILE)
    extra = {k: v for k, v in card.extra.items() if k != "vessel_head"}
    update_card(ModelCard, model_dir, extra=extra)  # collect the tile scores without the head it replaces
    x, y, groups, slide_of, slide_labels, labels = collect(model_dir, manifest, vessels, progress)
    head = fit_vessel_head(x, y, labels, groups)
    if slide_labels is not None:  # slide level: highest vessel probability → slide probability (Platt)

        probs = head.predict(x)
        top = np.zeros(slide_labels.shape)
        for s in range(len(slide_labels)):
            if (slide_of == s).any():
                top[s] = probs[slide_of == s].max(axis=0)
        for j, label in enumerate(labels):
            if len(np.unique(slide_labels[:, j])) == 2:
                a, b = fit_platt(top[:, j], slide_labels[:, j])
                head.slide_calibration[label] = {"a": float(a), "b": float(b)}
    head.metrics["data"] = Path(manifest).name
    update_card(ModelCard, model_dir, extra={**extra, "vessel_head": head.to_dict()})
    return head
