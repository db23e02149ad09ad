"""Artifacts of slide making, drawn into a Scene with the kind and polygon of each in scene.artifacts (or
scene.calcium_artifacts): marker pen, folds, a blurred patch, the black scanner border, and the sectioning
artifacts of calcium (holes, tears, knife chatter) that a calcium-artifact classifier must learn to tell apart.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from calciscope.data.phantom.fields import LR_DS
from calciscope.data.phantom.geometry import TWO_PI, Vessel, stroke_outline
from calciscope.data.phantom.raster import Scene

CALCIUM_ARTIFACT_KINDS = ("hole", "tear", "chatter")
CALCIUM_STREAM = 0xCA1C1A  # spawn-key word of the calcium-artifact random stream (see scene.build_scene)


# ----------------------------------------------------------------------------------------------- slide artifacts
def border_artifact(scene: Scene) -> None:
    """The polygon of the black scanner border (drawn by the renderer), when the scene has one."""
    if scene.border is None:
        return
    size = scene.size
    side, w = scene.border
    rect = {0: [(0, 0), (size, 0), (size, w), (0, w)], 1: [(size - w, 0), (size, 0), (size, size), (size - w, size)],
            2: [(0, size - w), (size, size - w), (size, size), (0, size)], 3: [(0, 0), (w, 0), (w, size), (0, size)]}
    scene.artifacts.append(("border", np.array(rect[side], float)))


def slide_artifacts(scene: Scene, rng: np.random.Generator, lr_tissue: np.ndarray) -> set[str]:
    """Pen marks (mostly on glass by the tissue), a fold, a blurred patch, each by chance; the kinds drawn.

    `lr_tissue` is the tissue mask (uint8 0/1) at downsample LR_DS.
    """
    drawn = set()
    outside_px = cv2.distanceTransform((1 - lr_tissue) * 255, cv2.DIST_L2, 5) * LR_DS
    inside_px = cv2.distanceTransform(lr_tissue * 255, cv2.DIST_L2, 5) * LR_DS
    if rng.random() < 0.45 and pen_marks(scene, rng, inside_px, outside_px):
        drawn.add("pen_mark")
    if rng.random() < 0.3 and fold(scene, rng, inside_px):
        drawn.add("fold")
    if rng.random() < 0.3 and blurred_patch(scene, rng, inside_px):
        drawn.add("blur")
    return drawn


def pen_marks(scene: Scene, rng: np.random.Generator, inside_px: np.ndarray, outside_px: np.ndarray) -> int:
    """1-3 marker strokes 60-220 um wide, each starting on the tissue within 150 um of its edge (1 in 4) or on
    the glass 40-400 um from it; returns how many were drawn. inside_px / outside_px: distance (level-0 px) into
    / out of the tissue, at downsample LR_DS."""
    px, size = scene.px, scene.size
    n_drawn = 0
    for _ in range(int(rng.integers(1, 4))):
        on_tissue = rng.random() < 0.25
        zone = (inside_px > 0) & (inside_px < px(150)) if on_tissue else (outside_px > px(40)) & (outside_px < px(400))
        if scene.border is not None:
            zone &= _lr_off_border(scene, inside_px.shape[0])
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
        scene.line("P", pts, rng.uniform(0.6, 1.1), width)
        scene.artifacts.append(("pen_mark", stroke_outline(pts, width)))
        n_drawn += 1
    return n_drawn


def fold(scene: Scene, rng: np.random.Generator, inside_px: np.ndarray) -> bool:
    """A fold (double thickness) 300-1000 um long, 30-150 um wide, centred within 200 um of the tissue edge."""
    px, size = scene.px, scene.size
    ys, xs = np.nonzero((inside_px > 0) & (inside_px < px(200)))
    if not len(xs):
        return False
    j = int(rng.integers(len(xs)))
    c = np.array([xs[j], ys[j]], float) * LR_DS + LR_DS / 2
    a = rng.uniform(0, math.pi)
    d = np.array([math.cos(a), math.sin(a)])
    n = np.array([-d[1], d[0]])
    L, W = min(px(rng.uniform(300, 1000)), 0.4 * size) / 2, px(rng.uniform(30, 150)) / 2
    rect = np.array([c - L * d - W * n, c + L * d - W * n, c + L * d + W * n, c - L * d + W * n])
    scene.fill("D", rect, 1.0)
    scene.artifacts.append(("fold", rect))
    return True


def blurred_patch(scene: Scene, rng: np.random.Generator, inside_px: np.ndarray) -> bool:
    """An out-of-focus oval 200-700 um across, somewhere over 60 um inside the tissue."""
    px, size = scene.px, scene.size
    ys, xs = np.nonzero(inside_px > px(60))
    if not len(xs):
        return False
    j = int(rng.integers(len(xs)))
    c = np.array([xs[j], ys[j]], float) * LR_DS + LR_DS / 2
    rx, ry = (min(px(rng.uniform(100, 350)), 0.2 * size) for _ in range(2))
    sigma = min(px(rng.uniform(1.5, 4.0)), 12.0)
    scene.blurs.append((c[0], c[1], rx, ry, sigma))
    scene.margin = max(scene.margin, int(3 * sigma) + 8)
    th = np.linspace(0, TWO_PI, 48, endpoint=False)
    scene.artifacts.append(("blur", np.stack([c[0] + rx * np.cos(th), c[1] + ry * np.sin(th)], 1)))
    return True


def _lr_off_border(scene: Scene, n: int) -> np.ndarray:
    """(n, n) mask at downsample LR_DS, False on the black border's band."""
    side, w = scene.border
    idx = (np.arange(n) + 0.5) * LR_DS
    band = idx < w + LR_DS if side in (0, 3) else idx > scene.size - w - LR_DS
    ok = np.ones((n, n), bool)
    if side in (0, 2):
        ok[band, :] = False
    else:
        ok[:, band] = False
    return ok


# ----------------------------------------------------------------------------------------------- calcium artifacts
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

