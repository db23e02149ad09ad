"""The phantom's canvas and renderer: a Scene of vector operations in level-0 px, rasterised strip by strip.

Rendering by strips (rows) keeps level 0 out of memory; each strip is drawn with a margin of extra rows so
blurs leave no seams. Canvases (optical density per pixel, in stain units where real tissue's median is ~0.7):
``H`` / ``E`` background haematoxylin / eosin, ``N`` nuclei (added to H, suppresses E), ``C`` calcium
(basophilic deposits, added to H), ``P`` pen ink density, ``D`` fold (double thickness) weight.

Sectioning artifacts of calcium (``Scene.cuts``: knife holes and tears, chatter) act after the canvases are
combined and blurred, on the final stain densities, and only inside their polygons: a cut zeroes both stains
(bare glass), chatter multiplies them by a banded factor that is exactly 1 outside its patch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from calciscope.data.phantom.fields import LR_DS, MR_DS, upsample_rows
from calciscope.data.phantom.geometry import TWO_PI, Vessel
from calciscope.data.phantom.stain import RESID_OD

SHIFT = 2  # cv2 sub-pixel bits: coordinates are drawn at 1/4 px


@dataclass
class Op:
    kind: str  # "fill" | "line"
    canvas: str
    polys: list[np.ndarray]
    value: float
    slope: float = 0.0  # value + slope * (texture - 0.5) when a texture source is named
    src: str | None = None  # "coll" | "mid" | None
    thickness: int = 1
    closed: bool = False
    y0: float = 0.0
    y1: float = 0.0


# Ellipse batches, drawn after the ordered ops, in this order; columns cx, cy, a, b, angle_deg, value.
BATCHES = (("E", "cyto"), ("E", "rbc"), ("E", "rbc_core"), ("N", "nuc"), ("C", "calc"))


class Scene:
    """Vector description of one phantom slide: fields, ordered ops, ellipse batches, ground truth."""

    def __init__(self, size: int, mpp: float):
        self.size, self.mpp = size, mpp
        self.ops: list[Op] = []
        self.batches: dict[str, list[np.ndarray]] = {name: [] for _, name in BATCHES}
        self.vessels: list[Vessel] = []
        self.lesions: list[tuple[str, np.ndarray]] = []
        self.artifacts: list[tuple[str, np.ndarray]] = []
        self.blurs: list[tuple[float, float, float, float, float]] = []  # cx, cy, rx, ry, sigma_px
        self.border: tuple[int, int] | None = None  # side (0 top, 1 right, 2 bottom, 3 left), width px
        self.margin = 32
        self.cuts: list[tuple[str, np.ndarray, dict]] = []  # ("gap" | "chatter", polygon px, parameters)
        self.calcium_artifacts: list[tuple[str, int, np.ndarray]] = []  # kind, vessel id, polygon px

    def px(self, um: float | np.ndarray) -> float | np.ndarray:
        return um / self.mpp

    def fill(self, canvas: str, polys, value: float, slope: float = 0.0, src: str | None = None) -> None:
        polys = [np.asarray(p, np.float64) for p in (polys if isinstance(polys, list) else [polys])]
        polys = [p for p in polys if len(p) >= 3]
        if polys:
            ys = np.concatenate([p[:, 1] for p in polys])
            self.ops.append(Op("fill", canvas, polys, value, slope, src, y0=ys.min(), y1=ys.max()))

    def line(self, canvas: str, pts, value: float, thickness: float, closed=False, slope=0.0, src=None) -> None:
        pts = np.asarray(pts, np.float64)
        t = max(int(round(thickness)), 1)
        self.ops.append(
            Op("line", canvas, [pts], value, slope, src, t, closed, pts[:, 1].min() - t, pts[:, 1].max() + t)
        )

    def ellipses(self, batch: str, cx, cy, a, b, angle_deg, value) -> None:
        cols = np.broadcast_arrays(*(np.asarray(v, np.float64) for v in (cx, cy, a, b, angle_deg, value)))
        arr = np.stack([c.reshape(-1) for c in cols], 1)
        if len(arr):
            self.batches[batch].append(arr)

    def finalize(self) -> None:
        """Sort every ellipse batch by y so a strip finds its rows with searchsorted."""
        self._sorted = {}
        for _, name in BATCHES:
            arr = np.concatenate(self.batches[name]) if self.batches[name] else np.zeros((0, 6))
            arr = arr[np.argsort(arr[:, 1], kind="stable")]
            reach = float(np.max(arr[:, 2:4])) + 2 if len(arr) else 0.0
            self._sorted[name] = (arr, reach)


# ----------------------------------------------------------------------------------------------- rendering
def _mask_for(op: Op, ya: int, h: int, w: int) -> tuple[slice, slice, np.ndarray] | None:
    allpts = np.concatenate(op.polys)
    pad = op.thickness + 2
    x0 = max(int(allpts[:, 0].min()) - pad, 0)
    x1 = min(int(allpts[:, 0].max()) + pad + 1, w)
    r0 = max(int(allpts[:, 1].min()) - pad - ya, 0)
    r1 = min(int(allpts[:, 1].max()) + pad + 1 - ya, h)
    if x1 <= x0 or r1 <= r0:
        return None
    mask = np.zeros((r1 - r0, x1 - x0), np.uint8)
    pts = [np.round((p - (x0, ya + r0)) * (1 << SHIFT)).astype(np.int32) for p in op.polys]
    if op.kind == "fill":
        cv2.fillPoly(mask, pts, 1, cv2.LINE_8, SHIFT)
    else:
        cv2.polylines(mask, pts, op.closed, 1, op.thickness, cv2.LINE_8, SHIFT)
    return slice(r0, r1), slice(x0, x1), mask.view(bool)


def _apply_op(op: Op, canvases: dict, tex: dict, ya: int, h: int, w: int) -> None:
    canvas = canvases[op.canvas]
    if op.src is None:
        pts = [np.round((p - (0, ya)) * (1 << SHIFT)).astype(np.int32) for p in op.polys]
        if op.kind == "fill":
            cv2.fillPoly(canvas, pts, float(op.value), cv2.LINE_8, SHIFT)
        else:
            cv2.polylines(canvas, pts, op.closed, float(op.value), op.thickness, cv2.LINE_8, SHIFT)
        return
    got = _mask_for(op, ya, h, w)
    if got is None:
        return
    rs, cs, mask = got
    src = tex[op.src][rs, cs][mask]
    canvas[rs, cs][mask] = op.value + op.slope * (src - 0.5)



def render_strip(scene: Scene, fields: dict, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 rows [y0, y1) and the tissue mask (bool) of those rows."""
    size, m = scene.size, scene.margin
    ya, yb = max(0, y0 - m), min(size, y1 + m)
    h, w = yb - ya, size
    X = np.arange(w, dtype=np.float32)[None, :]
    Y = np.arange(ya, yb, dtype=np.float32)[:, None]
    f, depth, s = fields["layout"].fields(X, Y, upsample_rows(fields["edge_noise"], LR_DS, ya, yb, w))
    T = np.clip(f + 0.5, 0.0, 1.0)
    tissue = f >= 0
    coll, mid = upsample_rows(fields["coll"], MR_DS, ya, yb, w), upsample_rows(fields["mid"], MR_DS, ya, yb, w)
    E, H = _background(scene, fields, depth, s, coll, mid, ya, yb)
    canvases = _paint_canvases(scene, E, H, {"coll": coll, "mid": mid}, ya, yb)
    del coll
    rng = np.random.default_rng([fields["seed"], y0, 7])
    grain = rng.random((h, w), dtype=np.float32)
    Ht, Et, Ct = _stain_densities(scene, fields, canvases, grain, ya, yb)
    if scene.cuts:
        _apply_cuts(scene.cuts, Ht, Et, ya, Ct)
    Ht *= T
    Et *= T
    if Ct is not None:
        Ct *= T
    rgb = _to_rgb(scene, fields["style"], Ht, Et, canvases["P"], mid, grain, Ct)
    for cx, cy, rx, ry, sigma in scene.blurs:
        _blur_region(rgb, ya, cx, cy, rx, ry, sigma)
    if scene.border is not None:
        _draw_border(rgb, ya, scene.border, size, grain)
    r0, r1 = y0 - ya, y1 - ya
    return rgb[r0:r1], tissue[r0:r1]


