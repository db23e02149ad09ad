"""Drawing primitives and the strip renderer behind the H&E phantom (see calciscope.data.synthetic).

A phantom slide is first described as a *scene*: smooth low-resolution fields (tissue outline, dermis/fat
boundary, stain unevenness, collagen texture) plus an ordered list of vector drawing operations (filled
polygons, thick polylines, batches of ellipses) on named optical-density canvases, all in level-0 pixels.
The scene is then rendered strip by strip (rows), so level 0 is never held whole in memory; every strip is
rendered with a margin of extra rows so that blurs do not show seams.

Canvases (optical density per pixel, in stain units where the measured median of real tissue is ~0.7):
``H`` / ``E`` background haematoxylin / eosin, ``N`` nuclei (added to H, suppresses E), ``C`` calcium
(basophilic deposits, added to H), ``P`` pen ink density, ``D`` fold (double thickness) weight.

Sectioning artifacts of calcium (``Scene.cuts``: knife holes and tears, chatter) act after the canvases are
combined and blurred, on the final stain densities, and only inside their polygons: a cut zeroes both stains
(bare glass), chatter multiplies them by a banded factor that is exactly 1 outside its patch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

# Stain optical-density unit vectors (R, G, B), estimated here with Macenko's method (Macenko et al. 2009:
# OD threshold 0.15 on every channel, 1st/99th percentile angles in the plane of the two main eigenvectors)
# on all of level 0 of the real Aperio scan shared/fixtures/CMU-1-Small-Region.svs (0.499 um/px), after
# dropping green-ink pixels (G > R). Concentrations there: median H 0.63, E 0.69; 99th percentile H 3.5, E 2.3.
H_OD = np.array([0.6284, 0.6900, 0.3591], dtype=np.float32)
E_OD = np.array([0.1841, 0.9105, 0.3704], dtype=np.float32)
# Mean residual of those pixels off the H-E plane per unit of total stain (H + E): real tissue absorbs a
# little more blue than the two vectors explain.
RESID_OD = np.array([-0.0136, -0.0318, 0.0848], dtype=np.float32)
# Marker inks (absorbance per unit density), from typical RGB of green / blue / black ink on glass.
INK_OD = {
    "green": np.array([1.45, 0.55, 0.95], dtype=np.float32),
    "blue": np.array([1.60, 1.20, 0.45], dtype=np.float32),
    "black": np.array([1.70, 1.70, 1.60], dtype=np.float32),
}
LR_DS = 16  # downsample of the smooth layout fields
MR_DS = 2  # downsample of the texture fields (collagen fibres, blotches)
SHIFT = 2  # cv2 sub-pixel bits: coordinates are drawn at 1/4 px
TWO_PI = 2.0 * math.pi


# ----------------------------------------------------------------------------------------------- noise fields
def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-blurred white noise (float32)."""
    n = rng.standard_normal(shape, dtype=np.float32)
    if sigma_px > 0.3:
        n = cv2.GaussianBlur(n, (0, 0), sigma_px, borderType=cv2.BORDER_REFLECT)
    n -= n.mean()
    n /= n.std() + 1e-6
    return n


