"""``report.html``: one self-contained page per slide (images embedded, no network), for a pathologist.

The page is ``templates/report.html.j2``, rendered by jinja2 with autoescaping on: the functions here turn a
``SlideResult`` into plain values (numbers formatted, images as data URIs) and every value is HTML-escaped where the
template places it, so a slide name, label or model card text can never become markup. The one script is ours
(``templates/sort.js.j2``: click a vessel-table header to sort), and the page's Content-Security-Policy allows that
script alone (by its sha256), data-URI images and inline styles, so nothing injected could run or load anything.
"""

from __future__ import annotations

import base64
import hashlib
from functools import cache
from typing import Any

import cv2
import numpy as np
from jinja2 import Environment, PackageLoader, StrictUndefined

from calciscope._version import __version__
from calciscope.data.slides import safe_id
from calciscope.inference.ood import ood_section
from calciscope.inference.result import SlideResult, positive_findings
from calciscope.model.card import SYNTHETIC_DEMO_NOTICE
from calciscope.model.vessel_detection import COMPARTMENTS, SIZE_BANDS, VESSEL_POSITIVE, VesselRecord

QC_EXPLANATIONS = {
    "pen_marks": "ink on the slide; tiles under ink are left out, scores near ink deserve a second look",
    "folds_or_dark": "very dark areas (folds, thick sections, debris); they can mimic or hide calcium",
    "blur": "many tiles are out of focus; fine calcium and thrombus texture may be missed",
    "low_tissue": "little tissue; few vessels may have been seen",
    "out_of_distribution": "the slide is unlike the slides the model was trained on (see the banner at the top); "
                           "its scores are not reliable",
}
TERM_TEXT = {
    "calcification": "calcification (medial or small-vessel)",
    "occlusion": "thrombosis / occlusion",
    "no_exclusion": "absence of vasculitis",
}
COMPARTMENT_TEXT = {"fat": "subcutaneous fat", "dermis": "dermis", "unknown": "not placed"}
SALIENCY_TEXT = {"guided-gradcam": "guided Grad-CAM", "gradcam": "Grad-CAM", "ig": "integrated gradients"}


@cache
def _environment() -> Environment:
    # autoescape: every {{ value }} is HTML-escaped; StrictUndefined: a misspelt name fails instead of printing ""
    return Environment(loader=PackageLoader("calciscope.inference", "templates"), autoescape=True,
                       undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


def _csp(env: Environment) -> str:
    """No network, data-URI images, inline styles, and no script but ours (allowed by the sha256 of its text)."""
    script = env.get_template("sort.js.j2").render()
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    return f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{digest}'"


def render_report(result: SlideResult, images: dict[str, np.ndarray]) -> str:
    """The report as one HTML string; ``images`` maps output file names (as written) to RGB arrays."""
    thumbnail_uri = _data_uri(images["thumbnail.png"], jpeg=True)
    info, card = result.slide, result.card
    w, h = info.level_dimensions[0]
    facts = {
        "file": result.path.name, "sha256": result.sha256,
        "size": f"{w} × {h} px at {info.mpp:g} µm/px ({info.mpp_source}), {info.backend}"
                + (f", {info.vendor}" if info.vendor else ""),
        "tiles": f"{result.n_tiles} tiles of {card.tile_px} px at {card.mpp:g} µm/px",
        "run": f"{result.seconds:.1f} s, calciscope {__version__}, {result.created}",
    }
    heatmaps = [(label, _data_uri(images[f"heatmap_{safe_id(label)}.png"], jpeg=True)) for label in result.labels]
    env = _environment()
    return env.get_template("report.html.j2").render(
        csp=_csp(env), slide_id=result.slide_id, demo_notice=SYNTHETIC_DEMO_NOTICE if card.synthetic_demo else None,
        ood=ood_section(result.ood), cua=_cua(result), findings=_findings(result), qc=_qc(result), vessels=_vessels(result),
        vessel_positive=f"{VESSEL_POSITIVE:g}", thumbnail_uri=thumbnail_uri, heatmaps=heatmaps,
        top_tiles=_top_tiles(result, images), model=_model(result), facts=facts)


def _data_uri(rgb: np.ndarray, *, jpeg: bool) -> str:
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    if jpeg:
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 88])
        mime = "image/jpeg"
    else:
        ok, buf = cv2.imencode(".png", bgr)
        mime = "image/png"
    if not ok:
        raise ValueError("image encoding failed")
    return f"data:{mime};base64,{base64.b64encode(buf.tobytes()).decode('ascii')}"