def _background(scene: Scene, fields: dict, depth, s, coll, mid, ya: int, yb: int) -> tuple[np.ndarray, np.ndarray]:
    """Eosin and haematoxylin of the rows [ya, yb) before any operation: dermis, fat, epidermis, corneum."""
    lay = fields["layout"]
    h, w = yb - ya, scene.size
    fat = (depth >= lay.derm_px + upsample_rows(fields["derm_noise"], LR_DS, ya, yb, w) if lay.subcutis
           else np.zeros((h, w), bool))
    E = np.where(fat, 0.3 + 0.45 * coll, 0.12 + 0.85 * coll).astype(np.float32)
    H = np.where(fat, 0.12, 0.1 + 0.22 * coll).astype(np.float32)
    if lay.epidermis:
        epi_lim = lay.epi_px + lay.ridge_amp * np.sin(TWO_PI * s / lay.ridge_lambda + lay.ridge_phase)
        epi = depth < epi_lim
        corneum = depth < lay.corneum_px
        E[epi] = (0.62 + 0.35 * mid)[epi]
        H[epi] = 0.28
        basal = epi & (depth > epi_lim - scene.px(12.0))
        H[basal] = 0.42
        E[corneum] = (0.05 + 0.9 * coll * (coll > 0.45))[corneum]
        H[corneum] = 0.03
    return E, H


