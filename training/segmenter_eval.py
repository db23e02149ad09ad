"""How well a vessel segmenter finds vessels: detection recall and precision (IoU ≥ 0.5, or a centroid match for
small vessels), diameter and count error on slides with vessel outlines; ``evaluate_segmenter`` (``calciscope
evaluate-vessels``) tries several instance filters on one cut of the maps, and the chosen one goes into the card."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from calciscope.data.slides import open_slide
from calciscope.data.vessels.instances import InstanceConfig, scored_vessel_instances
from calciscope.data.vessels.match import match_vessels
from calciscope.errors import CalciscopeError
from calciscope.model.checkpoint import read_card, update_card
from calciscope.model.precision import resolve_device
from calciscope.model.segmenter import (
    CARD_FILE,
    SegmenterCard,
    VesselMaps,
    VesselUNet,
    for_inference,
    load_segmenter,
    segment_slide,
)
from calciscope.training.segmenter_data import SegmenterTrainConfig, SlideData, load_slides


def best_min_mean_probability(report: dict) -> float:
    """The evaluated ``min_mean_probability`` with the highest min(recall, precision) (ties: the smaller count
    error, then the lower value): balanced detection, which also keeps the vessel count close to the truth."""
    def key(item):
        value, m = item
        return (-min(m["recall"] or 0.0, m["precision"] or 0.0), abs(m["count_error"] or 0.0), float(value))

    return float(min(report["by_min_mean_probability"].items(), key=key)[0])


def set_instance_setting(segmenter: str | Path, name: str, value: float) -> Path:
    """Write one tuned InstanceConfig setting into a segmenter folder's card (the weights, and their sha256 in
    the card, stay as they are); returns the card's path."""
    if name not in InstanceConfig.__dataclass_fields__:
        raise CalciscopeError(f"{name!r} is not an instance setting ({', '.join(InstanceConfig.__dataclass_fields__)})")
    card = read_card(SegmenterCard, segmenter)  # update_card checks the folder loads before touching it
    update_card(SegmenterCard, segmenter, instance={**card.instance, name: value})
    return Path(segmenter) / CARD_FILE


def evaluate_detection(model: VesselUNet, card: SegmenterCard, slides: list[SlideData],
                       instance_config: InstanceConfig = InstanceConfig()) -> dict:
    """Recall, precision (IoU ≥ 0.5), median diameter error and count error over ``slides``, pooled."""
    return detection_metrics(_segmented(model, card, slides), instance_config)


def _segmented(model: VesselUNet, card: SegmenterCard, slides: list[SlideData],
               progress: Callable[[str], None] | None = None) -> list[tuple[SlideData, VesselMaps]]:
    out = []
    for n, s in enumerate(slides, start=1):
        with open_slide(s.path) as slide:
            out.append((s, segment_slide(slide, model, card)))
        if progress is not None:
            progress(f"segmented {s.slide_id} ({n}/{len(slides)})")
    return out


def detection_metrics(segmented: list[tuple[SlideData, VesselMaps]], instance_config: InstanceConfig) -> dict:
    """Pooled detection figures of already segmented slides (``(slide, maps)`` pairs), and per slide."""
    return _detection_figures(_scored(segmented, instance_config, instance_config.min_mean_probability),
                              instance_config.min_mean_probability)


def _scored(segmented: list[tuple[SlideData, VesselMaps]], instance_config: InstanceConfig, floor: float) -> list:
    """(slide, instance outlines, their mean probabilities) per segmented slide, instances from ``floor`` up."""
    return [(s, *scored_vessel_instances(maps.probability("vessel"), maps.probability("lumen"), maps.downsample,
                                         s.slide_mpp, instance_config, floor)) for s, maps in segmented]


def _detection_figures(scored: list, min_mean_probability: float) -> dict:
    n_det = n_true = n_pairs = 0
    errors, per_slide = [], []
    for s, outlines, means in scored:
        polys = [p for p, m in zip(outlines, means) if m >= min_mean_probability]
        result = match_vessels(polys, [v.polygon for v in s.vessels], s.slide_mpp)
        n_det, n_true, n_pairs = n_det + result.n_detected, n_true + result.n_true, n_pairs + len(result.pairs)
        errors += result.diameter_errors
        per_slide.append({"slide_id": s.slide_id, "vessels_true": result.n_true, "vessels_detected": result.n_detected,
                          "matched": len(result.pairs)})
    return {"slides": len(scored), "vessels_true": n_true, "vessels_detected": n_det,
            "recall": n_pairs / n_true if n_true else None, "precision": n_pairs / n_det if n_det else None,
            "median_diameter_error": float(np.median(errors)) if errors else None,
            "count_error": (n_det - n_true) / n_true if n_true else None, "per_slide": per_slide}


def evaluate_segmenter(segmenter: str | Path, manifest: str | Path, min_mean_probabilities: list[float] | None = None,
                       progress: Callable[[str], None] | None = None) -> dict:
    """``calciscope evaluate-vessels``: detection figures of a segmenter folder on a manifest of slides with vessel
    outlines it never trained on. Each slide is segmented once; vessel instances are then drawn at every
    ``min_mean_probability`` asked for (default: the card's), so that filter can be tuned on held-out data; put
    the chosen value in the card's ``instance`` settings."""
    model, card = load_segmenter(segmenter)
    model = for_inference(model).to(resolve_device())  # CUDA when there is one, like predict
    config = SegmenterTrainConfig(manifest=str(manifest), mpp=card.mpp, widths=list(card.widths))
    segmented = _segmented(model, card, load_slides(config, None, pixels=False), progress)
    base = card.instance_config()
    values = min_mean_probabilities or [base.min_mean_probability]
    scored = _scored(segmented, base, min(values))  # the instances do not depend on the value: cut them once
    return {"segmenter": str(segmenter), "manifest": str(manifest),
            "by_min_mean_probability": {f"{v:g}": _detection_figures(scored, v) for v in values}}