def _fmt(p: float | None, digits: int = 3) -> str:
    return "n/a" if p is None else f"{p:.{digits}f}"


def _num(v: float | None, digits: int, *, pos: bool = False) -> dict[str, Any]:
    """A right-aligned number cell that sorts numerically on ``v`` (n/a: empty, sorts last)."""
    if v is None:
        return {"v": "", "text": "n/a", "pos": False}
    return {"v": f"{float(v):.6g}", "text": f"{v:.{digits}f}", "pos": pos}


def _findings(result: SlideResult) -> dict[str, Any]:
    rows = [{"label": label, "p": _fmt(result.probabilities[label]), "t": _fmt(result.thresholds[label]),
             "above": bool(result.decisions[label])} for label in result.labels]
    agg = result.aggregation
    how = ("attention-weighted pooling of tile embeddings (attention-MIL head)" if agg["method"] == "attention" else
           f"mean of the top {agg['k']} tile probabilities" if agg["method"] == "topk" else
           "highest tile probability" if agg["method"] == "max" else
           f"{agg['quantile']:.0%} quantile of tile probabilities")
    routes = [{"label": label, "vessels": _fmt(r["vessels"]), "grid": _fmt(r["grid"])}
              for label, r in result.routes.items()]
    return {"rows": rows, "by_classifier": bool((result.vessel_classifier or {}).get("slide_probabilities")),
            "how": how, "routes": routes}


def _cua(result: SlideResult) -> dict[str, Any]:
    cua = result.cua
    reason = str(cua.get("reason", ""))
    if cua.get("score") is None:
        return {"scored": False, "reason": reason}
    terms = [{"name": TERM_TEXT.get(term, term), "value": _fmt(info["value"]), "driver": info.get("driver") or "-",
              "inputs": ", ".join(f"{k} {_fmt(v)}" for k, v in info["inputs"].items()) or "none"}
             for term, info in cua["terms"].items()]
    return {"scored": True, "insufficient": cua.get("status") == "insufficient_sampling",
            "not_assessable": cua.get("status") == "not_assessable", "reason": reason,
            "score": _fmt(cua["score"]), "combine": "product" if cua["combine"] == "product" else "minimum",
            "terms": terms, "limiting": TERM_TEXT.get(cua["limiting_term"], cua["limiting_term"])}


def _qc(result: SlideResult) -> dict[str, Any]:
    flags = [(f, QC_EXPLANATIONS.get(f, "")) for f in result.qc.get("flags", [])]
    facts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in result.qc.items() if k != "flags" and v is not None)
    return {"flags": flags, "facts": facts}


def _band_text(lo: float, hi: float) -> str:
    return f"< {hi:g} µm" if lo == 0 else (f"≥ {lo:g} µm" if hi == float("inf") else f"{lo:g}–{hi:g} µm")