def _paint_canvases(scene: Scene, E, H, tex: dict, ya: int, yb: int) -> dict[str, np.ndarray]:
    """Every canvas of the rows [ya, yb): the ordered operations, then the ellipse batches."""
    h, w = yb - ya, scene.size
    zeros = lambda: np.zeros((h, w), np.float32)  # noqa: E731
    canvases = {"E": E, "H": H, "N": zeros(), "C": zeros(), "P": zeros(), "D": zeros()}
    for op in scene.ops:
        if op.y1 >= ya and op.y0 < yb:
            _apply_op(op, canvases, tex, ya, h, w)
    for canvas_name, name in BATCHES:
        arr, reach = scene._sorted[name]
        lo, hi = np.searchsorted(arr[:, 1], [ya - reach, yb + reach])
        canvas = canvases[canvas_name]
        k = float(1 << SHIFT)
        for cx, cy, a, b, ang, v in arr[lo:hi].tolist():
            cv2.ellipse(
                canvas, (int(cx * k + 0.5), int((cy - ya) * k + 0.5)),
                (max(int(a * k + 0.5), 1), max(int(b * k + 0.5), 1)), ang, 0, 360, v, -1, cv2.LINE_8, SHIFT,
            )
    return canvases


def _stain_densities(scene: Scene, fields: dict, canvases: dict, grain, ya: int, yb: int):
    """Total haematoxylin and eosin densities: nuclei and calcium with chromatin grain, stain unevenness, a
    slight optical blur, folds darker."""
    E, H = canvases["E"], canvases["H"]
    chrom = cv2.blur(grain, (3, 3))
    N = cv2.GaussianBlur(canvases["N"], (5, 5), 0.8) * (0.6 + 0.8 * chrom)
    C = cv2.GaussianBlur(canvases["C"], (3, 3), 0.6) * (0.7 + 0.6 * grain)
    sv = upsample_rows(fields["stain_var"], LR_DS, ya, yb, scene.size)
    st = fields["style"]
    Ct = None
    if "calc_vec" in st:  # style "random": part of the calcium drawn with its own absorbance vector
        k = st["calc_mix"]
        Ct = cv2.GaussianBlur(C * (k * st["h_scale"]) * sv, (3, 3), 0.55)
        Ht = (H + N + (1.0 - k) * C) * (st["h_scale"] * sv)
        Et = (E * (1.0 - 0.25 * np.clip(N, 0, 1)) * (0.75 + 0.5 * chrom) + st["calc_e"] * C) * (st["e_scale"] * sv)
    else:
        Ht = (H + N + C) * (st["h_scale"] * sv)
        Et = (E * (1.0 - 0.25 * np.clip(N, 0, 1)) * (0.75 + 0.5 * chrom) + 0.15 * C) * (st["e_scale"] * sv)
    Ht = cv2.GaussianBlur(Ht, (3, 3), 0.55)
    Et = cv2.GaussianBlur(Et, (3, 3), 0.55)
    D = canvases["D"]
    if D.any():
        D = cv2.GaussianBlur(D, (0, 0), scene.px(4.0))
        Ht *= 1.0 + st["fold_gain"] * D
        Et *= 1.0 + st["fold_gain"] * D
        if Ct is not None:
            Ct *= 1.0 + st["fold_gain"] * D
    return Ht, Et, Ct


def _to_rgb(scene: Scene, st: dict, Ht, Et, pen, mid, grain, Ct=None) -> np.ndarray:
    """Beer-Lambert: RGB uint8 from the stain densities, pen ink (blurred, uneven), glass and sensor noise."""
    h, w = Ht.shape
    P = pen
    if P.any():
        P = cv2.GaussianBlur(P, (0, 0), scene.px(3.0)) * (0.75 + 0.5 * mid)
    rgb = np.empty((h, w, 3), np.uint8)
    glass = st["glass_od"]
    for c in range(3):
        od = Ht * (st["h_vec"][c] + RESID_OD[c]) + Et * (st["e_vec"][c] + RESID_OD[c]) + glass[c]
        if Ct is not None:
            od += Ct * st["calc_vec"][c]
        if P is not pen or P.any():
            od += P * st["ink"][c]
        od += (grain - 0.5) * 0.02
        rgb[..., c] = np.clip(st["white"][c] * np.exp(-od) + 0.5, 0, 255).astype(np.uint8)
    return rgb


