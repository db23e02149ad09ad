"""``report.html``: one self-contained page per slide (images embedded, no network), for a pathologist.

Every string that came from a user or a file (slide name, label names, model card text) is HTML-escaped. The one
script is ours (``SORT_JS``: click a vessel-table header to sort), and the page's Content-Security-Policy allows that
script alone (by its sha256), data-URI images and inline styles, so nothing injected could run or load anything.
"""

from __future__ import annotations

import base64
import hashlib
from html import escape
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from calciscope._version import __version__
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
.warn{background:#fde8e8;border:2px solid #c62828;font-size:1.05rem} .ok{color:#2e7d32}
.score.dim{color:#999}
.overlay svg{display:block;width:100%;max-width:900px;height:auto}
.overlay path{fill:none;stroke-width:2;vector-effect:non-scaling-stroke}
.overlay path.vpos{stroke:#ff1744;fill:rgba(255,23,68,.15)} .overlay path.vneg{stroke:#00e676;fill:rgba(0,230,118,.08)}
.overlay path.artifact{stroke:#ffd600;stroke-dasharray:4 3;fill:rgba(255,214,0,.15)}
.overlay text{font-weight:700;paint-order:stroke;stroke:#000;stroke-width:2px;fill:#fff}
.scroll{max-height:640px;overflow:auto;border:1px solid #ddd;display:inline-block;max-width:100%}
table.sortable th{cursor:pointer;position:sticky;top:0;white-space:nowrap} table.sortable td{white-space:nowrap}
table.sortable th[aria-sort=ascending]::after{content:" \\25B2"}
table.sortable th[aria-sort=descending]::after{content:" \\25BC"}
table.sortable tr.vpos td:first-child{border-left:4px solid #ff1744}
"""
# Click a header of a table.sortable to sort by that column (again: reverse). Cells with data-v sort as numbers
# (an empty data-v, i.e. n/a, always last); other cells by their text. "#sort=<data-key>[:desc]" in the address
# sorts on load. Marks each table data-sortable="ready" once wired.
SORT_JS = """(function(){
function val(r,i){var c=r.cells[i],v=c.getAttribute('data-v');
if(v===null)return c.textContent.trim().toLowerCase();return v===''?null:parseFloat(v);}
function sortBy(t,i,desc){var b=t.tBodies[0],rows=Array.prototype.slice.call(b.rows);
rows.sort(function(r,s){var x=val(r,i),y=val(s,i);
if(x===null||y===null)return x===y?0:(x===null?1:-1);
var d=typeof x==='number'?x-y:(x<y?-1:(x>y?1:0));return desc?-d:d;});
rows.forEach(function(r){b.appendChild(r);});
var hs=t.tHead.rows[0].cells;for(var k=0;k<hs.length;k++)hs[k].removeAttribute('aria-sort');
hs[i].setAttribute('aria-sort',desc?'descending':'ascending');}
var ts=document.querySelectorAll('table.sortable');
Array.prototype.forEach.call(ts,function(t){var hs=t.tHead.rows[0].cells;
Array.prototype.forEach.call(hs,function(h,i){h.addEventListener('click',function(){
sortBy(t,i,h.getAttribute('aria-sort')==='ascending');});});t.setAttribute('data-sortable','ready');});
var m=/^#sort=([A-Za-z0-9._-]+)(:desc)?$/.exec(location.hash);
if(m)Array.prototype.forEach.call(ts,function(t){var hs=t.tHead.rows[0].cells;
for(var i=0;i<hs.length;i++)if(hs[i].getAttribute('data-key')===m[1])sortBy(t,i,!!m[2]);});
})();"""
CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
       f"script-src 'sha256-{base64.b64encode(hashlib.sha256(SORT_JS.encode('utf-8')).digest()).decode('ascii')}'")
COMPARTMENT_TEXT = {"fat": "subcutaneous fat", "dermis": "dermis", "unknown": "not placed"}


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
    classifier = result.vessel_classifier or {}
    if classifier.get("slide_probabilities"):
        return ("<table><tr><th>finding</th><th>slide probability</th><th>threshold</th><th>at the threshold</th></tr>"
                + "".join(rows) + "</table><p class='muted' id='slide-source'>Slide probability: the highest "
                "calibrated probability among the detected vessels (vessel classifier), through the classifier's "
                "slide calibration (fit on validation slides); thresholds from its card (0.5 unless it sets them). "
                "A slide with no vessel found scores low for every finding: see the vessel adequacy below.</p>")
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
    insufficient = cua.get("status") == "insufficient_sampling"
    warning = ""
    if insufficient:
        warning = ("<div class='notice warn' id='cua-insufficient'><b>Status: insufficient sampling</b> "
                   "(<code>insufficient_sampling</code>). "
                   f"{escape(str(cua.get('reason', '')))}. <b>The CUA pattern cannot be judged on this slide, and the "
                   "absence of vasculitis cannot be concluded from it</b>: too few small vessels of the subcutaneous "
                   "fat were seen (see Vessels). The score below is shown for reference only.</div>")
    combine = "product" if cua["combine"] == "product" else "minimum"
    rows = []
    for term, info in cua["terms"].items():
        driver = info.get("driver")
        inputs = ", ".join(f"{escape(k)} {_fmt(v)}" for k, v in info["inputs"].items()) or "none"
        rows.append(f"<tr><td>{escape(TERM_TEXT.get(term, term))}</td><td class='num'>{_fmt(info['value'])}</td>"
                    f"<td>{escape(driver or '-')}</td><td>{inputs}</td></tr>")
    limiting = TERM_TEXT.get(cua["limiting_term"], cua["limiting_term"])
    return (f"{warning}<p><span class='score{' dim' if insufficient else ''}'>{_fmt(cua['score'])}</span> "
            f"CUA-pattern score{' (not interpretable: insufficient sampling)' if insufficient else ''}</p>"
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


def _num_cell(v: float | None, digits: int) -> str:
    """A right-aligned number cell that sorts numerically (n/a sorts last)."""
    if v is None:
        return "<td class='num' data-v=''>n/a</td>"
    return f"<td class='num' data-v='{float(v):.6g}'>{v:.{digits}f}</td>"


def _adequacy_html(adequacy: dict[str, Any]) -> str:
    from calciscope.model.vessel_detection import COMPARTMENTS, SIZE_BANDS

    counts = adequacy.get("by_compartment", {})
    bands = [(name, lo, hi) for name, lo, hi in SIZE_BANDS]
    compartments = list(COMPARTMENTS) + [c for c in counts if c not in COMPARTMENTS]

    def band_text(lo: float, hi: float) -> str:
        return f"&lt; {hi:g} µm" if lo == 0 else (f"≥ {lo:g} µm" if hi == float("inf") else f"{lo:g}–{hi:g} µm")

    head = "".join(f"<th>{escape(name)} ({band_text(lo, hi)})</th>" for name, lo, hi in bands)
    rows = ""
    for c in compartments:
        row = counts.get(c, {})
        cells = "".join(f"<td class='num'>{int(row.get(name, 0))}</td>" for name, _, _ in bands)
        rows += (f"<tr><th>{escape(COMPARTMENT_TEXT.get(c, c))}</th>{cells}"
                 f"<td class='num'>{sum(int(v) for v in row.values())}</td></tr>")
    totals = "".join(f"<td class='num'>{sum(int(counts.get(c, {}).get(name, 0)) for c in compartments)}</td>"
                     for name, _, _ in bands)
    n = int(adequacy.get("n_vessels", 0))
    table = (f"<table id='vessel-counts'><tr><th>compartment</th>{head}<th>total</th></tr>{rows}"
             f"<tr><th>total</th>{totals}<td class='num'>{n}</td></tr></table>")
    small, need = int(adequacy.get("small_fat_vessels", 0)), int(adequacy.get("min_small_fat_vessels", 0))
    small_max = float(adequacy.get("small_max_um", 100.0))
    fat = sum(int(v) for v in counts.get("fat", {}).values())
    dermis = sum(int(v) for v in counts.get("dermis", {}).values())
    statement = (f"<p><b>{n}</b> vessel{'' if n == 1 else 's'} found: {fat} in subcutaneous fat, {dermis} in the "
                 f"dermis, {n - fat - dermis} not placed. Size band by outer diameter (the minor axis of the outline)."
                 f"</p>{table}<p>Small vessels (&lt; {small_max:g} µm) in subcutaneous fat: <b>{small}</b>; at least "
                 f"<b>{need}</b> are needed to judge the small vessels.</p>")
    if adequacy.get("status") == "sufficient":
        return statement + "<p class='ok' id='vessel-adequacy'>Sampling of small subcutaneous vessels: sufficient.</p>"
    return statement + ("<div class='notice warn' id='vessel-adequacy'><b>Insufficient sampling of small "
                        f"subcutaneous vessels.</b> {escape(str(adequacy.get('reason', '')))}. The CUA pattern cannot "
                        "be judged on this slide, and the absence of vasculitis cannot be concluded from it "
                        "(calciphylaxis affects the small vessels of the subcutaneous fat; a biopsy without them "
                        "cannot rule the pattern in or out). A deeper biopsy reaching the fat may help.</div>")


def _vessel_overlay(result: SlideResult, thumbnail_uri: str, positive: list[bool]) -> str:
    """The thumbnail with every vessel outline (with its lumen as a hole) and calcium-artifact region, as SVG."""
    from calciscope.inference.export import VESSEL_POSITIVE

    analysis = result.vessels
    th, tw = result.thumbnail.shape[:2]
    w0, h0 = result.slide.level_dimensions[0]
    scale = np.array([tw / w0, th / h0])

    def path(*rings: np.ndarray | None) -> str:
        parts = []
        for ring in rings:
            if ring is None or len(ring) < 3:
                continue
            pts = np.asarray(ring, np.float64) * scale
            parts.append("M" + " L".join(f"{x:.1f},{y:.1f}" for x, y in pts) + " Z")
        return " ".join(parts)

    font = max(8.0, tw / 80)
    shapes = []
    for k, poly in enumerate(analysis.artifact_polygons, 1):
        shapes.append(f"<path class='artifact' d='{path(poly)}'><title>calcium artifact {k}</title></path>")
    for v, pos in zip(analysis.vessels, positive):
        cls = "vpos" if pos else "vneg"
        found = ", ".join(escape(f) for f in _positive(v.probabilities)) or f"no finding ≥ {VESSEL_POSITIVE:g}"
        shapes.append(f"<path class='vessel {cls}' data-id='{v.vessel_id}' fill-rule='evenodd' "
                      f"d='{path(v.polygon, v.lumen_polygon)}'><title>vessel {v.vessel_id}: {escape(v.compartment)}, "
                      f"{escape(v.size_band)}, {v.geometry.outer_diameter_um:.0f} µm; {found}</title></path>")
        x, y = np.asarray(v.polygon, np.float64).max(axis=0) * scale
        shapes.append(f"<text x='{x + 1:.1f}' y='{y + 1:.1f}' font-size='{font:.1f}'>{v.vessel_id}</text>")
    return (f"<figure class='overlay'><svg id='vessel-overlay' viewBox='0 0 {tw} {th}' role='img' "
            f"aria-label='vessel outlines on the slide thumbnail'><image href='{thumbnail_uri}' x='0' y='0' "
            f"width='{tw}' height='{th}'/>{''.join(shapes)}</svg><figcaption>Vessel outlines on the slide thumbnail, "
            f"labelled with their id: <span class='pos'>red</span>, some finding ≥ {VESSEL_POSITIVE:g}; "
            "<span class='neg'>green</span>, none; dashed yellow: calcium-artifact regions (holes, tears, knife "
            "chatter). Hover for details.</figcaption></figure>")


def _positive(probabilities: dict[str, float]) -> list[str]:
    from calciscope.inference.export import positive_findings

    return positive_findings(probabilities)


def _vessels_section(result: SlideResult, thumbnail_uri: str) -> str:
    analysis = result.vessels
    if analysis is None:
        return "<p id='vessels-not-run'>Vessel analysis was not run for this slide (no vessel segmenter was used).</p>"
    from calciscope.inference.export import VESSEL_POSITIVE

    labels = result.labels
    positive = [bool(_positive(v.probabilities)) for v in analysis.vessels]
    qc = analysis.qc
    how = ("judged on each vessel by a classifier, or next to a region of the segmenter's artifact map"
           if qc.get("calcium_artifact_judge") else "next to a region of the segmenter's artifact map")
    qc_text = (f"<p class='muted'>Calcium-artifact QC (holes, tears, knife chatter): "
               f"{int(qc.get('calcium_artifact_regions', 0))} region(s), "
               f"{float(qc.get('calcium_artifact_area_mm2', 0.0)):.4f} mm²; "
               f"{int(qc.get('vessels_near_calcium_artifact', 0))} vessel(s) flagged <code>calcium_artifact</code> "
               f"({how}): calcium may have been lost there, so a negative call is weaker.</p>")
    classifier = result.vessel_classifier or {}
    source = {"grid": "the tissue-grid tiles only (the per-vessel calls do not change them)",
              "vessels": ("the vessels' probabilities (their highest, per finding)" if classifier else
                          "the tiles centred on the detected vessels"),
              "both": "the tissue-grid tiles and the vessel tiles together"}.get(result.sampling, result.sampling)
    how = ("Each vessel is judged by the vessel classifier on a crop centred on it and scaled to its size; its "
           "probabilities are calibrated per finding. Faint outlines the segmenter is less sure of are listed only "
           "when the classifier calls them vessels and finds a lesion in them (flag <code>faint_outline</code>)." if classifier else
           "Each vessel is scored on tiles centred on it; its probability for a finding is the highest calibrated "
           "tile probability.")
    intro = (f"<p class='muted'>{how} A vessel counts as positive for a finding at a probability ≥ "
             f"{VESSEL_POSITIVE:g} (a per-vessel call, not the slide thresholds above). The slide probabilities "
             f"come from {escape(source)}.</p>")
    if not analysis.vessels:
        return _adequacy_html(analysis.adequacy) + qc_text + "<p>No vessel was found.</p>"
    keys = [("id", "id"), ("compartment", "compartment"), ("size_band", "size band"), ("outer", "outer Ø µm"),
            ("lumen", "lumen Ø µm"), ("wall", "wall µm"), ("area", "area µm²"),
            *((f"p_{safe_id(label)}", f"p({label})") for label in labels), ("positive", "positive for"),
            ("flags", "flags"), ("tiles", "tiles")]
    head = "".join(f"<th data-key='{escape(k)}'>{escape(name)}</th>" for k, name in keys)
    rows = []
    for v, pos in zip(analysis.vessels, positive):
        g = v.geometry
        probs = "".join(
            (f"<td class='num{' pos' if v.probabilities[label] >= VESSEL_POSITIVE else ''}' "
             f"data-v='{v.probabilities[label]:.6g}'>{v.probabilities[label]:.3f}</td>")
            if label in v.probabilities else "<td class='num' data-v=''>n/a</td>" for label in labels)
        rows.append(f"<tr class='{'vpos' if pos else 'vneg'}' data-id='{v.vessel_id}'>"
                    f"<td class='num' data-v='{v.vessel_id}'>{v.vessel_id}</td>"
                    f"<td>{escape(COMPARTMENT_TEXT.get(v.compartment, v.compartment))}</td>"
                    f"<td>{escape(v.size_band)}</td>{_num_cell(g.outer_diameter_um, 1)}"
                    f"{_num_cell(g.lumen_diameter_um, 1)}{_num_cell(g.wall_thickness_um, 1)}"
                    f"{_num_cell(g.area_um2, 0)}{probs}<td>{escape(', '.join(_positive(v.probabilities))) or '-'}</td>"
                    f"<td>{escape(', '.join(v.flags)) or '-'}</td><td class='num' data-v='{v.n_tiles}'>{v.n_tiles}</td>"
                    "</tr>")
    n_pos = sum(positive)
    table = (f"<p>{n_pos} of {len(positive)} vessel(s) positive for at least one finding. Click a column header to "
             "sort. Outlines and measurements: vessels.geojson (QuPath) and vessels.csv.</p>"
             f"<div class='scroll'><table class='sortable' id='vessel-table'><thead><tr>{head}</tr></thead>"
             f"<tbody>{''.join(rows)}</tbody></table></div>")
    return (_adequacy_html(analysis.adequacy) + qc_text + intro + _vessel_overlay(result, thumbnail_uri, positive)
            + table)


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
    thumbnail_uri = _data_uri(images["thumbnail.png"], jpeg=True)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
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
<h2>Vessels</h2>
{_vessels_section(result, thumbnail_uri)}
<h2>Slide and heatmaps</h2>
<div class="grid"><figure class="heat"><img alt="slide thumbnail" src="{thumbnail_uri}">
<figcaption>slide thumbnail</figcaption></figure>{heatmaps}</div>
<h2>Most suspicious tiles</h2>
{_top_tiles_section(result, images)}
<h2>Model</h2>
{_model_section(result)}
<h2>Slide</h2>
<table>{fact_rows}</table>
</main><script>{SORT_JS}</script></body></html>
"""
