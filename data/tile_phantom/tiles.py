"""Scenarios, one tile, and a labelled tile folder of the second renderer.

A tile is 112 um square (the demo tile model's field: 112 px at 1 um/px), drawn at 0.5 um/px and reduced with an
area filter. It shows one scenario (SCENARIOS): a vessel carrying a finding (with calcification, sometimes a
thrombus too), a normal vessel, a confounder, or bare tissue, with the vessel within 12 um of the centre.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import cv2
import numpy as np

from calciscope.data.tile_phantom import tissue
from calciscope.data.tile_phantom.canvas import Canvas
from calciscope.errors import CalciscopeError

FINDINGS = ("medial_calcification", "small_vessel_calcification", "thrombosis", "vasculitis")
TILE_UM = 112.0
DRAW_UM_PER_PX = 0.5
# scenario -> probability; vessel kind and outer diameter range (um) come from _VESSELS
SCENARIOS = {
    "medial_calcification": 0.13, "small_vessel_calcification": 0.13, "thrombosis": 0.13, "vasculitis": 0.13,
    "normal_arteriole": 0.08, "normal_venule": 0.07, "normal_capillary": 0.06, "cuff": 0.07, "packed": 0.06,
    "hyaline": 0.06, "debris": 0.05, "tissue": 0.03,
}
_VESSELS = {  # scenario -> (kind, outer diameter um, wall thickness as a fraction of the radius or um)
    "medial_calcification": ("arteriole", (40, 110), ("frac", 0.25, 0.42)),
    "small_vessel_calcification": ("small", (10, 35), ("um", 2.0, 4.0)),
    "thrombosis": ("venule", (25, 85), ("um", 2.0, 5.0)),
    "vasculitis": ("venule", (15, 60), ("um", 2.0, 4.5)),
    "normal_arteriole": ("arteriole", (30, 110), ("frac", 0.25, 0.42)),
    "normal_venule": ("venule", (20, 85), ("um", 2.0, 5.0)),
    "normal_capillary": ("small", (8, 30), ("um", 1.5, 3.5)),
    "cuff": ("venule", (15, 60), ("um", 2.0, 4.5)),
    "packed": ("venule", (25, 85), ("um", 2.0, 5.0)),
    "hyaline": ("arteriole", (30, 90), ("frac", 0.35, 0.5)),
    "debris": ("venule", (15, 60), ("um", 2.0, 4.5)),
}


def draw_tile(rng: np.random.Generator, scenario: str) -> tuple[np.ndarray, dict[str, int], str]:
    """One tile at DRAW_UM_PER_PX: (RGB uint8, finding -> 0/1, appearance)."""
    n = int(round(TILE_UM / DRAW_UM_PER_PX))
    cv = Canvas(n, DRAW_UM_PER_PX, rng)
    tissue.background(cv, str(rng.choice(["fat", "dermis", "septum"], p=[0.45, 0.3, 0.25])))
    labels = dict.fromkeys(FINDINGS, 0)
    if scenario == "tissue":
        if rng.random() < 0.5:
            tissue.debris(cv, None)
        return cv.rgb(), labels, "tissue"
    kind, (d0, d1), (unit, w0, w1) = _VESSELS[scenario]
    radius = float(np.exp(rng.uniform(np.log(d0), np.log(d1)))) / 2
    wall = radius * rng.uniform(w0, w1) if unit == "frac" else min(rng.uniform(w0, w1), 0.6 * radius)
    c = TILE_UM / 2 + rng.uniform(-12, 12, 2)
    vf = tissue.VesselField(cv, float(c[0]), float(c[1]), radius, wall)
    tissue.vessel(cv, vf, kind, hyaline=scenario == "hyaline")
    looks = []
    if scenario == "medial_calcification":
        looks.append(tissue.calcium_media(cv, vf))
    elif scenario == "small_vessel_calcification":
        looks.append(tissue.calcium_small_vessel(cv, vf))
    if scenario == "thrombosis" or scenario in ("medial_calcification", "small_vessel_calcification") \
            and radius - wall > 5 and rng.random() < 0.25:
        looks.append(tissue.thrombus(cv, vf))
        labels["thrombosis"] = 1
    else:
        tissue.red_cells_in_lumen(cv, vf, 0.9 if scenario == "packed" else rng.uniform(0.0, 0.4))
    if scenario == "vasculitis":
        looks.append(tissue.vasculitis(cv, vf))
    elif scenario == "cuff":
        tissue.cuff(cv, vf)
    elif scenario == "debris":
        tissue.debris(cv, vf)
    if scenario in FINDINGS:
        labels[scenario] = 1
    return cv.rgb(), labels, "/".join(looks) or scenario


def render_tile(seed: int, index: int, *, tile_px: int = 112, mpp: float = 1.0) -> tuple[np.ndarray, dict, str, str]:
    """Tile `index` of the set drawn with `seed`: (RGB at `mpp`, labels, scenario, appearance); deterministic."""
    rng = np.random.default_rng([int(seed), int(index), 0x7E1E])
    names = list(SCENARIOS)
    p = np.array([SCENARIOS[k] for k in names])
    scenario = names[int(rng.choice(len(names), p=p / p.sum()))]
    rgb, labels, look = draw_tile(rng, scenario)
    side = int(round(TILE_UM / mpp))
    rgb = cv2.resize(rgb, (side, side), interpolation=cv2.INTER_AREA)
    if side != tile_px:
        rgb = cv2.resize(rgb, (tile_px, tile_px), interpolation=cv2.INTER_AREA)
    return rgb, labels, scenario, look


def write_tile_set(out_dir, n_tiles: int, *, seed: int = 0, tile_px: int = 112, mpp: float = 1.0,
                   tiles_per_patient: int = 8) -> Path:
    """Write n_tiles PNGs under out_dir/tiles/ and ``tiles.csv`` (path, patient_id, one 0/1 column per finding:
    what ``calciscope train`` with ``source: tiles`` and ``calciscope evaluate`` read); ``appearance.csv`` beside
    it says each tile's scenario and appearance. Returns the tiles.csv path."""
    if not isinstance(n_tiles, (int, np.integer)) or n_tiles < 1:
        raise CalciscopeError(f"n_tiles must be an integer >= 1, got {n_tiles!r}")
    out = Path(out_dir)
    (out / "tiles").mkdir(parents=True, exist_ok=True)
    rows, info = [], []
    for i in range(int(n_tiles)):
        rgb, labels, scenario, look = render_tile(seed, i, tile_px=tile_px, mpp=mpp)
        name = f"tiles/t{i:05d}.png"
        cv2.imwrite(str(out / name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        rows.append([name, f"A{i // tiles_per_patient:05d}", *(labels[k] for k in FINDINGS)])
        info.append([name, scenario, look])
    _write_csv(out / "appearance.csv", ["path", "scenario", "appearance"], info)
    return _write_csv(out / "tiles.csv", ["path", "patient_id", *FINDINGS], rows)


def _write_csv(path: Path, header: list[str], rows: list) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    os.replace(tmp, path)
    return path