def _apply_cuts(cuts: list, Ht: np.ndarray, Et: np.ndarray, ya: int, Ct: np.ndarray | None = None) -> None:
    """Calcium sectioning artifacts on the stain densities of a strip; nothing changes outside a polygon."""
    h, w = Ht.shape
    for kind, poly, prm in cuts:
        x0, x1 = max(int(poly[:, 0].min()) - 1, 0), min(int(poly[:, 0].max()) + 2, w)
        r0, r1 = max(int(poly[:, 1].min()) - 1 - ya, 0), min(int(poly[:, 1].max()) + 2 - ya, h)
        if x1 <= x0 or r1 <= r0:
            continue
        mask = np.zeros((r1 - r0, x1 - x0), np.uint8)
        cv2.fillPoly(mask, [np.round((poly - (x0, ya + r0)) * (1 << SHIFT)).astype(np.int32)], 1, cv2.LINE_8, SHIFT)
        inside = mask.view(bool)
        if kind == "gap":
            Ht[r0:r1, x0:x1][inside] = 0.0
            Et[r0:r1, x0:x1][inside] = 0.0
            if Ct is not None:
                Ct[r0:r1, x0:x1][inside] = 0.0
            continue
        X = np.arange(x0, x1, dtype=np.float32)[None, :] - prm["cx"]
        Y = np.arange(ya + r0, ya + r1, dtype=np.float32)[:, None] - prm["cy"]
        ca, sa = math.cos(prm["patch_angle"]), math.sin(prm["patch_angle"])
        px_, py_ = (X * ca + Y * sa) / prm["rx"], (-X * sa + Y * ca) / prm["ry"]
        th = np.arctan2(py_, px_)
        rho = np.ones_like(th)
        for k, (a, p) in enumerate(prm["harm"], start=2):
            rho += a * np.cos(k * th + p)
        fade = np.clip((0.97 - np.hypot(px_, py_) / rho) / 0.25, 0.0, 1.0)
        cb, sb = math.cos(prm["band_angle"]), math.sin(prm["band_angle"])
        u, t = X * cb + Y * sb, -X * sb + Y * cb
        wave = prm["wave_amp"] * np.sin(TWO_PI * t / prm["wave_len"] + prm["wave_phase"])
        band = np.clip(0.5 + 1.6 * np.sin(TWO_PI * u / prm["period"] + prm["phase"] + wave), 0.0, 1.0)
        factor = np.where(inside, 1.0 - prm["amp"] * fade * band, 1.0).astype(np.float32)
        Ht[r0:r1, x0:x1] *= factor
        Et[r0:r1, x0:x1] *= factor
        if Ct is not None:
            Ct[r0:r1, x0:x1] *= factor


def _blur_region(rgb: np.ndarray, ya: int, cx, cy, rx, ry, sigma) -> None:
    h, w = rgb.shape[:2]
    pad = int(3 * sigma) + 2
    rx2, ry2 = 1.2 * rx, 1.2 * ry  # the blend weight is zero beyond 1.15 radii
    x0, x1 = max(int(cx - rx2) - pad, 0), min(int(cx + rx2) + pad + 1, w)
    r0, r1 = max(int(cy - ry2) - pad - ya, 0), min(int(cy + ry2) + pad + 1 - ya, h)
    if x1 <= x0 or r1 <= r0:
        return
    sub = rgb[r0:r1, x0:x1]
    blurred = cv2.GaussianBlur(sub, (0, 0), sigma)
    yy, xx = np.ogrid[r0 + ya : r1 + ya, x0:x1]
    d = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
    wgt = np.clip((1.15 - d) / 0.3, 0, 1).astype(np.float32)[..., None]
    sub[...] = (blurred * wgt + sub * (1 - wgt) + 0.5).astype(np.uint8)


def _draw_border(rgb: np.ndarray, ya: int, border: tuple[int, int], size: int, grain: np.ndarray) -> None:
    side, width = border
    h = rgb.shape[0]
    dark = (12 + 22 * grain).astype(np.uint8)[..., None]
    if side == 1:
        rgb[:, size - width :] = dark[:, size - width :]
    elif side == 3:
        rgb[:, :width] = dark[:, :width]
    else:
        rows = np.arange(ya, ya + h)
        sel = rows < width if side == 0 else rows >= size - width
        rgb[sel] = dark[sel]

