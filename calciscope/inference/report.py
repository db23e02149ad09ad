"""``report.html``: one self-contained page per slide (images embedded, no scripts, no network), for a pathologist.

Every string that came from a user or a file (slide name, label names, model card text) is HTML-escaped.
"""

from __future__ import annotations

import base64
from html import escape
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from calciscope import __version__
from calciscope.data.slides import safe_id
from calciscope.model.card import SYNTHETIC_DEMO_NOTICE

if TYPE_CHECKING:
    from calciscope.inference.predict import SlideResult

QC_EXPLANATIONS = {
    "pen_marks": "ink on the slide; tiles under ink are left out, scores near ink deserve a second look",
    "folds_or_dark": "very dark areas (folds, thick sections, debris); they can mimic or hide calcium",
    "blur": "many tiles are out of focus; fine calcium and thrombus texture may be missed",
    "low_tissue": "little tissue; few vessels may have been seen",
}
TERM_TEXT = {
    "calcification": "calcification (medial or small-vessel)",
    "occlusion": "thrombosis / occlusion",
    "no_exclusion": "absence of vasculitis",
}

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:1.5rem;margin:0 0 4px} h2{font-size:1.15rem;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.notice{background:#fff4e5;border:1px solid #f0b45c;border-radius:6px;padding:10px 14px;margin:14px 0}
.demo{background:#fde8e8;border-color:#e07b7b}
table{border-collapse:collapse;margin:6px 0;background:#fff} td,th{border:1px solid #ddd;padding:5px 10px;text-align:left}
th{background:#f0f0f3} td.num{text-align:right;font-variant-numeric:tabular-nums}
.pos{color:#b00020;font-weight:600} .neg{color:#2e7d32}
.score{font-size:2rem;font-weight:700} .muted{color:#666;font-size:.9rem}
.grid{display:flex;flex-wrap:wrap;gap:12px} figure{margin:0;background:#fff;border:1px solid #ddd;padding:6px}
figcaption{font-size:.85rem;color:#444;margin-top:4px;max-width:460px}
img{display:block;max-width:100%} .heat img{width:440px} .tile img{width:300px;image-rendering:pixelated}
"""


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


def _findings_table(result: SlideResult) -> str:
    rows = []
    for label in result.labels:
        p, t = result.probabilities[label], result.thresholds[label]
        decision = result.decisions[label]
        rows.append(f"<tr><td>{escape(label)}</td><td class='num'>{_fmt(p)}</td><td class='num'>{_fmt(t)}</td>"
                    f"<td class='{'pos' if decision else 'neg'}'>{'above threshold' if decision else 'below threshold'}"
                    f"</td></tr>")
    agg = result.aggregation
    how = ("attention-weighted pooling of tile embeddings (attention-MIL head)" if agg["method"] == "attention" else
           f"mean of the top {agg['k']} tile probabilities" if agg["method"] == "topk" else
           "highest tile probability" if agg["method"] == "max" else f"{agg['quantile']:.0%} quantile of tile probabilities")
    return ("<table><tr><th>finding</th><th>slide probability</th><th>threshold</th><th>at the model's threshold</th></tr>"
            + "".join(rows) + f"</table><p class='muted'>Slide probability: {escape(how)}, after per-finding "
            "temperature calibration. Thresholds come from the model card (chosen on validation data).</p>")


def _cua_section(result: SlideResult) -> str:
    cua = result.cua
    if cua.get("score") is None:
        return f"<p>Not scored: {escape(str(cua.get('reason', '')))}</p>"
    combine = "product" if cua["combine"] == "product" else "minimum"
    rows = []
    for term, info in cua["terms"].items():
        driver = info.get("driver")
        inputs = ", ".join(f"{escape(k)} {_fmt(v)}" for k, v in info["inputs"].items()) or "none"
        rows.append(f"<tr><td>{escape(TERM_TEXT.get(term, term))}</td><td class='num'>{_fmt(info['value'])}</td>"
                    f"<td>{escape(driver or '-')}</td><td>{inputs}</td></tr>")
    limiting = TERM_TEXT.get(cua["limiting_term"], cua["limiting_term"])
    return (f"<p><span class='score'>{_fmt(cua['score'])}</span> CUA-pattern score</p>"
            "<p>The rule: calcification (medial or small-vessel) <b>and</b> thrombosis/occlusion <b>and not</b> "
            f"vasculitis, combined as the {combine} of the three terms below (McMullen et al. 2019: calcium "
            "deposits plus thrombosis of subcutaneous small vessels). It summarises the finding probabilities; "
            "it is not a probability of calciphylaxis.</p>"
            "<table><tr><th>term</th><th>value</th><th>driven by</th><th>finding probabilities</th></tr>"
            + "".join(rows) + f"</table><p>The weakest term, which limits the score: <b>{escape(limiting)}</b>.</p>")


def _qc_section(result: SlideResult) -> str:
    flags = result.qc.get("flags", [])
    values = {k: v for k, v in result.qc.items() if k != "flags"}
    facts = ", ".join(f"{escape(k.replace('_', ' '))} {v}" for k, v in values.items() if v is not None)
    if not flags:
        return f"<p>No quality warnings.</p><p class='muted'>{facts}</p>"
    items = "".join(f"<li><b>{escape(f)}</b>: {escape(QC_EXPLANATIONS.get(f, ''))}</li>" for f in flags)
    return f"<div class='notice'><ul>{items}</ul></div><p class='muted'>{facts}</p>"


def _top_tiles_section(result: SlideResult, images: dict[str, np.ndarray]) -> str:
    parts = []
    what = "attention weight" if result.score_kind == "attention" else "tile probability"
    method = {"guided-gradcam": "guided Grad-CAM", "gradcam": "Grad-CAM", "ig": "integrated gradients", "none": "none"}[result.saliency_method]
    for label, tiles in result.top_tiles.items():
        figures = []
        for t in tiles:
            key = t.saliency_file
            rgb = images.get(key) if key else None
            if rgb is None:
                rgb = result.top_tile_images.get((t.finding, t.rank))
            if rgb is None:
                continue
            peak = "" if t.saliency_peak is None else f"; saliency peak ({t.saliency_peak[0]:.0f}, {t.saliency_peak[1]:.0f})"
            figures.append(f"<figure class='tile'><img alt='tile {t.rank} for {escape(label)}' "
                           f"src='{_data_uri(rgb, jpeg=False)}'><figcaption>#{t.rank}: {what} {_fmt(t.score)} · "
                           f"level-0 x {t.x}, y {t.y}, {t.size} px{peak}</figcaption></figure>")
        parts.append(f"<h3>{escape(label)}</h3><div class='grid'>{''.join(figures)}</div>")
    if result.saliency_method == "none":
        intro = "The tiles themselves (no saliency computed for this run)."
    else:
        intro = (f"Each pair: the tile, then the tile with its saliency ({escape(method)}; red = most influential) "
                 "and a cross at the peak.")
    return f"<p class='muted'>{intro} Coordinates are level-0 pixels (QuPath's).</p>" + "".join(parts)


def _model_section(result: SlideResult) -> str:
    card = result.card
    held_out = card.metrics.get("held_out", {})
    level = held_out.get("slides") or held_out.get("examples") or {}
    rows = "".join(f"<tr><td>{escape(label)}</td><td class='num'>{_fmt(m.get('auroc'))}</td>"
                   f"<td class='num'>{_fmt(m.get('ece'))}</td></tr>"
                   for label, m in level.get("per_label", {}).items())
    metrics = ""
    if rows:
        unit = "slides" if held_out.get("slides") else "tiles"
        metrics = (f"<p>Held-out evaluation ({unit} never used in training):</p><table><tr><th>finding</th>"
                   f"<th>AUROC</th><th>ECE</th></tr>{rows}</table>")
    description = card.training.get("description") or card.training.get("config", {}).get("description") or ""
    if result.runtime == "torch":
        hashes = f"<tr><th>weights sha256</th><td><code>{escape(result.model_sha256)}</code></td></tr>"
    else:  # an ONNX export: its own file, and the checkpoint it was exported from
        hashes = (f"<tr><th>runtime</th><td>{escape(result.runtime)} (ONNX export, fp32)</td></tr>"
                  f"<tr><th>ONNX file sha256</th><td><code>{escape(result.model_sha256)}</code></td></tr>"
                  f"<tr><th>weights sha256</th><td><code>{escape(card.weights_sha256 or 'not recorded')}</code>"
                  "</td></tr>")
    return (f"<table><tr><th>model</th><td>{escape(card.name)} {escape(card.version)}</td></tr>{hashes}"
            f"<tr><th>architecture</th><td>{escape(card.backbone)} / {escape(card.head)} head, {card.tile_px} px tiles "
            f"at {card.mpp:g} µm/px</td></tr>"
            f"<tr><th>trained on</th><td>{escape(str(description))}</td></tr>"
            f"<tr><th>intended use</th><td>{escape(card.intended_use)}</td></tr></table>{metrics}")


def render_report(result: SlideResult, images: dict[str, np.ndarray]) -> str:
    """The report as one HTML string; ``images`` maps output file names (as written) to RGB arrays."""
    demo = ""
    if result.card.synthetic_demo:
        demo = (f"<div class='notice demo'><b>Synthetic demo model</b> ({escape(SYNTHETIC_DEMO_NOTICE)}): trained "
                "on computer-drawn phantom slides only. Its scores mean nothing on real tissue.</div>")
    heatmaps = "".join(
        f"<figure class='heat'><img alt='heatmap {escape(label)}' "
        f"src='{_data_uri(images[f'heatmap_{safe_id(label)}.png'], jpeg=True)}'>"
        f"<figcaption>{escape(label)}; cyan squares: top tiles</figcaption></figure>"
        for label in result.labels)
    info = result.slide
    w, h = info.level_dimensions[0]
    facts: list[tuple[str, Any]] = [
        ("file", escape(result.path.name)),
        ("sha256", f"<code>{escape(result.sha256)}</code>"),
        ("size", f"{w} × {h} px at {info.mpp:g} µm/px ({escape(info.mpp_source)}), {escape(info.backend)}"
                 + (f", {escape(info.vendor)}" if info.vendor else "")),
        ("tiles scored", f"{result.n_tiles} tiles of {result.card.tile_px} px at {result.card.mpp:g} µm/px"),
        ("run", f"{result.seconds:.1f} s, calciscope {escape(__version__)}, {escape(result.created)}"),
    ]
    fact_rows = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>calciscope report: {escape(result.slide_id)}</title><style>{CSS}</style></head>
<body><main>
<h1>calciscope report: {escape(result.slide_id)}</h1>
<div class="notice"><b>Decision support, not a diagnosis.</b> These scores show where a model sees the histologic
pattern of calciphylaxis (calcification and thrombosis of small vessels without vasculitis). The diagnosis rests with
the pathologist and the clinical picture.</div>
{demo}
<h2>CUA-pattern score</h2>
{_cua_section(result)}
<h2>Findings</h2>
{_findings_table(result)}
<h2>Quality control</h2>
{_qc_section(result)}
<h2>Slide and heatmaps</h2>
<div class="grid"><figure class="heat"><img alt="slide thumbnail" src="{_data_uri(images['thumbnail.png'], jpeg=True)}">
<figcaption>slide thumbnail</figcaption></figure>{heatmaps}</div>
<h2>Most suspicious tiles</h2>
{_top_tiles_section(result, images)}
<h2>Model</h2>
{_model_section(result)}
<h2>Slide</h2>
<table>{fact_rows}</table>
</main></body></html>
"""
