"""One vessel cross-section painted outside in, with the lesions it carries: medial / small-vessel
calcification, intimal fibrosis, thrombus, vasculitis; and the lymphocytic cuff that mimics vasculitis.

Each function draws into a Scene and appends the ground-truth polygon of what it drew to scene.lesions.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from calciscope.data.phantom.cells import (
    annulus_points,
    granules,
    histiocytes,
    lymphocytes,
    neutrophils,
    nuclear_dust,
    points_in_poly,
    rbcs,
    spindles,
)
from calciscope.data.phantom.geometry import TWO_PI, Vessel, clip_halfplane
from calciscope.data.phantom.raster import Scene

MUSCULAR = ("arteriole", "small_artery")  # vessel kinds with a smooth-muscle media and an elastic lamina


def draw_vessel(scene: Scene, rng: np.random.Generator, v: Vessel, emit: set[str], *, hyaline=False,
                packed=False, fibroplasia=False) -> None:
    """Paint one vessel (outside in) with the lesions listed in v.findings; record lesion polygons.

    `emit` names the finding classes whose polygons go into the ground truth (the ones asked for);
    `fibroplasia` narrows the lumen with intimal fibrosis; `hyaline` and `packed` are normal-variant
    confounders (glassy arteriolosclerotic media; lumen packed with red cells, no fibrin).
    """
    F = set(v.findings)
    fibrinoid = "vasculitis" in F
    if "intimal_fibrosis" in F or "small_vessel_calcification" in F and fibroplasia:
        fibroplasia = True
    r_iel, r_me = _wall(scene, rng, v, hyaline, fibrinoid)
    lumen, shift = _lumen(scene, rng, v, F, emit, r_iel, fibroplasia)
    calc_arc = _calcification(scene, rng, v, F, r_iel, r_me)
    if not fibrinoid:  # fibrinoid necrosis leaves no nuclear detail in the wall
        _wall_nuclei(scene, rng, v, r_iel, r_me, calc_arc, hyaline)
        _endothelium(scene, rng, v, shift)
    if "thrombosis" in F:
        _thrombus(scene, rng, v, lumen)
    else:
        _red_cells(scene, rng, v, shift, packed)
    if fibrinoid:
        _vasculitis(scene, rng, v)


def _wall(scene: Scene, rng, v: Vessel, hyaline: bool, fibrinoid: bool) -> tuple[float, float]:
    """Stromal collar, retraction cleft, adventitia and media (or a thin wall), fibrinoid necrosis.

    Returns the radii (px) of the internal elastic lamina and of the media's outer edge.
    """
    px = scene.px
    muscular = v.kind in MUSCULAR
    w = v.ro - v.rl
    collar = v.ro + max(px(rng.uniform(4, 10)) if v.kind != "capillary" else px(2.5), v.cuff + px(3.0))
    if v.compartment == "fat":
        scene.fill("E", v.ring(collar), 0.5, 0.6, "coll")
        scene.fill("H", v.ring(collar), 0.14)
    if v.kind != "capillary" and rng.random() < 0.3:  # retraction cleft around the adventitia
        scene.fill("E", v.ring(v.ro + px(rng.uniform(1.0, 2.5))), 0.02)
        scene.fill("H", v.ring(v.ro + px(1.0)), 0.0)
    r_iel = v.rl + max(px(1.0), 0.06 * w)
    r_me = v.ro - 0.25 * w if muscular else v.ro
    if muscular:
        scene.fill("E", v.ring(v.ro), 0.72, 0.6, "coll")
        scene.fill("H", v.ring(v.ro), 0.10)
        media_e = 1.3 if hyaline else 1.0
        scene.fill("E", v.ring(r_me), media_e, 0.15 if hyaline else 0.45, "mid")
        scene.fill("H", v.ring(r_me), 0.16)
        th = np.linspace(0, TWO_PI, max(int(TWO_PI * r_iel / px(2.5)), 24), endpoint=False)
        scene.line("E", v.xy(r_iel + px(0.6) * np.sin(th * 7.3), th), 1.55, px(1.0), closed=True)
    else:
        scene.fill("E", v.ring(v.ro), 0.9, 0.4, "mid")
        scene.fill("H", v.ring(v.ro), 0.12)
    if fibrinoid:  # fibrinoid necrosis: bright pink smudgy wall, nuclear detail lost
        scene.fill("E", v.ring(v.ro), 1.75, 1.1, "mid")
        scene.fill("H", v.ring(v.ro), 0.22)
    return r_iel, r_me


def _lumen(scene: Scene, rng, v: Vessel, F: set[str], emit: set[str], r_iel: float,
           fibroplasia: bool) -> tuple[np.ndarray, np.ndarray]:
    """The lumen, possibly narrowed (eccentrically) by intimal fibrosis; sets v.rl_eff and v.lumen.

    Returns the lumen outline and its shift (px) off the vessel centre.
    """
    px = scene.px
    v.rl_eff = v.rl
    lumen = v.ring(v.rl)
    if fibroplasia and v.kind != "capillary":
        v.rl_eff = v.rl * rng.uniform(0.35, 0.7)
        scene.fill("E", v.ring(r_iel - px(0.5)), 0.5, 0.6, "coll")
        scene.fill("H", v.ring(r_iel - px(0.5)), 0.1)
        shift = (v.rl - v.rl_eff) * rng.uniform(0.2, 0.7) * np.array([math.cos(a := rng.uniform(0, TWO_PI)),
                                                                        math.sin(a)])
        lumen = v.ring(v.rl_eff) + shift
        ring_pts, th, _ = annulus_points(rng, v, v.rl_eff, r_iel, int(TWO_PI * r_iel / px(14)) + 1)
        spindles(scene, rng, ring_pts[:, 0], ring_pts[:, 1], v.tangent_deg(th), (1.1, 1.6))
        if "intimal_fibrosis" in F and "intimal_fibrosis" in emit:
            scene.lesions.append(("intimal_fibrosis", v.ring(r_iel + px(0.5))))
    else:
        shift = np.zeros(2)
    scene.fill("E", lumen, float(rng.uniform(0.0, 0.08)), 0.06, "mid")
    scene.fill("H", lumen, 0.0)
    v.lumen = lumen
    return lumen, shift


def _calcification(scene: Scene, rng, v: Vessel, F: set[str], r_iel: float,
                   r_me: float) -> tuple[float, float, float, float] | None:
    """Calcified arc (media of arterioles / arteries, whole wall of small vessels), if v has one; sets and
    returns v.calc_arc (th0, span in rad, r_in, r_out in px)."""
    px = scene.px
    calc_arc = None
    if "medial_calcification" in F or "small_vessel_calcification" in F:
        name = "medial_calcification" if "medial_calcification" in F else "small_vessel_calcification"
        full = rng.random() < (0.45 if name == "medial_calcification" else 0.6)
        span = 0.95 * TWO_PI * (1.0 if full else rng.uniform(0.35, 1.0))
        th0 = rng.uniform(0, TWO_PI)
        if name == "medial_calcification":
            r_in, r_out = r_iel + px(0.5), r_me - rng.uniform(0, 0.35) * (r_me - r_iel)
        else:
            r_in, r_out = v.rl + px(0.3), v.ro - px(1.0)
        calc_arc = v.calc_arc = (th0, span, r_in, r_out)
        _calcify(scene, rng, v, th0, span, r_in, r_out, plate=rng.random() < 0.5)
        pad = px(1.0)
        d = min(pad / max(r_out, 1.0), 0.02 * TWO_PI)
        scene.lesions.append((name, v.band(max(r_in - pad, 0.5), r_out + pad, th0 - d, th0 + span + d)))
    return calc_arc


def _wall_nuclei(scene: Scene, rng, v: Vessel, r_iel: float, r_me: float, calc_arc, hyaline: bool) -> None:
    """Smooth-muscle nuclei of the media (fewer in a calcified arc or a hyaline wall) and the adventitia's
    fibroblasts; a venule's scattered wall nuclei."""
    px = scene.px
    if v.kind in MUSCULAR:
        area = math.pi * (r_me**2 - r_iel**2) * v.aspect
        n = int(area / (px(8.0) * px(10.0)) * (0.4 if hyaline else 1.0))
        pts, th, _ = annulus_points(rng, v, r_iel + px(1.5), r_me - px(1.0), n)
        if calc_arc is not None:
            th0, span, _, _ = calc_arc
            inside = ((th - th0) % TWO_PI) < span
            sel = ~inside | (rng.random(len(th)) < 0.3)
            pts, th = pts[sel], th[sel]
        spindles(scene, rng, pts[:, 0], pts[:, 1], v.tangent_deg(th) + rng.normal(0, 8, len(th)))
        pts, th, _ = annulus_points(rng, v, r_me, v.ro, int(TWO_PI * v.ro / px(45)) + 1)
        spindles(scene, rng, pts[:, 0], pts[:, 1], v.tangent_deg(th), (1.2, 1.7))
    elif v.kind == "venule":
        pts, th, _ = annulus_points(rng, v, v.rl + px(0.5), v.ro, int(TWO_PI * v.ro / px(30)) + 1)
        spindles(scene, rng, pts[:, 0], pts[:, 1], v.tangent_deg(th))


