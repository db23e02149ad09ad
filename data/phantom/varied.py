"""One vessel drawn in the appearance its look says (style "random"): the classic wall, lumen and nuclei of
``vessels`` with calcium, thrombus and vasculitis from ``calcium``, ``thrombus`` and ``inflammation``, and the
vessel confounders (arteriolosclerosis: hyaline, hypertrophic, Moenckeberg-like; red-cell-packed venules).

The appearance of each finding is chosen per vessel by ``choose_looks`` (from the slide's look, on the look's
own random stream) and kept in ``Vessel.looks``, which the vessel GeoJSON writes as ``appearance``.
"""

from __future__ import annotations

import numpy as np

from calciscope.data.phantom.calcium import calcify, monckeberg_line
from calciscope.data.phantom.cells import annulus_points, points_in_poly, rbcs, spindles
from calciscope.data.phantom.geometry import TWO_PI, Vessel
from calciscope.data.phantom.inflammation import fibrinoid_wall, vasculitis
from calciscope.data.phantom.looks import pick
from calciscope.data.phantom.raster import Scene
from calciscope.data.phantom.thrombus import thrombus
from calciscope.data.phantom.vessels import MUSCULAR, _endothelium, _lumen, _wall, _wall_nuclei

CALCIUM = ("medial_calcification", "small_vessel_calcification")


def choose_looks(rng: np.random.Generator, v: Vessel, look: dict, mpp: float, *, calcified_slide: bool,
                 intimal_ok: bool) -> None:
    """Fill v.looks: the appearance of each finding of v, or of the confounder a normal vessel shows."""
    F = set(v.findings)
    for name in CALCIUM:
        if name in F:
            site = "mural" if name == "small_vessel_calcification" else (
                "intimal" if intimal_ok and v.kind != "capillary" and rng.random() < look["calcium_intimal_p"]
                else "medial")
            v.looks[name] = f"{pick(rng, look['calcium'])}/{site}"
            break  # a vessel with both shows the medial deposit only
    if "thrombosis" in F:
        v.looks["thrombosis"] = pick(rng, look["thrombus"])
    if "vasculitis" in F:
        v.looks["vasculitis"] = pick(rng, look["vasculitis"])
    if F:
        return
    if v.kind in MUSCULAR and not calcified_slide and 2 * v.ro * mpp >= 60 and rng.random() < look["monckeberg_p"]:
        v.looks["confounder"] = "monckeberg"
    elif v.kind in MUSCULAR and rng.random() < look["sclerosis_p"]:
        v.looks["confounder"] = pick(rng, look["arteriolosclerosis"], ("hyaline", "hypertrophic"))
    elif v.kind == "venule" and rng.random() < look["packed_p"]:
        v.looks["confounder"] = "packed"


def draw_vessel_varied(scene: Scene, rng, v: Vessel, emit: set[str], look: dict, *, fibroplasia=False) -> None:
    """Paint one vessel (outside in) in the appearances of v.looks; record lesion polygons (with appearance)."""
    px = scene.px
    F = set(v.findings)
    conf = v.looks.get("confounder")
    vas = v.looks.get("vasculitis")
    calc = next((v.looks[k] for k in CALCIUM if k in v.looks), None)
    if calc is not None and calc.endswith("/intimal") or "intimal_fibrosis" in F or (
            "small_vessel_calcification" in F and fibroplasia):
        fibroplasia = True
    if conf in ("hypertrophic", "monckeberg"):  # medial hypertrophy: the wall takes half the radius or more
        v.rl = max(min(v.rl, v.ro * rng.uniform(0.3, 0.5)), px(2.0))
    r_iel, r_me = _wall(scene, rng, v, conf == "hyaline", False)
    vas_sector = (rng.uniform(0, TWO_PI), TWO_PI if rng.random() < 0.6 else TWO_PI * rng.uniform(0.4, 1.0))
    if vas == "leukocytoclastic" and rng.random() < 0.6:
        fibrinoid_wall(scene, rng, v, look, vas_sector[0], vas_sector[1] * rng.uniform(0.3, 0.8))
    elif vas == "fibrinoid":
        fibrinoid_wall(scene, rng, v, look, 0.0, TWO_PI)
    lumen, shift = _lumen(scene, rng, v, F, emit, r_iel, fibroplasia)
    calc_arc = _calcium(scene, rng, v, look, calc, r_iel, r_me, shift) if calc else None
    if conf == "monckeberg":
        monckeberg_line(scene, rng, v, r_iel, look)
    if vas != "fibrinoid":
        _wall_nuclei(scene, rng, v, r_iel, r_me, calc_arc, conf == "hyaline")
        if conf in ("hypertrophic", "monckeberg"):  # layer upon layer of smooth muscle
            area = np.pi * (r_me**2 - r_iel**2) * v.aspect
            pts, th, _ = annulus_points(rng, v, r_iel + px(1.5), r_me - px(1.0), int(area / px(9.0) ** 2))
            spindles(scene, rng, pts[:, 0], pts[:, 1], v.tangent_deg(th) + rng.normal(0, 6, len(th)))
        _endothelium(scene, rng, v, shift)
    if "thrombosis" in F:
        thrombus(scene, rng, v, lumen, look, v.looks["thrombosis"])
    else:
        _red_cells(scene, rng, v, shift, look, packed=conf == "packed")
    if vas:
        vasculitis(scene, rng, v, look, vas, *vas_sector)


