"""``calciscope fit-ood``: fit the out-of-distribution references (``model.ood``) of a checkpoint's networks (the tile
model and, beside it, the vessel segmenter and the vessel and calcium-artifact classifiers) from slides, through
``predict`` itself, and write them into their cards (``update_card``: the weights do not change).

Each slide runs through ``predict`` with every network tapped (``inference.ood.OODMonitor(collect=True)``), so the
features are exactly those ``predict`` checks later: the grid tiles' embeddings, the segmenter's windows, the
judged vessel crops. A network's reference is fit on the reference slides (the slides it was trained on) and
calibrated on the calibration slides (``calibration``, slides no network trained on; without them, a quarter of
the reference slides' patients are held out for it). The trainers fit the same reference from their own data
(``training.ood_reference``); this path adds one to networks trained before there was one, like the shipped demo.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np

from calciscope.errors import CalciscopeError
from calciscope.inference.ood import NETWORKS, OODMonitor, SlideFeatures
from calciscope.inference.predict import PredictConfig, Predictor
from calciscope.model.card import ModelCard
from calciscope.model.checkpoint import update_card
from calciscope.model.demo import demo_model_dir
from calciscope.model.ood import OODReference, fit_reference
from calciscope.model.ood_features import FEATURES, UNITS
from calciscope.model.segmenter import SegmenterCard
from calciscope.model.vessel_classifier import ClassifierCard
from calciscope.training.segmenter_data import split_patients
from calciscope.training.sources import read_manifest

Progress = Callable[[str], None]


def collect(predictor: Predictor, records: list, progress: Progress | None = None,
            what: str = "slides") -> list[SlideFeatures]:
    """Each slide of ``records`` (manifest rows) through ``predict`` with every network tapped: its features."""
    predictor.ood.close()
    predictor.ood = OODMonitor(predictor.tiles.backbone, predictor.card, predictor.vessel_stage, collect=True)
    out = []
    for n, record in enumerate(records, start=1):
        predictor.predict(record.path, slide_mpp=getattr(record, "mpp", None))
        out.append(predictor.ood.features)
        if progress is not None:
            progress(f"{what}: {record.slide_id} ({n}/{len(records)})")
    return out


def fit_references(train: list[SlideFeatures], val: list[SlideFeatures], val_ids: list[str], cards: dict,
                   fit_info: dict) -> dict[str, OODReference]:
    """A reference per network that ran on these slides: fit on ``train``'s features, calibrated on ``val``'s."""
    refs = {}
    for name in NETWORKS:
        rows = [f.rows.get(name) for f in train]
        if name not in cards or any(r is None for r in rows):
            continue
        val_rows = [f.rows[name] for f in val]
        groups = np.concatenate([[sid] * len(r) for sid, r in zip(val_ids, val_rows)]) if val_rows else None
        train_x = np.concatenate([r for r in rows if len(r)])
        val_x = np.concatenate([r for r in val_rows if len(r)]) if any(len(r) for r in val_rows) else np.zeros((0, 0))
        if len(train_x) < 2 or len(val_x) < 1:
            raise CalciscopeError(f"{name}: too few units to fit an OOD reference ({len(train_x)} reference and "
                                  f"{len(val_x)} calibration units)")
        card = cards[name][2]
        refs[name] = fit_reference(train_x, val_x, groups, unit=UNITS[card.KIND], features=FEATURES[card.KIND],
                                   fit_info=fit_info)
    return refs


def network_cards(predictor: Predictor) -> dict[str, tuple[type, Path, object]]:
    """network -> (card class, checkpoint folder, card) of every torch network ``predictor`` runs."""
    stage, cfg = predictor.vessel_stage, predictor.config
    out = {}
    if predictor.tiles.backbone is not None:
        out["tile_model"] = (ModelCard, predictor.model_path, predictor.card)
    if stage.segmenter is not None:
        seg = stage.segmenter_path
        out["segmenter"] = (SegmenterCard, seg, stage.segmenter[1])
        for name, spec, sub in (("vessel_classifier", cfg.vessel_classifier, "classifier"),
                                ("artifact_classifier", cfg.artifact_classifier, "artifact_classifier")):
            pair = getattr(stage, name)
            if pair is not None:
                out[name] = (ClassifierCard, seg / sub if spec == "auto" else Path(spec), pair[1])
    return out


def fit_ood(model: str | Path, data: Sequence[str | Path], calibration: Sequence[str | Path] = (), *,
            description: str = "", seed: int = 0, allow_demo: bool = False, networks: Sequence[str] = (),
            progress: Progress | None = None) -> dict[str, OODReference]:
    """Fit every network's OOD reference (or only those named in ``networks``) on the slides of ``data``
    (manifests), calibrate it on ``calibration`` (else on a quarter of ``data``'s patients, held out), and write it
    into the network's card; returns them."""
    predictor = Predictor(model, PredictConfig(workers=0, saliency="none", top_k=1))
    cards = network_cards(predictor)
    unknown = [n for n in networks if n not in cards]
    if unknown:
        raise CalciscopeError(f"--network {unknown[0]}: this model has {', '.join(cards)}")
    cards = {k: v for k, v in cards.items() if not networks or k in networks}
    if not allow_demo:
        demo = demo_model_dir().resolve()
        shipped = [str(p) for _, p, _ in cards.values() if Path(p).resolve().is_relative_to(demo)]
        if shipped:
            raise CalciscopeError(f"{shipped[0]}: fit-ood writes into the cards of the networks it fits; the shipped "
                                  f"demo's are refit with 'calciscope install-demo ood'")
    labels = list(predictor.labels)
    records = [r for m in data for r in read_manifest(Path(m), labels)]
    held = [r for m in calibration for r in read_manifest(Path(m), labels)]
    if not held:
        train_ids, val_ids = split_patients([SimpleNamespace(slide_id=r.slide_id, patient_id=r.patient_id)
                                             for r in records], 0.25, seed)
        records, held = [records[i] for i in train_ids], [records[i] for i in val_ids]
    if not records or not held:
        raise CalciscopeError("an OOD reference needs reference slides and calibration slides (of other patients)")
    train = collect(predictor, records, progress, "reference slides")
    val = collect(predictor, held, progress, "calibration slides")
    info = {"data": {"reference": _names(data), "calibration": _names(calibration) or "held-out patients of the "
                     "reference manifests", "reference_slides": len(records), "calibration_slides": len(held)},
            "description": description, "created": _dt.date.today().isoformat()}
    refs = fit_references(train, val, [r.slide_id for r in held], cards, info)
    for name, ref in refs.items():
        card_cls, folder, _ = cards[name]
        update_card(card_cls, folder, ood_reference=ref.to_dict())
    return refs


def _names(manifests: Sequence[str | Path]) -> list[str]:
    return [f"{Path(m).parent.name}/{Path(m).name}" for m in manifests]