def _endothelium(scene: Scene, rng, v: Vessel, shift: np.ndarray) -> None:
    """Flat endothelial nuclei lining the (possibly shifted) lumen; one or two in a capillary wall."""
    px = scene.px
    if v.kind == "capillary":
        th = rng.uniform(0, TWO_PI, rng.integers(1, 3))
        p = v.xy((v.ro + v.rl) / 2, th)
        scene.ellipses("nuc", p[:, 0], p[:, 1], px(3.2), px(1.2), v.tangent_deg(th), rng.uniform(1.6, 2.1))
    else:
        n = max(int(TWO_PI * v.rl_eff / px(rng.uniform(10, 18))), 2)
        th = rng.uniform(0, TWO_PI, n)
        p = v.xy(v.rl_eff + px(0.9), th) + shift
        scene.ellipses("nuc", p[:, 0], p[:, 1], px(rng.uniform(3.2, 4.5, n)), px(0.9),
                       v.tangent_deg(th), rng.uniform(1.5, 2.0, n))


def _red_cells(scene: Scene, rng, v: Vessel, shift: np.ndarray, packed: bool) -> None:
    """A few red cells in the lumen (more in a venule; `packed`: the lumen full of them)."""
    px = scene.px
    rbc_r = px(3.7)
    if v.kind == "capillary":
        lumen_c = np.array([v.cx, v.cy]) + shift
        if v.rl > px(2.2) and rng.random() < 0.5:
            scene.ellipses("rbc", lumen_c[0], lumen_c[1], min(v.rl, rbc_r), min(v.rl, rbc_r) * 0.9, 0, 1.9)
    elif v.rl_eff > rbc_r * 1.2:
        frac = 0.85 if packed else (rng.uniform(0.15, 0.6) if v.kind == "venule" else rng.uniform(0.0, 0.2))
        n = int(frac * v.rl_eff**2 * v.aspect / rbc_r**2)
        pts = points_in_poly(rng, v.ring(v.rl_eff - rbc_r * 0.8) + shift, n)
        rbcs(scene, rng, pts[:, 0], pts[:, 1])