def _calcium(scene: Scene, rng, v: Vessel, look: dict, calc: str, r_iel, r_me, shift) -> tuple:
    """The calcified band of the chosen texture and site; sets v.calc_arc and records the lesion."""
    px = scene.px
    texture, site = calc.split("/")
    name = "medial_calcification" if "medial_calcification" in v.findings else "small_vessel_calcification"
    if site == "mural":
        r_in, r_out = v.rl + px(0.3), v.ro - px(1.0)
    elif site == "intimal":
        r_in = min(v.rl_eff + float(np.hypot(*shift)) + px(1.0), r_iel - px(1.5))
        r_out = r_iel - px(0.3)
    else:
        r_in, r_out = r_iel + px(0.5), r_me - rng.uniform(0, 0.35) * (r_me - r_iel)
    full = rng.random() < (0.45 if name == "medial_calcification" else 0.6)
    span = 0.95 * TWO_PI * (1.0 if full else rng.uniform(0.35, 1.0))
    th0, span, r_in, r_out = calcify(scene, rng, v, look, texture, rng.uniform(0, TWO_PI), span, r_in, r_out)
    v.calc_arc = (th0, span, r_in, r_out)
    pad = px(1.0) + (px(1.5) if texture == "plate" else 0.0)
    d = min(pad / max(r_out, 1.0), 0.02 * TWO_PI)
    band = v.ring(r_out + pad) if span >= TWO_PI - 1e-6 else \
        v.band(max(r_in - pad, 0.5), r_out + pad, th0 - d, th0 + span + d)
    scene.lesions.append((name, band, {"appearance": calc}))
    return v.calc_arc


def _red_cells(scene: Scene, rng, v: Vessel, shift, look: dict, packed: bool) -> None:
    """Red cells in the lumen; `packed`: crowded (70-110 % of the lumen area) but each cell still seen."""
    rbc_r = scene.px(3.7)
    value = (0.85 * look["rbc_value"], 1.1 * look["rbc_value"])
    if v.kind == "capillary":
        if v.rl > scene.px(2.2) and rng.random() < 0.6:
            c = np.array([v.cx, v.cy]) + shift
            r = min(v.rl, rbc_r)
            scene.ellipses("rbc", c[0], c[1], r, r * 0.9, 0, rng.uniform(*value))
        return
    if v.rl_eff <= rbc_r * 1.2:
        return
    frac = rng.uniform(0.7, 1.1) if packed else (rng.uniform(0.1, 0.6) if v.kind == "venule" else
                                                   rng.uniform(0.0, 0.25))
    n = int(frac * v.rl_eff**2 * v.aspect / rbc_r**2)
    pts = points_in_poly(rng, v.ring(v.rl_eff - rbc_r * 0.8) + shift, n)
    rbcs(scene, rng, pts[:, 0], pts[:, 1], value=value)