def _adequacy(adequacy: dict[str, Any]) -> dict[str, Any]:
    """Vessel counts per compartment and size band, and whether the small vessels of the fat were sampled enough."""
    counts = adequacy.get("by_compartment", {})
    compartments = list(COMPARTMENTS) + [c for c in counts if c not in COMPARTMENTS]
    rows = [(COMPARTMENT_TEXT.get(c, c), [int(counts.get(c, {}).get(name, 0)) for name, _, _ in SIZE_BANDS],
             sum(int(v) for v in counts.get(c, {}).values())) for c in compartments]
    return {
        "bands": [f"{name} ({_band_text(lo, hi)})" for name, lo, hi in SIZE_BANDS], "rows": rows,
        "totals": [sum(int(counts.get(c, {}).get(name, 0)) for c in compartments) for name, _, _ in SIZE_BANDS],
        "n": int(adequacy.get("n_vessels", 0)),
        "fat": sum(int(v) for v in counts.get("fat", {}).values()),
        "dermis": sum(int(v) for v in counts.get("dermis", {}).values()),
        "small": int(adequacy.get("small_fat_vessels", 0)), "need": int(adequacy.get("min_small_fat_vessels", 0)),
        "small_max_um": f"{float(adequacy.get('small_max_um', 100.0)):g}",
        "sufficient": adequacy.get("status") == "sufficient", "reason": str(adequacy.get("reason", "")),
        "not_assessable": adequacy.get("status") == "not_assessable",
        "unknown": int(adequacy.get("small_fat_vessels_out_of_distribution", 0)),
    }


def _overlay(result: SlideResult, positive: list[bool]) -> dict[str, Any]:
    """Every vessel outline (with its lumen as a hole) and calcium-artifact region, in thumbnail pixels, for SVG."""
    analysis = result.vessels
    th, tw = result.thumbnail.shape[:2]
    w0, h0 = result.slide.level_dimensions[0]
    scale = np.array([tw / w0, th / h0])

    def path(*rings: np.ndarray | None) -> str:
        parts = []
        for ring in rings:
            if ring is None or len(ring) < 3:
                continue
            # at thumbnail scale most outline points fall within a pixel: drop those 0.25 px off the line
            pts = cv2.approxPolyDP((np.asarray(ring, np.float64) * scale).astype(np.float32), 0.25, True)[:, 0]
            parts.append("M" + " L".join(f"{x:.1f},{y:.1f}" for x, y in pts) + " Z")
        return " ".join(parts)

    vessels = []
    for v, pos in zip(analysis.vessels, positive):
        found = ", ".join(positive_findings(v.probabilities)) or f"no finding ≥ {VESSEL_POSITIVE:g}"
        x, y = np.asarray(v.polygon, np.float64).max(axis=0) * scale
        vessels.append({"cls": "vpos" if pos else "vneg", "id": v.vessel_id, "d": path(v.polygon, v.lumen_polygon),
                        "title": f"vessel {v.vessel_id}: {v.compartment}, {v.size_band}, "
                                 f"{v.geometry.outer_diameter_um:.0f} µm; {found}",
                        "x": f"{x + 1:.1f}", "y": f"{y + 1:.1f}"})
    return {"width": tw, "height": th, "font": f"{max(8.0, tw / 80):.1f}", "vessels": vessels,
            "artifacts": [path(poly) for poly in analysis.artifact_polygons]}


def _vessel_row(v: VesselRecord, labels: list[str], pos: bool) -> dict[str, Any]:
    g = v.geometry
    probs = [_num(v.probabilities.get(label), 3, pos=v.probabilities.get(label, 0.0) >= VESSEL_POSITIVE)
             for label in labels]
    return {"cls": "vpos" if pos else "vneg", "id": v.vessel_id,
            "id_cell": {"v": v.vessel_id, "text": v.vessel_id, "pos": False},
            "compartment": COMPARTMENT_TEXT.get(v.compartment, v.compartment), "size_band": v.size_band,
            "cells": [_num(g.outer_diameter_um, 1), _num(g.lumen_diameter_um, 1), _num(g.wall_thickness_um, 1),
                      _num(g.area_um2, 0), *probs],
            "positive": ", ".join(positive_findings(v.probabilities)) or "-", "flags": ", ".join(v.flags) or "-",
            "tiles": {"v": v.n_tiles, "text": v.n_tiles, "pos": False}}