def upsample_rows(lowres: np.ndarray, ds: int, y0: int, y1: int, width: int) -> np.ndarray:
    """Rows [y0, y1) x [0, width) of `lowres` bilinearly upsampled by `ds`; seamless across calls."""
    a = max(y0 // ds - 2, 0)
    b = min(-(-y1 // ds) + 2, lowres.shape[0])
    sub = np.ascontiguousarray(lowres[a:b])
    big = cv2.resize(sub, (sub.shape[1] * ds, (b - a) * ds), interpolation=cv2.INTER_LINEAR)
    off = y0 - a * ds
    return big[off : off + (y1 - y0), :width]


def sample_points(lowres: np.ndarray, ds: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear value of an upsampled low-res field at level-0 points (same convention as upsample_rows)."""
    mx = ((np.asarray(x, np.float32) + 0.5) / ds - 0.5).reshape(-1, 1)
    my = ((np.asarray(y, np.float32) + 0.5) / ds - 0.5).reshape(-1, 1)
    return cv2.remap(lowres, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE).reshape(-1)


def collagen_field(rng: np.random.Generator, shape: tuple[int, int], mpp_mr: float, angle: float) -> np.ndarray:
    """Wavy collagen-bundle texture in [0, 1] at MR resolution: streaks ~2 um wide, ~25 um long, with clefts."""
    hm, wm = shape
    d = int(math.ceil(math.hypot(hm, wm))) + 8
    streak = smooth_noise(rng, (d, d), 0.0)
    streak = cv2.GaussianBlur(streak, (0, 0), sigmaX=7.0 / mpp_mr, sigmaY=0.9 / mpp_mr)
    streak /= streak.std() + 1e-6
    yy, xx = np.mgrid[0:hm, 0:wm].astype(np.float32)
    xx -= wm / 2
    yy -= hm / 2
    amp = 18.0 / mpp_mr
    dx = smooth_noise(rng, (hm // 8 + 2, wm // 8 + 2), 50.0 / mpp_mr / 8) * amp
    dy = smooth_noise(rng, (hm // 8 + 2, wm // 8 + 2), 50.0 / mpp_mr / 8) * amp
    dx = cv2.resize(dx, (wm, hm))[:hm, :wm]
    dy = cv2.resize(dy, (wm, hm))[:hm, :wm]
    ca, sa = math.cos(angle), math.sin(angle)
    mx = xx * ca + yy * sa + d / 2 + dx
    my = -xx * sa + yy * ca + d / 2 + dy
    del xx, yy, dx, dy
    out = cv2.remap(streak, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return (1.0 / (1.0 + np.exp(-4.0 * (out + 0.3)))).astype(np.float32)


# ----------------------------------------------------------------------------------------------- geometry
def chaikin(poly: np.ndarray) -> np.ndarray:
    """One round of corner cutting on a closed polygon (rounds adipocyte corners)."""
    nxt = np.roll(poly, -1, axis=0)
    return np.stack([0.75 * poly + 0.25 * nxt, 0.25 * poly + 0.75 * nxt], 1).reshape(-1, 2)


def clip_halfplane(poly: np.ndarray, normal: np.ndarray, c: float) -> np.ndarray:
    """Sutherland-Hodgman: the part of a closed polygon where dot(p, normal) >= c."""
    out = []
    d = poly @ normal - c
    n = len(poly)
    for i in range(n):
        j = (i + 1) % n
        if d[i] >= 0:
            out.append(poly[i])
        if (d[i] >= 0) != (d[j] >= 0):
            t = d[i] / (d[i] - d[j])
            out.append(poly[i] + t * (poly[j] - poly[i]))
    return np.asarray(out, dtype=np.float64).reshape(-1, 2)


def stroke_outline(pts: np.ndarray, width: float) -> np.ndarray:
    """Polygon around a polyline drawn `width` px thick (for artifact GeoJSON)."""
    d = np.gradient(pts, axis=0)
    nrm = np.stack([-d[:, 1], d[:, 0]], 1)
    nrm /= np.linalg.norm(nrm, axis=1, keepdims=True) + 1e-9
    return np.concatenate([pts + nrm * width / 2, (pts - nrm * width / 2)[::-1]])


@dataclass
class Vessel:
    """One vessel cross-section; radii in level-0 px; the outline is an ellipse with a few harmonics."""

    vid: int
    kind: str
    compartment: str
    cx: float
    cy: float
    ro: float  # outer radius (adventitia)
    rl: float  # lumen radius
    aspect: float
    angle: float
    harm: np.ndarray  # (K, 2): amplitude, phase of harmonics k = 2..K+1
    findings: list[str] = field(default_factory=list)
    rl_eff: float = 0.0  # lumen after intimal narrowing
    cuff: float = 0.0  # perivascular infiltrate width (vasculitis / lymphocytic cuff), px
    lumen: np.ndarray | None = None  # the drawn lumen outline (N, 2) px, set by draw_vessel
    calc_arc: tuple[float, float, float, float] | None = None  # calcified arc: th0, span (rad), r_in, r_out px

    def rho(self, th: np.ndarray) -> np.ndarray:
        r = np.ones_like(th)
        for k, (a, p) in enumerate(self.harm, start=2):
            r += a * np.cos(k * th + p)
        return r

    def xy(self, r: np.ndarray | float, th: np.ndarray) -> np.ndarray:
        th = np.asarray(th, np.float64)
        rr = np.asarray(r, np.float64) * self.rho(th)
        x, y = rr * np.cos(th), rr * np.sin(th) * self.aspect
        ca, sa = math.cos(self.angle), math.sin(self.angle)
        return np.stack([self.cx + x * ca - y * sa, self.cy + x * sa + y * ca], -1)

    def tangent_deg(self, th: np.ndarray) -> np.ndarray:
        return np.degrees(np.arctan2(np.cos(th) * self.aspect, -np.sin(th)) + self.angle)

    def ring(self, r: float, th0: float = 0.0, th1: float = TWO_PI) -> np.ndarray:
        n = int(np.clip(r * abs(th1 - th0) / 3.0, 20, 240))
        full = abs(th1 - th0) >= TWO_PI - 1e-6
        th = np.linspace(th0, th1, n, endpoint=not full)
        return self.xy(r, th)

    def band(self, r_in: float, r_out: float, th0: float, th1: float) -> np.ndarray:
        return np.concatenate([self.ring(r_out, th0, th1), self.ring(r_in, th0, th1)[::-1]])


# ----------------------------------------------------------------------------------------------- the scene
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
    lay = fields["layout"]
    up_lr = lambda f: upsample_rows(f, LR_DS, ya, yb, w)  # noqa: E731
    up_mr = lambda f: upsample_rows(f, MR_DS, ya, yb, w)  # noqa: E731
    X = np.arange(w, dtype=np.float32)[None, :]
    Y = np.arange(ya, yb, dtype=np.float32)[:, None]
    f, depth, s = lay.fields(X, Y, up_lr(fields["edge_noise"]))
    T = np.clip(f + 0.5, 0.0, 1.0)
    tissue = f >= 0
    coll, mid = up_mr(fields["coll"]), up_mr(fields["mid"])
    fat = depth >= lay.derm_px + up_lr(fields["derm_noise"]) if lay.subcutis else np.zeros((h, w), bool)
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
    zeros = lambda: np.zeros((h, w), np.float32)  # noqa: E731
    canvases = {"E": E, "H": H, "N": zeros(), "C": zeros(), "P": zeros(), "D": zeros()}
    tex = {"coll": coll, "mid": mid}
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
    del coll
    rng = np.random.default_rng([fields["seed"], y0, 7])
    grain = rng.random((h, w), dtype=np.float32)
    chrom = cv2.blur(grain, (3, 3))
    N = cv2.GaussianBlur(canvases["N"], (5, 5), 0.8) * (0.6 + 0.8 * chrom)
    C = cv2.GaussianBlur(canvases["C"], (3, 3), 0.6) * (0.7 + 0.6 * grain)
    sv = up_lr(fields["stain_var"])
    st = fields["style"]
    Ht = (H + N + C) * (st["h_scale"] * sv)
    Et = (E * (1.0 - 0.25 * np.clip(N, 0, 1)) * (0.75 + 0.5 * chrom) + 0.15 * C) * (st["e_scale"] * sv)
    Ht = cv2.GaussianBlur(Ht, (3, 3), 0.55)
    Et = cv2.GaussianBlur(Et, (3, 3), 0.55)
    D = canvases["D"]
    if D.any():
        D = cv2.GaussianBlur(D, (0, 0), scene.px(4.0))
        Ht *= 1.0 + st["fold_gain"] * D
        Et *= 1.0 + st["fold_gain"] * D
    if scene.cuts:
        _apply_cuts(scene.cuts, Ht, Et, ya)
    Ht *= T
    Et *= T
    P = canvases["P"]
    if P.any():
        P = cv2.GaussianBlur(P, (0, 0), scene.px(3.0)) * (0.75 + 0.5 * mid)
    rgb = np.empty((h, w, 3), np.uint8)
    glass = st["glass_od"]
    for c in range(3):
        od = Ht * (st["h_vec"][c] + RESID_OD[c]) + Et * (st["e_vec"][c] + RESID_OD[c]) + glass[c]
        if P is not canvases["P"] or P.any():
            od += P * st["ink"][c]
        od += (grain - 0.5) * 0.02
        rgb[..., c] = np.clip(st["white"][c] * np.exp(-od) + 0.5, 0, 255).astype(np.uint8)
    for cx, cy, rx, ry, sigma in scene.blurs:
        _blur_region(rgb, ya, cx, cy, rx, ry, sigma)
    if scene.border is not None:
        _draw_border(rgb, ya, scene.border, size, grain)
    r0, r1 = y0 - ya, y1 - ya
    return rgb[r0:r1], tissue[r0:r1]


def _apply_cuts(cuts: list, Ht: np.ndarray, Et: np.ndarray, ya: int) -> None:
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


# ----------------------------------------------------------------------------------------------- layout
@dataclass
class Layout:
    """Where the tissue is: a slab (epidermis side up in its own frame) rotated onto the slide.

    In the slab frame, s runs along the skin surface and depth runs from the surface (0) into the fat.
    `f` is a signed distance (px) to the tissue outline, positive inside.
    """

    cx: float
    cy: float
    ux: float
    uy: float
    half_w: float
    half_h: float
    top_amp: float
    top_lambda: float
    top_phase: float
    epidermis: bool
    epi_px: float
    corneum_px: float
    ridge_amp: float
    ridge_lambda: float
    ridge_phase: float
    derm_px: float
    border: tuple[int, int] | None
    size: int
    subcutis: bool = True  # False: dermis down to the deep edge, no fat anywhere

    def fields(self, X, Y, edge_noise):
        dx, dy = X - self.cx, Y - self.cy
        s = dx * self.ux + dy * self.uy
        t = -dx * self.uy + dy * self.ux
        top = -self.half_h + self.top_amp * np.sin(TWO_PI * s / self.top_lambda + self.top_phase)
        depth = t - top
        f = np.minimum(depth if self.epidermis else depth + edge_noise, self.half_h - t + edge_noise)
        f = np.minimum(f, self.half_w - np.abs(s) + edge_noise)
        if self.border is not None:
            side, width = self.border
            gap = width + 0.02 * self.size
            edge = {0: Y - gap, 1: (self.size - gap) - X, 2: (self.size - gap) - Y, 3: X - gap}[side]
            f = np.minimum(f, edge)
        return f, depth, s

    def to_xy(self, s, depth):
        """Level-0 (x, y) of slab coordinates."""
        top = -self.half_h + self.top_amp * np.sin(TWO_PI * s / self.top_lambda + self.top_phase)
        t = top + depth
        return self.cx + s * self.ux - t * self.uy, self.cy + s * self.uy + t * self.ux


# ----------------------------------------------------------------------------------------------- cells
def uniform(rng: np.random.Generator, lo: float, hi: float, n: int | None = None):
    return rng.uniform(lo, hi, n)


def rbcs(scene: Scene, rng: np.random.Generator, x, y) -> None:
    """Red cells, 7-8 um, biconcave (paler centre), seen at random tilts."""
    n = len(x)
    r = scene.px(rng.uniform(3.4, 3.9, n))
    b = r * rng.uniform(0.55, 1.0, n)
    ang = rng.uniform(0, 180, n)
    val = rng.uniform(1.6, 2.1, n)
    scene.ellipses("rbc", x, y, r, b, ang, val)
    scene.ellipses("rbc_core", x, y, r * 0.45, b * 0.45, ang, val * 0.72)


def lymphocytes(scene: Scene, rng: np.random.Generator, x, y) -> None:
    """Small round dark nuclei, ~7 um."""
    n = len(x)
    r = scene.px(rng.uniform(2.9, 3.6, n))
    scene.ellipses("nuc", x, y, r, r * rng.uniform(0.82, 1.0, n), rng.uniform(0, 180, n), rng.uniform(1.6, 2.1, n))


def neutrophils(scene: Scene, rng: np.random.Generator, x, y) -> None:
    """Segmented nuclei: 3-4 small lobes within ~8 um, pale pink cytoplasm."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    scene.ellipses("cyto", x, y, scene.px(5.0), scene.px(4.5), rng.uniform(0, 180, n), 0.75)
    for _ in range(4):
        a = rng.uniform(0, TWO_PI, n)
        d = scene.px(rng.uniform(1.2, 2.4, n))
        keep = rng.random(n) < 0.85
        r = scene.px(rng.uniform(0.95, 1.35, n))
        scene.ellipses(
            "nuc", (x + d * np.cos(a))[keep], (y + d * np.sin(a))[keep], r[keep], (r * 0.8)[keep],
            rng.uniform(0, 180, n)[keep], rng.uniform(1.6, 2.1, n)[keep],
        )


def nuclear_dust(scene: Scene, rng: np.random.Generator, x, y) -> None:
    n = len(x)
    r = scene.px(rng.uniform(0.35, 0.8, n))
    scene.ellipses("nuc", x, y, r, r, 0.0, rng.uniform(1.8, 2.4, n))


def spindles(scene: Scene, rng: np.random.Generator, x, y, angle_deg, value=(1.0, 1.5)) -> None:
    """Fibroblast / smooth-muscle nuclei: elongated, 8-14 um long, 2-3 um wide."""
    n = len(x)
    a = scene.px(rng.uniform(3.5, 6.5, n))
    b = scene.px(rng.uniform(0.9, 1.5, n))
    scene.ellipses("nuc", x, y, a, b, angle_deg, rng.uniform(value[0], value[1], n))


def histiocytes(scene: Scene, rng: np.random.Generator, x, y, foamy: bool = False) -> None:
    n = len(x)
    if foamy:
        scene.ellipses("cyto", x, y, scene.px(8.0), scene.px(6.5), rng.uniform(0, 180, n), 0.35)
    a = scene.px(rng.uniform(3.2, 4.5, n))
    scene.ellipses("nuc", x, y, a, a * rng.uniform(0.6, 0.85, n), rng.uniform(0, 180, n), rng.uniform(0.9, 1.3, n))


def granules(scene: Scene, rng: np.random.Generator, x, y, r_um=(0.5, 1.4), value=(2.0, 3.2)) -> None:
    """Basophilic calcium granules (drawn on the calcium canvas)."""
    n = len(x)
    r = scene.px(rng.uniform(r_um[0], r_um[1], n))
    scene.ellipses("calc", x, y, r, r * rng.uniform(0.6, 1.0, n), rng.uniform(0, 180, n), rng.uniform(*value, n))


def points_in_poly(rng: np.random.Generator, poly: np.ndarray, n: int) -> np.ndarray:
    """About n uniform random points inside a polygon (rejection on its bounding box)."""
    lo, hi = poly.min(0), poly.max(0)
    if n <= 0 or np.any(hi - lo < 1):
        return np.zeros((0, 2))
    w, h = int(hi[0] - lo[0]) + 2, int(hi[1] - lo[1]) + 2
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [np.round((poly - lo) * 4).astype(np.int32)], 1, cv2.LINE_8, SHIFT)
    frac = max(mask.mean(), 0.05)
    pts = lo + rng.random((int(n / frac * 1.2) + 4, 2)) * (hi - lo)
    ij = np.clip((pts - lo).astype(int), 0, [w - 1, h - 1])
    return pts[mask[ij[:, 1], ij[:, 0]] > 0][:n]


def annulus_points(rng: np.random.Generator, v: Vessel, r0: float, r1: float, n: int, power: float = 1.0):
    th = rng.uniform(0, TWO_PI, n)
    r = r0 + (r1 - r0) * rng.random(n) ** power
    return v.xy(r, th), th, r


# ----------------------------------------------------------------------------------------------- vessels
def draw_vessel(scene: Scene, rng: np.random.Generator, v: Vessel, emit: set[str], *, hyaline=False,
                packed=False, fibroplasia=False) -> None:
    """Paint one vessel (outside in) with the lesions listed in v.findings; record lesion polygons.

    `emit` names the finding classes whose polygons go into the ground truth (the ones asked for);
    `fibroplasia` narrows the lumen with intimal fibrosis; `hyaline` and `packed` are normal-variant
    confounders (glassy arteriolosclerotic media; lumen packed with red cells, no fibrin).
    """
    px, F = scene.px, set(v.findings)
    muscular = v.kind in ("arteriole", "small_artery")
    w = v.ro - v.rl
    fibrinoid = "vasculitis" in F
    if "intimal_fibrosis" in F or "small_vessel_calcification" in F and fibroplasia:
        fibroplasia = True
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
    # Lumen, possibly narrowed (eccentrically) by intimal fibrosis.
    v.rl_eff = v.rl
    lumen = v.ring(v.rl)
    if fibroplasia and v.kind != "capillary":
        v.rl_eff = v.rl * rng.uniform(0.35, 0.7)
        scene.fill("E", v.ring(r_iel - px(0.5)), 0.5, 0.6, "coll")
        scene.fill("H", v.ring(r_iel - px(0.5)), 0.1)
        shift = (v.rl - v.rl_eff) * rng.uniform(0.2, 0.7) * np.array([math.cos(a := rng.uniform(0, TWO_PI)),
                                                                        math.sin(a)])
        lumen = v.ring(v.rl_eff) + shift
        ring_pts, th, r = annulus_points(rng, v, v.rl_eff, r_iel, int(TWO_PI * r_iel / px(14)) + 1)
        spindles(scene, rng, ring_pts[:, 0], ring_pts[:, 1], v.tangent_deg(th), (1.1, 1.6))
        if "intimal_fibrosis" in F and "intimal_fibrosis" in emit:
            scene.lesions.append(("intimal_fibrosis", v.ring(r_iel + px(0.5))))
    else:
        shift = np.zeros(2)
    scene.fill("E", lumen, float(rng.uniform(0.0, 0.08)), 0.06, "mid")
    scene.fill("H", lumen, 0.0)
    v.lumen = lumen
    lumen_c = np.array([v.cx, v.cy]) + shift

    # Calcification arcs (media for arterioles / arteries, whole wall for small vessels).
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

    # Nuclei of the wall.
    if muscular and not fibrinoid:
        area = math.pi * (r_me**2 - r_iel**2) * v.aspect
        n = int(area / (px(8.0) * px(10.0)) * (0.4 if hyaline else 1.0))
        pts, th, r = annulus_points(rng, v, r_iel + px(1.5), r_me - px(1.0), n)
        if calc_arc is not None:
            th0, span, _, _ = calc_arc
            inside = ((th - th0) % TWO_PI) < span
            sel = ~inside | (rng.random(len(th)) < 0.3)
            pts, th = pts[sel], th[sel]
        spindles(scene, rng, pts[:, 0], pts[:, 1], v.tangent_deg(th) + rng.normal(0, 8, len(th)))
        pts, th, _ = annulus_points(rng, v, r_me, v.ro, int(TWO_PI * v.ro / px(45)) + 1)
        spindles(scene, rng, pts[:, 0], pts[:, 1], v.tangent_deg(th), (1.2, 1.7))
    elif v.kind == "venule" and not fibrinoid:
        pts, th, _ = annulus_points(rng, v, v.rl + px(0.5), v.ro, int(TWO_PI * v.ro / px(30)) + 1)
        spindles(scene, rng, pts[:, 0], pts[:, 1], v.tangent_deg(th))
    if not fibrinoid:  # endothelium: flat nuclei lining the lumen
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

    # Lumen content: thrombus, or a few (or packed) red cells.
    if "thrombosis" in F:
        _thrombus(scene, rng, v, lumen)
    else:
        rbc_r = px(3.7)
        if v.kind == "capillary":
            if v.rl > px(2.2) and rng.random() < 0.5:
                scene.ellipses("rbc", lumen_c[0], lumen_c[1], min(v.rl, rbc_r), min(v.rl, rbc_r) * 0.9, 0, 1.9)
        elif v.rl_eff > rbc_r * 1.2:
            frac = 0.85 if packed else (rng.uniform(0.15, 0.6) if v.kind == "venule" else rng.uniform(0.0, 0.2))
            n = int(frac * v.rl_eff**2 * v.aspect / rbc_r**2)
            pts = points_in_poly(rng, v.ring(v.rl_eff - rbc_r * 0.8) + shift, n)
            rbcs(scene, rng, pts[:, 0], pts[:, 1])
    if fibrinoid:
        _vasculitis(scene, rng, v)


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


def debris(scene: Scene, rng, cx: float, cy: float, r: float) -> np.ndarray:
    """Confounder: basophilic granular debris outside vessels. Returns its outline (convex hull)."""
    n = int(math.pi * r * r / scene.px(4.0) ** 2 * rng.uniform(0.3, 0.7)) + 5
    p = np.stack([cx + rng.normal(0, r / 2, n), cy + rng.normal(0, r / 2 * rng.uniform(0.4, 1.0), n)], 1)
    granules(scene, rng, p[:, 0], p[:, 1], r_um=(0.5, 2.2), value=(1.8, 3.2))
    for _ in range(rng.integers(0, 4)):
        c = p[rng.integers(n)]
        a = np.sort(rng.uniform(0, TWO_PI, 6))
        rr = scene.px(rng.uniform(2, 6, 6))
        scene.fill("C", c + np.stack([rr * np.cos(a), rr * np.sin(a)], 1), 2.2, 1.2, "mid")
    hull = cv2.convexHull(p.astype(np.float32)).reshape(-1, 2).astype(np.float64)
    c = hull.mean(0)
    return c + (hull - c) * 1.08 + np.sign(hull - c) * scene.px(2.0)


# ----------------------------------------------------------------------------------------------- calcium artifacts
CALCIUM_ARTIFACT_KINDS = ("hole", "tear", "chatter")
CALCIUM_STREAM = 0xCA1C1A  # spawn-key word of the calcium-artifact random stream (see build_scene)


def calcium_artifacts(scene: Scene, rng: np.random.Generator, p: float) -> None:
    """With probability p per calcified vessel, one sectioning artifact of the calcium, kind chosen uniformly.

    Records (kind, vessel id, polygon) in scene.calcium_artifacts and the drawing in scene.cuts.
    """
    make = {"hole": _calcium_hole, "tear": _calcium_tear, "chatter": _knife_chatter}
    for v in scene.vessels:
        if v.calc_arc is None or not rng.random() < p:
            continue
        kind = CALCIUM_ARTIFACT_KINDS[int(rng.integers(len(CALCIUM_ARTIFACT_KINDS)))]
        scene.calcium_artifacts.append((kind, v.vid, make[kind](scene, rng, v)))


def _ragged(rng: np.random.Generator, n: int, amp: float) -> np.ndarray:
    """Jagged offsets (px) for n edge vertices: white noise lightly smoothed, std ~amp."""
    j = rng.normal(0, amp * 1.3, n + 2)
    return 0.25 * j[:-2] + 0.5 * j[1:-1] + 0.25 * j[2:]


def _calcium_hole(scene: Scene, rng, v: Vessel) -> np.ndarray:
    """The deposit fell out of the section: a stretch of the calcified arc (>= ~8 um, 15-55 % of it) is bare
    glass, edges ragged by ~1 um, reaching 0-2 um into the intima and sometimes past the outer wall (<= 4 um)."""
    px = scene.px
    th0, span, r_in, r_out = v.calc_arc
    hs = min(span, max(span * rng.uniform(0.15, 0.55), px(rng.uniform(8, 15)) / max(r_out, 1.0)))
    a = th0 + rng.uniform(0, span - hs)
    n = max(int(hs * r_out / px(1.5)), 8)
    th = np.linspace(a, a + hs, n)
    rough = px(rng.uniform(0.5, 1.2))
    lo = max(r_in - px(rng.uniform(0, 2.0)), px(0.5))
    hi = r_out + (rng.uniform(0, 1) * max(v.ro - r_out, 0) + px(rng.uniform(0, 4.0)) if rng.random() < 0.5 else 0)
    mid, half = (lo + hi) / 2, (hi - lo) / 2 * (0.35 + 0.65 * np.sin(math.pi * np.linspace(0, 1, n)) ** 0.4)
    r_hi = mid + half + _ragged(rng, n, rough)
    r_lo = np.maximum(np.minimum(mid - half + _ragged(rng, n, rough), r_hi - px(1.0)), px(0.3))
    poly = np.concatenate([v.xy(r_hi, th), v.xy(r_lo, th)[::-1]])
    scene.cuts.append(("gap", poly, {}))
    return poly


def _calcium_tear(scene: Scene, rng, v: Vessel) -> np.ndarray:
    """A knife tear dragged by a calcium fragment: from the inner edge of the calcified arc out through the wall
    into the tissue, 40-200 um long, 3-15 um wide at the wall, tapering to ~1 um, jagged (heading drifts
    ~0.07 rad and the path zigzags ~0.8 um per 3-6 um step, each edge jitters ~30 % of the width)."""
    px = scene.px
    th0, span, r_in, r_out = v.calc_arc
    t = th0 + span * rng.uniform(0.1, 0.9)
    start = v.xy(max(r_in - px(1.0), px(0.3)), t)
    radial = v.xy(r_out, t) - v.xy(r_in, t)
    head = math.atan2(radial[1], radial[0]) + rng.normal(0, 0.35)
    length, step = px(rng.uniform(40, 200)), px(rng.uniform(3, 6))
    n = int(length / step) + 2
    heads = head + np.cumsum(rng.normal(0, 0.07, n))
    heads[0] = head
    d = np.stack([np.cos(heads), np.sin(heads)], 1)
    nrm = np.stack([-d[:, 1], d[:, 0]], 1)
    pts = start + np.concatenate([[[0.0, 0.0]], np.cumsum(step * d[:-1], 0)])
    pts[1:] += nrm[1:] * rng.normal(0, px(0.8), (n - 1, 1))  # zigzag
    s = np.linspace(0, 1, n)
    w = np.maximum(px(rng.uniform(3, 15)) * (1 - s) ** 0.8, px(0.8))
    jag = lambda: np.clip(1 + rng.normal(0, 0.3, (n, 1)), 0.5, 1.5)  # noqa: E731
    poly = np.concatenate([pts + nrm * (w[:, None] / 2) * jag(), (pts - nrm * (w[:, None] / 2) * jag())[::-1]])
    scene.cuts.append(("gap", poly, {}))
    return poly


def _knife_chatter(scene: Scene, rng, v: Vessel) -> np.ndarray:
    """Knife chatter: parallel bands (period 6-15 um, one angle) of tissue 30-55 % paler, alternating with
    normal tissue, over a lobed oval patch 100-300 um across (at least 1.3x the vessel) centred on the vessel."""
    px = scene.px
    rx = max(px(rng.uniform(50, 150)), 1.3 * v.ro)
    ry = max(rx * rng.uniform(0.65, 1.0), 1.3 * v.ro)
    harm = np.stack([rng.uniform(0, 0.06, 3), rng.uniform(0, TWO_PI, 3)], 1)
    prm = {"cx": v.cx, "cy": v.cy, "rx": rx, "ry": ry, "patch_angle": rng.uniform(0, math.pi), "harm": harm,
           "band_angle": rng.uniform(0, math.pi), "period": px(rng.uniform(6, 15)), "amp": rng.uniform(0.3, 0.55),
           "phase": rng.uniform(0, TWO_PI), "wave_amp": rng.uniform(0.1, 0.6), "wave_len": px(rng.uniform(80, 250)),
           "wave_phase": rng.uniform(0, TWO_PI)}
    th = np.linspace(0, TWO_PI, 120, endpoint=False)
    rho = 1 + sum(a * np.cos(k * th + ph) for k, (a, ph) in enumerate(harm, start=2))
    x, y = rx * rho * np.cos(th), ry * rho * np.sin(th)
    ca, sa = math.cos(prm["patch_angle"]), math.sin(prm["patch_angle"])
    poly = np.stack([v.cx + x * ca - y * sa, v.cy + x * sa + y * ca], 1)
    scene.cuts.append(("chatter", poly, prm))
    return poly


# ----------------------------------------------------------------------------------------------- scene
VESSEL_KINDS = ("capillary", "arteriole", "venule", "small_artery")
_SPAWN = {  # finding -> (kind, outer diameter range um, compartment) of a vessel spawned to carry it
    # (without a subcutis, "fat" means anywhere in the dermis)
    "medial_calcification": ("arteriole", (40, 110), "fat"),
    "small_vessel_calcification": ("capillary", (10, 40), "fat"),
    "thrombosis": ("venule", (30, 90), "fat"),
    "vasculitis": ("venule", (20, 60), "any"),
    "intimal_fibrosis": ("arteriole", (40, 100), "fat"),
}


def _eligible(finding: str, v: Vessel, mpp: float, subcutis: bool = True) -> bool:
    d = 2 * v.ro * mpp
    if finding in ("medial_calcification", "intimal_fibrosis"):
        return v.kind in ("arteriole", "small_artery") and d >= 30
    if finding == "small_vessel_calcification":  # without fat: any dermal vessel without a medial calcium arc
        where = v.compartment == "fat" if subcutis else "medial_calcification" not in v.findings
        return where and v.kind in ("capillary", "arteriole") and 9 <= d <= 40
    if finding == "thrombosis":
        return v.kind in ("arteriole", "small_artery", "venule") and v.rl * mpp >= 9
    if finding == "vasculitis":
        return v.kind in ("venule", "capillary", "arteriole") and 12 <= d <= 80 and not v.findings
    return False


class _Builder:
    """Places tissue, vessels, cells, lesions, confounders and artifacts into a Scene."""

    def __init__(self, size: int, mpp: float, ss: np.random.SeedSequence, labels: dict, artifacts: bool,
                 subcutis: bool = True):
        self.rng = rng = np.random.default_rng(ss)
        self.sc = sc = Scene(size, mpp)
        self.size, self.mpp, self.labels, self.artifacts = size, mpp, labels, artifacts
        self.subcutis = subcutis
        px = sc.px
        self.style = self._style()
        if artifacts and rng.random() < 0.25:
            sc.border = (int(rng.integers(4)), int(min(px(rng.uniform(25, 100)), 0.04 * size)))
        self.lay = self._layout()
        n_lr = -(-size // LR_DS) + 1
        self.edge_noise = smooth_noise(rng, (n_lr, n_lr), px(120.0) / LR_DS) * px(rng.uniform(20, 60))
        self.derm_noise = smooth_noise(rng, (n_lr, n_lr), px(150.0) / LR_DS) * px(rng.uniform(15, 45))
        stain_var = 1.0 + smooth_noise(rng, (n_lr, n_lr), px(400.0) / LR_DS) * rng.uniform(0.03, 0.1)
        n_mr = -(-size // MR_DS) + 1
        ang = math.atan2(self.lay.uy, self.lay.ux) + rng.normal(0, 0.2)
        coll = collagen_field(rng, (n_mr, n_mr), mpp * MR_DS, ang)
        mid = np.clip(0.5 + 0.22 * smooth_noise(rng, (n_mr, n_mr), px(1.5) / MR_DS), 0, 1)
        self.fields = {"layout": self.lay, "edge_noise": self.edge_noise, "derm_noise": self.derm_noise,
                       "stain_var": stain_var.astype(np.float32), "coll": coll, "mid": mid.astype(np.float32),
                       "seed": int(rng.integers(2**31)), "style": self.style}
        yy, xx = np.mgrid[0:n_lr, 0:n_lr].astype(np.float32) * LR_DS + LR_DS / 2
        f, _, _ = self.lay.fields(xx, yy, self.edge_noise)
        self.lr_tissue = (f > 0).astype(np.uint8)
        self.area_mm2 = float(self.lr_tissue.sum()) * (LR_DS * mpp / 1000) ** 2
        self.af = float(np.clip(self.area_mm2 / 2.2, 0.05, 8.0))
        self.drawn: set[str] = set()

    # -- helpers
    def _style(self) -> dict:
        rng = self.rng

        def jitter(vec):
            v = np.clip(vec + rng.normal(0, 0.025, 3), 0.02, None)
            return (v / np.linalg.norm(v)).astype(np.float32)

        white = np.clip(255 * rng.uniform(0.93, 1.0) * (1 + rng.normal(0, 0.012, 3)), 200, 255)
        ink = ("green", "blue", "black")[int(rng.choice(3, p=[0.45, 0.35, 0.2]))]
        return {"h_vec": jitter(H_OD), "e_vec": jitter(E_OD), "h_scale": rng.uniform(0.75, 1.3),
                "e_scale": rng.uniform(0.7, 1.3), "white": white.astype(np.float32),
                "glass_od": np.clip(rng.uniform(0.01, 0.05) + rng.normal(0, 0.008, 3), 0, None).astype(np.float32),
                "fold_gain": rng.uniform(0.7, 1.0), "ink": INK_OD[ink], "ink_name": ink,
                "jpeg_quality": int(rng.integers(80, 93))}

    def _layout(self) -> Layout:
        rng, size, px = self.rng, self.size, self.sc.px
        ang = int(rng.integers(4)) * math.pi / 2 + rng.uniform(-0.3, 0.3)
        ux, uy = math.cos(ang), math.sin(ang)
        hw, hh = rng.uniform(0.3, 0.42) * size, rng.uniform(0.28, 0.4) * size
        margin = 0.05 * size + (self.sc.border[1] if self.sc.border else 0)
        ex, ey = abs(ux) * hw + abs(uy) * hh, abs(uy) * hw + abs(ux) * hh
        k = min(1.0, (size / 2 - margin) / ex, (size / 2 - margin) / ey)
        hw, hh, ex, ey = hw * k, hh * k, ex * k, ey * k
        cx = size / 2 + rng.uniform(-1, 1) * max(size / 2 - margin - ex, 0)
        cy = size / 2 + rng.uniform(-1, 1) * max(size / 2 - margin - ey, 0)
        epidermis = bool(rng.random() < 0.6) or not self.subcutis  # a shave / shallow punch has its epidermis
        epi = min(px(rng.uniform(50, 90)), 0.15 * hh) if epidermis else 0.0
        lay = Layout(cx, cy, ux, uy, hw, hh, px(rng.uniform(0, 30)), px(rng.uniform(400, 1500)),
                     rng.uniform(0, TWO_PI), epidermis, epi, min(px(rng.uniform(8, 18)), 0.3 * epi),
                     px(rng.uniform(5, 14)), px(rng.uniform(60, 130)), rng.uniform(0, TWO_PI),
                     epi + 2 * hh * rng.uniform(0.18, 0.42), self.sc.border, size)
        if not self.subcutis:  # dermis down to the deep cut edge (depth ~2 hh)
            lay.derm_px, lay.subcutis = 2 * hh, False
        return lay

    def at(self, x, y):
        """(f, depth, dermis limit) at level-0 points."""
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        f, depth, _ = self.lay.fields(x, y, sample_points(self.edge_noise, LR_DS, x, y))
        if not self.lay.subcutis:
            return f, depth, np.full_like(depth, np.inf)
        return f, depth, self.lay.derm_px + sample_points(self.derm_noise, LR_DS, x, y)

    def slab_points(self, n: int, d0: float, d1: float) -> np.ndarray:
        s = self.rng.uniform(-self.lay.half_w, self.lay.half_w, n)
        d = self.rng.uniform(d0, d1, n)
        return np.stack(self.lay.to_xy(s, d), 1)

    def far_from_vessels(self, p: np.ndarray, pad: float) -> np.ndarray:
        ok = np.ones(len(p), bool)
        for v in self.sc.vessels:
            ok &= np.hypot(p[:, 0] - v.cx, p[:, 1] - v.cy) > v.ro + v.cuff + pad
        return ok

    # -- anatomy
    def septa(self) -> None:
        """Fibrous septa between fat lobules: edges of a coarse Voronoi of lobule centres."""
        from scipy.spatial import Voronoi

        rng, lay, px = self.rng, self.lay, self.sc.px
        if not self.subcutis:
            self.septa_segs = []
            return
        spacing = px(rng.uniform(280, 520))
        d0, d1 = lay.derm_px, 2 * lay.half_h + spacing
        ss, dd = np.meshgrid(np.arange(-lay.half_w - spacing, lay.half_w + 2 * spacing, spacing),
                             np.arange(d0 - spacing, d1 + spacing, spacing))
        pts = np.stack([ss.ravel(), dd.ravel()], 1) + rng.uniform(-0.35, 0.35, (ss.size, 2)) * spacing
        self.septa_segs = []
        if len(pts) < 4:
            return
        vor = Voronoi(pts)
        for a, b in vor.ridge_vertices:
            if a < 0 or b < 0:
                continue
            p0, p1 = vor.vertices[a], vor.vertices[b]
            if max(p0[1], p1[1]) < d0 or min(p0[1], p1[1]) > 2 * lay.half_h + 10:
                continue
            t = np.linspace(0, 1, 6)[:, None]
            q = p0 + t * (p1 - p0)
            q[1:-1] += rng.normal(0, 0.05 * np.linalg.norm(p1 - p0), (4, 2))
            xy = np.stack(lay.to_xy(q[:, 0], np.maximum(q[:, 1], d0 - px(20))), 1)
            self.septa_segs.append((xy, px(rng.uniform(6, 28))))

    def _place(self, kind: str, d_um: float, where: str) -> Vessel | None:
        rng, px, lay = self.rng, self.sc.px, self.lay
        ro = px(d_um) / 2
        if kind == "capillary":
            rl = ro - px(rng.uniform(1.0, 1.6))
        elif kind == "venule":
            rl = ro - px(rng.uniform(2.0, 5.0))
        elif kind == "arteriole":
            rl = ro * (1 - rng.uniform(0.3, 0.45))
        else:
            rl = ro * (1 - rng.uniform(0.22, 0.35))
        rl = max(rl, px(1.5))
        if where == "fat" and not self.subcutis:
            where = "any"
        for _ in range(40):
            if where != "dermis" and self.septa_segs and kind != "capillary" and rng.random() < 0.7:
                seg, w = self.septa_segs[int(rng.integers(len(self.septa_segs)))]
                i = int(rng.integers(len(seg) - 1))
                p = seg[i] + rng.random() * (seg[i + 1] - seg[i]) + rng.normal(0, w / 3, 2)
            elif where == "dermis":
                p = self.slab_points(1, lay.epi_px + ro + px(15), lay.derm_px)[0]
            elif where == "fat":
                p = self.slab_points(1, lay.derm_px, 2 * lay.half_h)[0]
            else:
                p = self.slab_points(1, lay.epi_px + ro + px(15), 2 * lay.half_h)[0]
            f, depth, dlim = self.at([p[0]], [p[1]])
            if f[0] < ro + px(15) or depth[0] < lay.epi_px + ro + px(10):
                continue
            comp = "fat" if depth[0] >= dlim[0] else "dermis"
            if where in ("fat", "dermis") and comp != where:
                continue
            if not self.far_from_vessels(p[None], ro + px(20))[0]:
                continue
            amp = 0.12 if kind == "venule" else 0.04
            harm = np.stack([rng.uniform(0, amp, 3) / np.arange(1, 4), rng.uniform(0, TWO_PI, 3)], 1)
            asp = rng.uniform(0.45, 0.95) if kind == "venule" else rng.uniform(0.65, 1.0)
            v = Vessel(len(self.sc.vessels), kind, comp, float(p[0]), float(p[1]), ro, rl, asp,
                       rng.uniform(0, TWO_PI), harm)
            self.sc.vessels.append(v)
            return v
        return None

    def vessels(self) -> None:
        rng = self.rng
        n = max(int(round(rng.uniform(15, 40) * self.af)), 3)
        sizes = {"capillary": (6, 12), "arteriole": (20, 100), "venule": (20, 80), "small_artery": (100, 300)}
        for kind in rng.choice(VESSEL_KINDS, n, p=[0.35, 0.3, 0.25, 0.1]):
            lo, hi = sizes[kind]
            where = "any" if kind in ("capillary", "venule") else ("fat" if rng.random() < 0.8 else "any")
            d = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
            if kind == "small_artery" and not self.subcutis:  # small arteries run in the subcutis
                kind, d = "arteriole", d / 3  # a deep-dermal arteriole, 33-100 um, instead
            self._place(str(kind), d, where)

    def assign_lesions(self) -> None:
        rng, mpp = self.rng, self.mpp
        for name in ("medial_calcification", "small_vessel_calcification", "thrombosis", "vasculitis",
                     "intimal_fibrosis"):
            if not self.labels.get(name):
                continue
            k = max(int(round(rng.uniform(2, 6) * min(self.af, 4.0))), 1)
            pool = [v for v in self.sc.vessels if _eligible(name, v, mpp, self.subcutis)]
            if name == "thrombosis":  # calcified vessels are often the occluded ones
                calcified = [v for v in pool if v.findings]
                rng.shuffle(calcified)
                pool = calcified[: k // 2] + [v for v in pool if not v.findings]
                chosen = pool[: k // 2] + list(rng.permutation(np.array(pool[k // 2 :], dtype=object)))
            else:
                chosen = list(rng.permutation(np.array(pool, dtype=object)))
            chosen = chosen[:k]
            for _ in range(30):
                if len(chosen) >= k:
                    break
                kind, (lo, hi), where = _SPAWN[name]
                d = float(rng.uniform(lo, hi))
                if name == "small_vessel_calcification" and d >= 15:
                    kind = "arteriole"
                v = self._place(kind, d, where)
                if v is not None:
                    chosen.append(v)
            for v in chosen:
                if name == "vasculitis":
                    v.cuff = self.sc.px(rng.uniform(12, 28))
                if name == "small_vessel_calcification":  # a wall thick enough to see the deposit
                    v.ro = max(v.ro, self.sc.px(rng.uniform(7.0, 14.0)))
                    v.rl = max(min(v.rl, v.ro - self.sc.px(rng.uniform(2.5, 4.0))), self.sc.px(1.5))
                v.findings.append(name)
        n_cuffs = max(int(round(rng.uniform(1, 4) * min(self.af, 4.0))), 1)
        normal = [v for v in self.sc.vessels if not v.findings and v.kind != "small_artery"]
        self.cuffed = list(rng.permutation(np.array(normal, dtype=object)))[:n_cuffs]
        for v in self.cuffed:
            v.cuff = self.sc.px(rng.uniform(10, 30))

    def draw_vessels(self) -> None:
        rng, emit = self.rng, set(self.labels)
        allow_fibro = self.labels.get("intimal_fibrosis", None) != 0
        for v in self.sc.vessels:
            F = set(v.findings)
            fibro = allow_fibro and (("medial_calcification" in F and rng.random() < 0.4)
                                     or ("small_vessel_calcification" in F and rng.random() < 0.3))
            if fibro and "intimal_fibrosis" in emit and "intimal_fibrosis" not in F:
                v.findings.append("intimal_fibrosis")
            hyaline = not F and v.kind == "arteriole" and rng.random() < 0.15
            packed = not F and v.kind == "venule" and rng.random() < 0.25
            draw_vessel(self.sc, rng, v, emit, hyaline=hyaline, packed=packed, fibroplasia=fibro)
        for v in self.cuffed:
            self.sc.artifacts.append(("perivascular_infiltrate", lymphocytic_cuff(self.sc, rng, v)))

    def adipocytes(self) -> None:
        """Voronoi adipocytes (50-150 um) in the fat; cells near vessels and septa are left as stroma."""
        from scipy.spatial import Voronoi

        rng, lay, sc, px = self.rng, self.lay, self.sc, self.sc.px
        self.cells = []
        if not self.subcutis:
            return
        sp = px(rng.uniform(62, 95))
        ss, dd = np.meshgrid(np.arange(-lay.half_w - sp, lay.half_w + sp, sp * 0.93),
                             np.arange(lay.derm_px - 2 * sp, 2 * lay.half_h + 2 * sp, sp * 0.93))
        seeds = np.stack([ss.ravel(), dd.ravel()], 1) + rng.uniform(-0.42, 0.42, (ss.size, 2)) * sp
        xy = np.stack(lay.to_xy(seeds[:, 0], seeds[:, 1]), 1)
        if len(xy) < 4:
            return
        f, depth, dlim = self.at(xy[:, 0], xy[:, 1])
        keep = (depth >= dlim) & (f > -0.3 * sp) & self.far_from_vessels(xy, px(4) + 0.25 * sp)
        for seg, w in self.septa_segs:
            for a, b in zip(seg[:-1], seg[1:]):
                ab = b - a
                t = np.clip(((xy - a) @ ab) / max(ab @ ab, 1e-9), 0, 1)
                keep &= np.hypot(*(xy - a - t[:, None] * ab).T) > w / 2 + 0.1 * sp
        vor = Voronoi(xy)
        rmax, memb = 0.8 * sp, px(0.7)
        necro = getattr(self, "necrosis_regions", [])
        whites, ghosts = [], []
        for i in np.flatnonzero(keep):
            region = vor.regions[vor.point_region[i]]
            if not region or -1 in region:
                continue
            poly = vor.vertices[region] - xy[i]
            r = np.linalg.norm(poly, axis=1, keepdims=True)
            poly = poly * np.minimum(1.0, rmax / np.maximum(r, 1e-6)) * np.maximum(0, 1 - memb / np.maximum(r, 1e-6))
            poly = chaikin(chaikin(poly)) + xy[i]
            ghost = any(math.hypot(xy[i, 0] - c[0], xy[i, 1] - c[1]) < rr for c, rr in necro)
            (ghosts if ghost else whites).append(poly)
            self.cells.append(poly)
        order = np.argsort([p[:, 1].mean() for p in whites]) if whites else []
        for j in range(0, len(order), 40):
            batch = [whites[k] for k in order[j : j + 40]]
            sc.fill("E", batch, 0.0)
            sc.fill("H", batch, 0.0)
        for p in ghosts:
            sc.fill("E", p, 0.2, 0.4, "mid")
            sc.fill("H", p, 0.05)
        # a few flat adipocyte nuclei pressed against the membrane
        for poly in self.cells:
            if rng.random() < 0.05:
                k = int(rng.integers(len(poly)))
                d = poly[(k + 1) % len(poly)] - poly[k]
                sc.ellipses("nuc", poly[k, 0], poly[k, 1], px(4.5), px(1.1), math.degrees(math.atan2(d[1], d[0])),
                            1.6)
        for seg, w in self.septa_segs:
            sc.line("E", seg, 0.38, w, slope=0.8, src="coll")
            sc.line("H", seg, 0.08, w)
            n = int(np.linalg.norm(np.diff(seg, axis=0), axis=1).sum() * w / px(22) ** 2) + 1
            i = rng.integers(0, len(seg) - 1, n)
            t = rng.random((n, 1))
            d = seg[i + 1] - seg[i]
            p = seg[i] + t * d + rng.normal(0, w / 4, (n, 2))
            spindles(self.sc, rng, p[:, 0], p[:, 1], np.degrees(np.arctan2(d[:, 1], d[:, 0])))

    def dermis_and_epidermis(self) -> None:
        rng, lay, sc, px = self.rng, self.lay, self.sc, self.sc.px
        ux_deg = math.degrees(math.atan2(lay.uy, lay.ux))
        area = 2 * lay.half_w * max(lay.derm_px - lay.epi_px, 0)
        p = self.slab_points(int(area / px(24) ** 2), lay.epi_px + px(4), lay.derm_px + px(40))
        f, depth, dlim = self.at(p[:, 0], p[:, 1])
        ok = (f > px(3)) & (depth < dlim) & self.far_from_vessels(p, px(3))
        if not self.subcutis:  # dermal necrosis: no fibroblast nuclei left in it
            for c, r in getattr(self, "necrosis_regions", []):
                ok &= np.hypot(p[:, 0] - c[0], p[:, 1] - c[1]) > r
        p = p[ok]
        spindles(sc, rng, p[:, 0], p[:, 1], ux_deg + rng.normal(0, 25, len(p)), (1.0, 1.5))
        q = p[rng.random(len(p)) < 0.06]
        lymphocytes(sc, rng, q[:, 0], q[:, 1])
        if not lay.epidermis:
            return
        s = rng.uniform(-lay.half_w, lay.half_w, int(2 * lay.half_w * lay.epi_px / px(8.5) ** 2))
        lim = lay.epi_px + lay.ridge_amp * np.sin(TWO_PI * s / lay.ridge_lambda + lay.ridge_phase)
        d = lay.corneum_px + px(2) + rng.random(len(s)) * (lim - lay.corneum_px - px(4))
        x, y = lay.to_xy(s, d)
        f, _, _ = self.at(x, y)
        ok = f > px(3)
        basal = (d > lim - px(10))[ok]
        x, y = x[ok], y[ok]
        n = len(x)
        a = px(rng.uniform(2.8, 4.0, n)) * np.where(basal, 1.2, 1.0)
        b = a * np.where(basal, 0.55, rng.uniform(0.6, 0.9, n))
        ang = np.where(basal, ux_deg + 90, rng.uniform(0, 180, n))
        sc.ellipses("nuc", x, y, a, b, ang, np.where(basal, rng.uniform(1.5, 1.9, n), rng.uniform(0.9, 1.4, n)))

    def confounders_and_optional(self) -> None:
        """Basophilic debris outside vessels (every slide), then optional extravascular findings."""
        rng, sc, px, lay = self.rng, self.sc, self.sc.px, self.lay
        n = max(int(round(rng.uniform(2, 5) * min(self.af, 4.0))), 1)
        for _ in range(n * 20):
            if n == 0:
                break
            r = px(rng.uniform(12, 45))
            edge = rng.random() < 0.5
            p = self.slab_points(1, lay.epi_px + r, lay.derm_px if not edge and lay.derm_px > lay.epi_px + 3 * r
                                 else 2 * lay.half_h)[0]
            f, _, _ = self.at([p[0]], [p[1]])
            if (edge and not (0.3 * r < f[0] < r + px(40))) or (not edge and f[0] < r) or \
                    not self.far_from_vessels(p[None], r + px(10))[0]:
                continue
            sc.artifacts.append(("debris", debris(sc, rng, p[0], p[1], r)))
            n -= 1
        if self.labels.get("extravascular_calcification") and not self.subcutis:
            self._dermal_calcification()
        if self.labels.get("extravascular_calcification") and self.cells:
            k = max(int(round(rng.uniform(2, 6) * min(self.af, 4.0))), 1)
            for i in rng.choice(len(self.cells), min(k, len(self.cells)), replace=False):
                poly = self.cells[int(i)]
                m = len(poly)
                j0, span = int(rng.integers(m)), int(m * rng.uniform(0.25, 0.7))
                arc = poly[(j0 + np.arange(span)) % m]
                thick = px(rng.uniform(1.2, 2.5))
                sc.line("C", arc, 2.3, thick, slope=1.2, src="mid")
                g = arc[rng.integers(0, len(arc), len(arc))] + rng.normal(0, thick, (len(arc), 2))
                granules(sc, rng, g[:, 0], g[:, 1], r_um=(0.6, 1.8))
                sc.lesions.append(("extravascular_calcification", stroke_outline(arc, thick + px(5))))
        for c, r in getattr(self, "necrosis_regions", []):
            area = math.pi * r * r
            th = np.linspace(0, TWO_PI, 40, endpoint=False)
            rr = r * (1 + 0.08 * np.sin(3 * th + rng.uniform(0, TWO_PI)))
            poly = np.stack([c[0] + rr * np.cos(th), c[1] + rr * np.sin(th)], 1)
            if not self.subcutis:  # ischaemic dermal necrosis: smudged hypereosinophilic collagen, feathered edge
                for k, (e, slope) in enumerate(((0.62, 0.6), (0.7, 0.5), (0.78, 0.4))):
                    ring_k = c + (poly - c) * (1 - 0.12 * k)
                    sc.fill("E", ring_k, e, slope, "coll")
                    sc.fill("H", ring_k, 0.13)
            pts = points_in_poly(rng, poly, int(area / px(14) ** 2))
            nuclear_dust(sc, rng, pts[:, 0], pts[:, 1])
            pts = points_in_poly(rng, poly, int(area / px(45) ** 2))
            histiocytes(sc, rng, pts[:, 0], pts[:, 1], foamy=self.subcutis)
            pts = points_in_poly(rng, poly, int(area / px(55) ** 2))
            neutrophils(sc, rng, pts[:, 0], pts[:, 1])
            sc.lesions.append(("necrosis", poly))

    def _dermal_calcification(self) -> None:
        """Extravascular calcification without fat: clusters of calcified, fragmented elastic fibres in the
        dermis (pseudoxanthoma-elasticum-like change): 8-25 curly basophilic fibres 10-35 um long, 1-2 um
        thick, in a patch 30-80 um across (less in a thin specimen); one lesion polygon (hull + 5 um) each."""
        rng, sc, px, lay = self.rng, self.sc, self.sc.px, self.lay
        k = max(int(round(rng.uniform(2, 6) * min(self.af, 4.0))), 1)
        for _ in range(k * 30):
            if k == 0:
                break
            r = min(px(rng.uniform(15, 40)), 0.15 * lay.half_h)
            c = self.slab_points(1, lay.epi_px + r + px(20), 2 * lay.half_h)[0]
            if self.at([c[0]], [c[1]])[0][0] < r + px(10) or not self.far_from_vessels(c[None], r + px(5))[0]:
                continue
            ends = []
            for _ in range(int(rng.integers(8, 26))):
                p0 = c + rng.normal(0, r / 2, 2)
                n = int(rng.integers(4, 9))
                head = rng.uniform(0, TWO_PI) + np.cumsum(rng.normal(0, 0.6, n))
                step = px(rng.uniform(10, 35)) / n
                pts = p0 + np.concatenate([[[0, 0]], np.cumsum(step * np.stack([np.cos(head), np.sin(head)], 1), 0)])
                thick = px(rng.uniform(1.0, 2.0))
                sc.line("C", pts, 2.2, thick, slope=1.2, src="mid")
                g = pts[rng.integers(0, len(pts), n)] + rng.normal(0, thick, (n, 2))
                granules(sc, rng, g[:, 0], g[:, 1], r_um=(0.5, 1.2))
                ends.append(pts)
            hull = cv2.convexHull(np.concatenate(ends).astype(np.float32)).reshape(-1, 2).astype(np.float64)
            m = hull.mean(0)
            d = np.linalg.norm(hull - m, axis=1, keepdims=True)
            sc.lesions.append(("extravascular_calcification", m + (hull - m) * (1 + px(5.0) / np.maximum(d, 1e-6))))
            k -= 1

    def plan_necrosis(self) -> None:
        rng, px, lay = self.rng, self.sc.px, self.lay
        self.necrosis_regions = []
        if not self.labels.get("necrosis"):
            return
        k = max(int(round(rng.uniform(1, 2.5) * min(self.af, 4.0))), 1)
        for _ in range(k * 30):
            if len(self.necrosis_regions) >= k:
                break
            r = min(px(rng.uniform(100, 250)), 0.12 * self.size)
            if not self.subcutis:  # no fat to necrose: ischaemic necrosis of the dermis
                p = self.slab_points(1, lay.epi_px + r * 0.5, 2 * lay.half_h)[0]
                if self.at([p[0]], [p[1]])[0][0] > r * 0.8:
                    self.necrosis_regions.append((p, r))
                continue
            p = self.slab_points(1, lay.derm_px + r * 0.5, 2 * lay.half_h)[0]
            f, depth, dlim = self.at([p[0]], [p[1]])
            if f[0] > r * 0.8 and depth[0] > dlim[0]:
                self.necrosis_regions.append((p, r))

    def artifacts_pass(self) -> None:
        """Pen marks (mostly on glass by the tissue), a fold, a blurred patch, the black border."""
        rng, sc, px, size = self.rng, self.sc, self.sc.px, self.size
        if sc.border is not None:
            side, w = sc.border
            rect = {0: [(0, 0), (size, 0), (size, w), (0, w)], 1: [(size - w, 0), (size, 0), (size, size), (size - w, size)],
                    2: [(0, size - w), (size, size - w), (size, size), (0, size)], 3: [(0, 0), (w, 0), (w, size), (0, size)]}
            sc.artifacts.append(("border", np.array(rect[side], float)))
        if not self.artifacts:
            return
        outside = cv2.distanceTransform((1 - self.lr_tissue) * 255, cv2.DIST_L2, 5) * LR_DS
        inside = cv2.distanceTransform(self.lr_tissue * 255, cv2.DIST_L2, 5) * LR_DS
        if rng.random() < 0.45:
            for _ in range(int(rng.integers(1, 4))):
                on_tissue = rng.random() < 0.25
                zone = (inside > 0) & (inside < px(150)) if on_tissue else (outside > px(40)) & (outside < px(400))
                if sc.border is not None:
                    zone &= self._lr_off_border()
                ys, xs = np.nonzero(zone)
                if not len(xs):
                    continue
                j = int(rng.integers(len(xs)))
                p = np.array([xs[j], ys[j]], float) * LR_DS + LR_DS / 2
                head, pts = rng.uniform(0, TWO_PI), [p]
                step = px(rng.uniform(25, 60))
                for _ in range(int(rng.integers(6, 25))):
                    head += rng.normal(0, 0.18)
                    p = p + step * np.array([math.cos(head), math.sin(head)])
                    pts.append(p)
                pts = np.array(pts)
                width = min(px(rng.uniform(60, 220)), 0.08 * size)
                sc.line("P", pts, rng.uniform(0.6, 1.1), width)
                sc.artifacts.append(("pen_mark", stroke_outline(pts, width)))
                self.drawn.add("pen_mark")
        if rng.random() < 0.3:
            ys, xs = np.nonzero((inside > 0) & (inside < px(200)))
            if len(xs):
                j = int(rng.integers(len(xs)))
                c = np.array([xs[j], ys[j]], float) * LR_DS + LR_DS / 2
                a = rng.uniform(0, math.pi)
                d = np.array([math.cos(a), math.sin(a)])
                n = np.array([-d[1], d[0]])
                L, W = min(px(rng.uniform(300, 1000)), 0.4 * size) / 2, px(rng.uniform(30, 150)) / 2
                rect = np.array([c - L * d - W * n, c + L * d - W * n, c + L * d + W * n, c - L * d + W * n])
                sc.fill("D", rect, 1.0)
                sc.artifacts.append(("fold", rect))
                self.drawn.add("fold")
        if rng.random() < 0.3:
            ys, xs = np.nonzero(inside > px(60))
            if len(xs):
                j = int(rng.integers(len(xs)))
                c = np.array([xs[j], ys[j]], float) * LR_DS + LR_DS / 2
                rx, ry = (min(px(rng.uniform(100, 350)), 0.2 * size) for _ in range(2))
                sigma = min(px(rng.uniform(1.5, 4.0)), 12.0)
                sc.blurs.append((c[0], c[1], rx, ry, sigma))
                sc.margin = max(sc.margin, int(3 * sigma) + 8)
                th = np.linspace(0, TWO_PI, 48, endpoint=False)
                sc.artifacts.append(("blur", np.stack([c[0] + rx * np.cos(th), c[1] + ry * np.sin(th)], 1)))
                self.drawn.add("blur")

    def _lr_off_border(self) -> np.ndarray:
        n = self.lr_tissue.shape[0]
        side, w = self.sc.border
        idx = (np.arange(n) + 0.5) * LR_DS
        band = idx < w + LR_DS if side in (0, 3) else idx > self.size - w - LR_DS
        ok = np.ones((n, n), bool)
        if side in (0, 2):
            ok[band, :] = False
        else:
            ok[:, band] = False
        return ok


def build_scene(size: int, mpp: float, ss: np.random.SeedSequence, labels: dict, artifacts: bool, *,
                subcutis: bool = True, calcium_p: float = 0.0):
    """Everything one slide draws, plus the fields the renderer needs and the artifacts drawn.

    Calcium artifacts (probability calcium_p per calcified vessel) draw from their own stream, the child of
    `ss` with spawn key word CALCIUM_STREAM (made directly, so `ss` spawns nothing): the rest of the scene is
    the same whatever calcium_p is, and calcium_p = 0 draws nothing from it.
    """
    b = _Builder(size, mpp, ss, labels, artifacts, subcutis)
    b.septa()
    b.vessels()
    b.assign_lesions()
    b.plan_necrosis()
    b.adipocytes()
    b.draw_vessels()
    b.dermis_and_epidermis()
    b.confounders_and_optional()
    b.artifacts_pass()
    if calcium_p > 0:
        child = np.random.SeedSequence(ss.entropy, spawn_key=(*ss.spawn_key, CALCIUM_STREAM))
        calcium_artifacts(b.sc, np.random.default_rng(child), calcium_p)
    b.sc.finalize()
    return b.sc, b.fields, b.drawn
