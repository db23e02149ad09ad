"""The scene builder: places tissue, vessels, cells, lesions, confounders and artifacts of one phantom slide
into a Scene, drawing them with the primitives of the sibling modules. `build_scene` is the recipe.

Every step draws from one random stream in a fixed order, so the same seed gives the same slide; a step
decides *where* and *how many*, the primitive it calls decides *how it looks*.
"""

from __future__ import annotations

import math

import numpy as np

from calciscope.data.phantom.artifacts import CALCIUM_STREAM, border_artifact, calcium_artifacts, slide_artifacts
from calciscope.data.phantom.calcium import periadipocytic
from calciscope.data.phantom.cells import lymphocytes, spindles
from calciscope.data.phantom.extravascular import calcified_fibres, calcified_membrane, debris, necrosis
from calciscope.data.phantom.fields import LR_DS, MR_DS, collagen_field, sample_points, smooth_noise
from calciscope.data.phantom.geometry import TWO_PI, Vessel, chaikin
from calciscope.data.phantom.inflammation import cuff, debris_varied
from calciscope.data.phantom.layout import draw_layout
from calciscope.data.phantom.looks import LOOK_STREAM, draw_look, pick, randomise_style
from calciscope.data.phantom.raster import Scene
from calciscope.data.phantom.stain import draw_style
from calciscope.data.phantom.varied import CALCIUM, choose_looks, draw_vessel_varied
from calciscope.data.phantom.vessels import draw_vessel, lymphocytic_cuff

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
    """Whether an existing vessel (kind, size, compartment, findings so far) may carry the finding."""
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
                 subcutis: bool = True, style: str = "classic"):
        self.rng = rng = np.random.default_rng(ss)
        self.sc = sc = Scene(size, mpp)
        self.size, self.mpp, self.labels, self.artifacts = size, mpp, labels, artifacts
        self.subcutis = subcutis
        px = sc.px
        self.style = draw_style(rng)
        self.look = self.look_rng = None  # style "random": the slide's look and its own random stream
        if style == "random":
            self.look_rng = np.random.default_rng(np.random.SeedSequence(ss.entropy,
                                                                         spawn_key=(*ss.spawn_key, LOOK_STREAM)))
            self.look = draw_look(self.look_rng)
            self.style = randomise_style(self.style, self.look, self.look_rng)
        if artifacts and rng.random() < 0.25:
            sc.border = (int(rng.integers(4)), int(min(px(rng.uniform(25, 100)), 0.04 * size)))
        self.lay = draw_layout(rng, size, mpp, sc.border, subcutis)
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
        # filled in by the steps, in build_scene's order
        self.septa_segs: list[tuple[np.ndarray, float]] = []  # polyline (px), width px
        self.cuffed: list[Vessel] = []  # normal vessels given a lymphocytic cuff
        self.necrosis_regions: list[tuple[np.ndarray, float]] = []  # centre (px), radius px
        self.cells: list[np.ndarray] = []  # adipocyte outlines (px)

    # -- helpers
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
        if self.look is not None:
            self._draw_vessels_varied()
            return
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

    def _draw_vessels_varied(self) -> None:
        """Style "random": each vessel in the appearance its look picks; cuffs of the slide's kinds."""
        rng, lr, look, emit = self.rng, self.look_rng, self.look, set(self.labels)
        allow_fibro = self.labels.get("intimal_fibrosis", None) != 0
        calcified = any(self.labels.get(k) for k in CALCIUM)
        for v in self.sc.vessels:
            F = set(v.findings)
            fibro = allow_fibro and (("medial_calcification" in F and lr.random() < 0.4)
                                     or ("small_vessel_calcification" in F and lr.random() < 0.3))
            choose_looks(lr, v, look, self.mpp, calcified_slide=calcified, intimal_ok=allow_fibro)
            fibro = fibro or any(x.endswith("/intimal") for x in v.looks.values())
            if fibro and "intimal_fibrosis" in emit and "intimal_fibrosis" not in F:
                v.findings.append("intimal_fibrosis")
            draw_vessel_varied(self.sc, rng, v, emit, look, fibroplasia=fibro)
        for v in self.cuffed:
            kind = pick(lr, look["cuff"])
            v.looks["confounder"] = f"cuff/{kind}"
            self.sc.artifacts.append(("perivascular_infiltrate", cuff(self.sc, rng, v, look, kind),
                                      {"appearance": kind}))

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
        necro = self.necrosis_regions
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
            for c, r in self.necrosis_regions:
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


    # -- extravascular findings and confounders
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
            if self.look is None:
                sc.artifacts.append(("debris", debris(sc, rng, p[0], p[1], r)))
            else:
                kind = pick(self.look_rng, self.look["debris"])
                sc.artifacts.append(("debris", debris_varied(sc, rng, p[0], p[1], r, self.look, kind),
                                     {"appearance": kind}))
            n -= 1
        if self.labels.get("extravascular_calcification") and not self.subcutis:
            self._dermal_calcification()
        if self.labels.get("extravascular_calcification") and self.cells:
            k = max(int(round(rng.uniform(2, 6) * min(self.af, 4.0))), 1)
            for i in rng.choice(len(self.cells), min(k, len(self.cells)), replace=False):
                if self.look is None:
                    calcified_membrane(sc, rng, self.cells[int(i)])
                else:
                    periadipocytic(sc, rng, self.cells, int(i), self.look,
                                   pick(self.look_rng, self.look["periadipocytic"]))
        for c, r in self.necrosis_regions:
            necrosis(sc, rng, c, r, in_fat=self.subcutis)

    def _dermal_calcification(self) -> None:
        """Extravascular calcification without fat: 2-6 (per 2.2 mm2, at most 4x) clusters of calcified elastic
        fibres in the dermis, each in a patch 30-80 um across (less in a thin specimen), clear of vessels."""
        rng, sc, px, lay = self.rng, self.sc, self.sc.px, self.lay
        k = max(int(round(rng.uniform(2, 6) * min(self.af, 4.0))), 1)
        for _ in range(k * 30):
            if k == 0:
                break
            r = min(px(rng.uniform(15, 40)), 0.15 * lay.half_h)
            c = self.slab_points(1, lay.epi_px + r + px(20), 2 * lay.half_h)[0]
            if self.at([c[0]], [c[1]])[0][0] < r + px(10) or not self.far_from_vessels(c[None], r + px(5))[0]:
                continue
            calcified_fibres(sc, rng, c, r)
            k -= 1

    def plan_necrosis(self) -> None:
        """Where necrosis goes (centre, radius): in the fat, or in the dermis without a subcutis. Planned before
        the adipocytes and dermal nuclei, which leave it out; drawn in confounders_and_optional."""
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

    # -- artifacts
    def artifacts_pass(self) -> None:
        """The black border's polygon; then, when artifacts are on, pen marks, a fold, a blurred patch."""
        border_artifact(self.sc)
        if not self.artifacts:
            return
        self.drawn |= slide_artifacts(self.sc, self.rng, self.lr_tissue)


def build_scene(size: int, mpp: float, ss: np.random.SeedSequence, labels: dict, artifacts: bool, *,
                subcutis: bool = True, calcium_p: float = 0.0, style: str = "classic"):
    """Everything one slide draws, plus the fields the renderer needs and the artifacts drawn.

    Calcium artifacts (probability calcium_p per calcified vessel) draw from their own stream, the child of
    `ss` with spawn key word CALCIUM_STREAM (made directly, so `ss` spawns nothing): the rest of the scene is
    the same whatever calcium_p is, and calcium_p = 0 draws nothing from it. `style` "random" draws each finding
    and confounder in an appearance the slide's look picks (looks.draw_look, from a stream of its own as well, so
    vessels and lesions sit where they sit in "classic", the one drawing of each finding the demo model knows).
    """
    b = _Builder(size, mpp, ss, labels, artifacts, subcutis, style)
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