def _calcify(scene: Scene, rng, v: Vessel, th0, span, r_in, r_out, plate: bool) -> None:
    """Basophilic deposits in an arc of the wall: stippled granules, or a plate with cracks."""
    px = scene.px
    area = 0.5 * span * (r_out**2 - r_in**2) * v.aspect
    if plate:
        band = v.band(r_in, r_out, th0, th0 + span)
        scene.fill("C", band, 2.3, 1.6, "mid")
        for t in rng.uniform(th0, th0 + span, int(span * r_out / px(25)) + 1):
            scene.line("C", v.xy(np.array([r_in - 1, r_out + 1]), np.array([t, t + rng.normal(0, 0.05)])),
                       0.2, px(0.8))
        n = int(area / px(6.0) ** 2)
    else:
        n = int(area / px(1.9) ** 2 * rng.uniform(0.8, 1.2))
    th = th0 + span * rng.random(n)
    r = r_in + (r_out - r_in) * rng.random(n) ** 1.3
    p = v.xy(r, th)
    granules(scene, rng, p[:, 0], p[:, 1], r_um=(0.6, 1.5))
    k = max(n // 12, 1)
    p = v.xy(r_in + (r_out - r_in) * rng.random(k), th0 + span * rng.random(k))
    granules(scene, rng, p[:, 0], p[:, 1], r_um=(1.5, 3.0), value=(1.8, 2.6))


def _thrombus(scene: Scene, rng, v: Vessel, lumen: np.ndarray) -> None:
    """Pink fibrin filling (or partly filling) the lumen, red cells in layers, a few leukocytes."""
    px = scene.px
    c = lumen.mean(0)
    poly = c + (lumen - c) * (0.9 if rng.random() < 0.35 else 1.0)  # retraction gap sometimes
    if rng.random() < 0.4:  # mural, non-occlusive
        nrm = np.array([math.cos(a := rng.uniform(0, TWO_PI)), math.sin(a)])
        proj = poly @ nrm
        cut = proj.min() + (1 - rng.uniform(0.5, 0.85)) * (proj.max() - proj.min())
        poly = clip_halfplane(poly, nrm, cut)
    if len(poly) < 3:
        return
    scene.fill("E", poly, 1.2, 1.2, "coll")
    scene.fill("H", poly, 0.1)
    area = cv2.contourArea(poly.astype(np.float32))
    rbc_r = px(3.7)
    pts = points_in_poly(rng, poly, int(area / rbc_r**2 * 0.45))
    if len(pts):
        lam = px(rng.uniform(10, 22))
        d = pts @ np.array([math.cos(b := rng.uniform(0, math.pi)), math.sin(b)])
        keep = rng.random(len(pts)) < np.where(np.sin(TWO_PI * d / lam) > 0.3, 0.85, 0.08)
        rbcs(scene, rng, pts[keep, 0], pts[keep, 1])
    pts = points_in_poly(rng, poly, int(area / px(30.0) ** 2) + 1)
    neutrophils(scene, rng, pts[:, 0], pts[:, 1])
    scene.lesions.append(("thrombosis", poly))


def _vasculitis(scene: Scene, rng, v: Vessel) -> None:
    """Neutrophils, nuclear dust and lymphocytes in and around the wall; extravasated red cells."""
    px = scene.px
    v.cuff = v.cuff or px(rng.uniform(12, 28))
    r1 = v.ro + v.cuff
    area = math.pi * (r1**2 - v.rl**2) * v.aspect
    n = int(area / px(9.0) ** 2 * rng.uniform(0.5, 0.8))
    p, _, _ = annulus_points(rng, v, v.rl, r1, n, power=1.6)
    neutrophils(scene, rng, p[:, 0], p[:, 1])
    p, _, _ = annulus_points(rng, v, v.rl, r1, n // 3, power=1.4)
    lymphocytes(scene, rng, p[:, 0], p[:, 1])
    p, _, _ = annulus_points(rng, v, v.rl, r1, int(n * 1.5), power=1.3)
    nuclear_dust(scene, rng, p[:, 0], p[:, 1])
    p, _, _ = annulus_points(rng, v, v.ro + px(2), r1, n // 3 + 2)
    rbcs(scene, rng, p[:, 0], p[:, 1])
    scene.lesions.append(("vasculitis", v.ring(r1 + px(2.0))))


def lymphocytic_cuff(scene: Scene, rng, v: Vessel) -> np.ndarray:
    """Confounder: perivascular lymphocytes OUTSIDE an intact wall. Returns the cuff outline."""
    px = scene.px
    v.cuff = v.cuff or px(rng.uniform(10, 30))
    r0, r1 = v.ro + px(3.0), v.ro + v.cuff
    n = int(math.pi * (r1**2 - r0**2) * v.aspect / px(10.0) ** 2 * rng.uniform(0.4, 0.8))
    p, _, _ = annulus_points(rng, v, r0, r1, n, power=1.5)
    lymphocytes(scene, rng, p[:, 0], p[:, 1])
    p, _, _ = annulus_points(rng, v, r0, r1, n // 8 + 1)
    histiocytes(scene, rng, p[:, 0], p[:, 1])
    return v.ring(r1 + px(2.0))

