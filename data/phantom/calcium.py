"""Calcium in the several appearances it has on H&E (style "random"), in a vessel wall and along adipocytes.

Textures (looks.CALCIUM_TEXTURES), each drawn on the calcium canvas in a band of the wall (an arc between two
radii, in the media, the intima or the whole thin wall of a small vessel):

- ``stippled``: fine dust, granules 0.3-0.8 um across every 1-2 um, over a faint basophilic haze;
- ``granular``: granules 0.6-1.5 um with clumps of 1.5-3 um (the classic drawing);
- ``plate``: coarse plates 8-30 um long, broken by white fracture lines 0.8-2.5 um wide, fragments a little
  displaced, with hairline cracks inside;
- ``ring``: a continuous circumferential band 1.5-5 um thick of varying width, with granules along it;
- ``nodular``: irregular lumps 4-10 um across strung along the band, rimmed by fine granules.

Sizes scale with the slide's ``grain_um`` and darkness with ``calc_value`` (looks.draw_look).
Periadipocytic deposits (looks.PERIADIPOCYTIC): ``membrane`` (an arc along one cell, the classic drawing),
``beaded`` (granules 1.5-4 um strung along a whole membrane), ``lacy`` (a thin full ring around a few neighbours).
"""

from __future__ import annotations

import numpy as np

from calciscope.data.phantom.cells import granules
from calciscope.data.phantom.extravascular import calcified_membrane
from calciscope.data.phantom.geometry import TWO_PI, Vessel, stroke_outline
from calciscope.data.phantom.raster import Scene


def calcify(scene: Scene, rng, v: Vessel, look: dict, texture: str, th0: float, span: float, r_in: float,
            r_out: float) -> tuple[float, float, float, float]:
    """Draw `texture` in the band; returns the band actually covered (th0, span, r_in, r_out), px."""
    if texture == "ring":
        th0, span = rng.uniform(0, TWO_PI), TWO_PI
    {"stippled": _stippled, "granular": _granular, "plate": _plate, "ring": _ring,
     "nodular": _nodular}[texture](scene, rng, v, look, th0, span, r_in, r_out)
    return th0, span, r_in, r_out


def _band_points(rng, v: Vessel, th0, span, r_in, r_out, n: int, power: float = 1.0) -> np.ndarray:
    th = th0 + span * rng.random(n)
    r = r_in + (r_out - r_in) * rng.random(n) ** power
    return v.xy(r, th)


def _area(v: Vessel, span, r_in, r_out) -> float:
    return 0.5 * span * max(r_out**2 - r_in**2, 1.0) * v.aspect


def _stippled(scene: Scene, rng, v: Vessel, look, th0, span, r_in, r_out) -> None:
    px, g, val = scene.px, look["grain_um"], look["calc_value"]
    scene.fill("C", v.band(r_in, r_out, th0, th0 + span), 0.5 * val, 0.6, "mid")
    n = int(_area(v, span, r_in, r_out) / px(rng.uniform(1.0, 2.0) * g) ** 2)
    p = _band_points(rng, v, th0, span, r_in, r_out, n)
    granules(scene, rng, p[:, 0], p[:, 1], r_um=(0.25 * g, 0.55 * g), value=(1.8 * val, 3.0 * val))