def _vessels(result: SlideResult) -> dict[str, Any] | None:
    """The Vessels section: adequacy, artifact QC, the outline overlay and the sortable per-vessel table."""
    analysis = result.vessels
    if analysis is None:
        return None
    positive = [bool(positive_findings(v.probabilities)) for v in analysis.vessels]
    qc = analysis.qc
    classifier = result.vessel_classifier or {}
    source = {"grid": "the tissue-grid tiles only (the per-vessel calls do not change them)",
              "vessels": ("the vessels' probabilities (their highest, per finding)" if classifier else
                          "the tiles centred on the detected vessels"),
              "both": "the tissue-grid tiles and the vessel tiles together"}.get(result.sampling, result.sampling)
    columns = [("id", "id"), ("compartment", "compartment"), ("size_band", "size band"), ("outer", "outer Ø µm"),
               ("lumen", "lumen Ø µm"), ("wall", "wall µm"), ("area", "area µm²"),
               *((f"p_{safe_id(label)}", f"p({label})") for label in result.labels), ("positive", "positive for"),
               ("flags", "flags"), ("tiles", "tiles")]
    return {
        "adequacy": _adequacy(analysis.adequacy),
        "qc": {"regions": int(qc.get("calcium_artifact_regions", 0)),
               "area_mm2": f"{float(qc.get('calcium_artifact_area_mm2', 0.0)):.4f}",
               "flagged": int(qc.get("vessels_near_calcium_artifact", 0)),
               "how": ("judged on each vessel by a classifier, or next to a region of the segmenter's artifact map"
                       if qc.get("calcium_artifact_judge") else "next to a region of the segmenter's artifact map")},
        "by_classifier": bool(classifier), "source": source, "columns": columns, "n_positive": sum(positive),
        "rows": [_vessel_row(v, result.labels, pos) for v, pos in zip(analysis.vessels, positive)],
        "overlay": _overlay(result, positive) if analysis.vessels else None,
    }


def _top_tiles(result: SlideResult, images: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per finding, its top tiles (the saliency overlay when written, else the tile) with a caption each."""
    what = "attention weight" if result.score_kind == "attention" else "tile probability"
    groups = []
    for label, tiles in result.top_tiles.items():
        figures = []
        for t in tiles:
            rgb = images.get(t.saliency_file) if t.saliency_file else None
            if rgb is None:
                rgb = result.top_tile_images.get((t.finding, t.rank))
            if rgb is None:
                continue
            peak = ("" if t.saliency_peak is None else
                    f"; saliency peak ({t.saliency_peak[0]:.0f}, {t.saliency_peak[1]:.0f})")
            caption = f"#{t.rank}: {what} {_fmt(t.score)} · level-0 x {t.x}, y {t.y}, {t.size} px{peak}"
            figures.append({"rank": t.rank, "uri": _data_uri(rgb, jpeg=False), "caption": caption})
        groups.append((label, figures))
    method = None if result.saliency_method == "none" else SALIENCY_TEXT[result.saliency_method]
    return {"method": method, "groups": groups}


def _model(result: SlideResult) -> dict[str, Any]:
    card = result.card
    held_out = card.metrics.get("held_out", {})
    level = held_out.get("slides") or held_out.get("examples") or {}
    description = card.training.get("description") or card.training.get("config", {}).get("description") or ""
    return {
        "name": card.name, "version": card.version, "runtime": result.runtime, "model_sha256": result.model_sha256,
        "weights_sha256": card.weights_sha256 or "not recorded",
        "architecture": f"{card.backbone} / {card.head} head, {card.tile_px} px tiles at {card.mpp:g} µm/px",
        "description": str(description), "intended_use": card.intended_use,
        "metrics": [(label, _fmt(m.get("auroc")), _fmt(m.get("ece")))
                    for label, m in level.get("per_label", {}).items()],
        "metrics_unit": "slides" if held_out.get("slides") else "tiles",
        "warnings": list(card.extra.get("warnings", [])),  # what training could not check (calibration ...)
    }