def _granular(scene: Scene, rng, v: Vessel, look, th0, span, r_in, r_out) -> None:
    px, g, val = scene.px, look["grain_um"], look["calc_value"]
    n = int(_area(v, span, r_in, r_out) / px(1.9 * g) ** 2 * rng.uniform(0.8, 1.2))
    p = _band_points(rng, v, th0, span, r_in, r_out, n, power=1.3)
    granules(scene, rng, p[:, 0], p[:, 1], r_um=(0.3 * g, 0.75 * g), value=(2.0 * val, 3.2 * val))
    k = max(n // 12, 1)
    p = _band_points(rng, v, th0, span, r_in, r_out, k)
    granules(scene, rng, p[:, 0], p[:, 1], r_um=(0.75 * g, 1.5 * g), value=(1.8 * val, 2.6 * val))


def _ragged_band(rng, v: Vessel, a: float, b: float, r_in: float, r_out: float, jitter: float) -> np.ndarray:
    n = max(int((b - a) * r_out / 3.0), 4)
    th = np.linspace(a, b, n)
    hi = r_out + rng.normal(0, jitter, n)
    lo = np.minimum(r_in + rng.normal(0, jitter, n), hi - 1.0)
    return np.concatenate([v.xy(hi, th), v.xy(lo, th)[::-1]])


def _plate(scene: Scene, rng, v: Vessel, look, th0, span, r_in, r_out) -> None:
    """Fragments separated by fracture lines; a fragment may sit up to ~1.5 um off its place."""
    px, val = scene.px, look["calc_value"]
    r_mid = 0.5 * (r_in + r_out)
    t, end = th0, th0 + span
    crack = px(look["crack_um"]) * rng.uniform(0.7, 1.3)
    while t < end - 1e-3:
        d = min(px(rng.uniform(8, 30)) / max(r_mid, 1.0), end - t)
        gap = min(0.5 * crack / max(r_mid, 1.0), 0.3 * d)
        shift = px(rng.normal(0, 0.7))
        poly = _ragged_band(rng, v, t + gap, t + d - gap, r_in + shift, r_out + shift, px(0.3))
        scene.fill("C", poly, rng.uniform(2.4, 3.6) * val, 1.0, "mid")
        for _ in range(int(rng.integers(0, 3))):  # hairline cracks inside the fragment
            a = rng.uniform(t + gap, t + d - gap)
            scene.line("C", v.xy(np.array([r_in - 1, r_out + 1]), np.array([a, a + rng.normal(0, 0.15)])),
                       0.3 * val, px(0.6))
        if t > th0:  # the fracture line: tissue torn apart, pale
            line = v.xy(np.array([r_in - px(0.5), r_out + px(0.5)]), np.array([t, t]))
            scene.line("E", line, 0.05, crack)
            scene.line("H", line, 0.0, crack)
        t += d
    n = int(span * r_mid / px(4.0)) + 1
    p = _band_points(rng, v, th0, span, r_in - px(0.5), r_out + px(0.5), n)
    granules(scene, rng, p[:, 0], p[:, 1], r_um=(0.4, 1.0), value=(2.0 * val, 3.0 * val))


def _ring(scene: Scene, rng, v: Vessel, look, th0, span, r_in, r_out) -> None:
    """A closed band centred in [r_in, r_out], 1.5-5 um thick (at most the band), its width wavering ~35 %."""
    px, g, val = scene.px, look["grain_um"], look["calc_value"]
    w0 = min(px(rng.uniform(1.5, 5.0)), r_out - r_in)
    rc = r_in + w0 / 2 + rng.uniform(0, 1) * max(r_out - r_in - w0, 0)
    n = max(int(TWO_PI * rc / 2.0), 24)
    th = np.linspace(0, TWO_PI, n, endpoint=False)
    k = int(rng.integers(2, 7))
    w = w0 * (1 + 0.35 * np.sin(k * th + rng.uniform(0, TWO_PI))) / 2
    scene.fill("C", np.concatenate([v.xy(rc + w, th), v.xy(rc - w, th)[::-1]]), rng.uniform(2.2, 3.4) * val,
               0.8, "mid")
    m = int(TWO_PI * rc / px(3.0)) + 1
    p = _band_points(rng, v, 0.0, TWO_PI, rc - w0 / 2, rc + w0 / 2, m)
    granules(scene, rng, p[:, 0], p[:, 1], r_um=(0.3 * g, 0.8 * g), value=(2.2 * val, 3.2 * val))


def _nodular(scene: Scene, rng, v: Vessel, look, th0, span, r_in, r_out) -> None:
    px, g, val = scene.px, look["grain_um"], look["calc_value"]
    r_mid = 0.5 * (r_in + r_out)
    n = int(span * r_mid / px(rng.uniform(6, 14))) + 1
    th = th0 + span * rng.random(n)
    for t in th:
        c = v.xy(r_in + (r_out - r_in) * rng.uniform(0.2, 0.8), np.array([t]))[0]
        rad = min(px(rng.uniform(2.0, 5.0) * g), 0.6 * (r_out - r_in) + px(1.0))
        a = np.sort(rng.uniform(0, TWO_PI, int(rng.integers(7, 12))))
        rr = rad * rng.uniform(0.7, 1.3, len(a))
        scene.fill("C", c + np.stack([rr * np.cos(a), rr * np.sin(a) * v.aspect], 1), rng.uniform(2.3, 3.4) * val,
                   1.2, "mid")
        m = int(rng.integers(3, 9))
        q = c + rng.normal(0, rad, (m, 2))
        granules(scene, rng, q[:, 0], q[:, 1], r_um=(0.3 * g, 0.7 * g), value=(2.0 * val, 3.0 * val))


# ----------------------------------------------------------------------------------------------- periadipocytic
def periadipocytic(scene: Scene, rng, cells: list[np.ndarray], i: int, look: dict, kind: str) -> None:
    """Extravascular calcification around adipocyte `i` of `cells` (outlines, px); one lesion polygon per cell."""
    px, val = scene.px, look["calc_value"]
    cell = cells[i]
    if kind == "membrane":
        calcified_membrane(scene, rng, cell)
        scene.lesions[-1] = (*scene.lesions[-1], {"appearance": kind})
        return
    if kind == "beaded":
        ring = np.concatenate([cell, cell[:1]])
        seg = np.linalg.norm(np.diff(ring, axis=0), axis=1)
        s = np.concatenate([[0], np.cumsum(seg)])
        n = int(s[-1] / px(rng.uniform(3, 7))) + 3
        at = rng.uniform(0, s[-1], n)
        p = np.stack([np.interp(at, s, ring[:, 0]), np.interp(at, s, ring[:, 1])], 1)
        granules(scene, rng, p[:, 0], p[:, 1], r_um=(0.8, 2.0), value=(2.2 * val, 3.2 * val))
        scene.lesions.append(("extravascular_calcification", stroke_outline(ring, px(9)), {"appearance": kind}))
        return
    c = cell.mean(0)  # lacy: thin full rings around this cell and its nearest neighbours
    near = np.argsort([np.hypot(*(q.mean(0) - c)) for q in cells])[: int(rng.integers(2, 5))]
    for j in near:
        ring = np.concatenate([cells[j], cells[j][:1]])
        scene.line("C", ring, rng.uniform(1.8, 2.8) * val, px(rng.uniform(0.8, 1.5)), closed=True)
        scene.lesions.append(("extravascular_calcification", stroke_outline(ring, px(7)), {"appearance": kind}))


def monckeberg_line(scene: Scene, rng, v: Vessel, r_iel: float, look: dict) -> None:
    """Confounder (Moenckeberg-like medial calcinosis): a smooth thin line 1.2-2.5 um along the internal elastic
    lamina of a hypertrophic artery over half or more of its circumference; no granules, no intimal change."""
    px, val = scene.px, look["calc_value"]
    span = TWO_PI * rng.uniform(0.5, 1.0)
    th0 = rng.uniform(0, TWO_PI)
    n = max(int(span * r_iel / 2.0), 12)
    th = np.linspace(th0, th0 + span, n)
    r = r_iel + px(rng.uniform(0.6, 1.6)) + px(0.3) * np.sin(3 * th)
    scene.line("C", v.xy(r, th), rng.uniform(1.8, 2.8) * val, px(rng.uniform(1.2, 2.5)))
    if rng.random() < 0.4:  # a reduplicated lamina, fainter
        th2 = th[: int(n * rng.uniform(0.3, 0.8))]
        scene.line("C", v.xy(r[: len(th2)] + px(2.5), th2), 1.5 * val, px(1.0))
