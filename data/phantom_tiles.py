"""Labelled tiles cut from phantom slides: a tile folder of the same form as the second renderer's (tile_phantom),
so one generator's tiles can train a model and the other's test it.

Tiles are centred (within 10 um) on every vessel of a slide (three times on one with findings), on every
confounder outline (debris, perivascular cuffs) and on `random_per_slide` tissue points. A tile is positive for a
finding when its lesion polygons cover at least min(400 um^2, half of that lesion's area) of it, negative when they
do not touch it; a tile in between is left out, so every label has the finding plainly in the tile or plainly
absent.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import cv2
import numpy as np

from calciscope.data.slides import open_slide
from calciscope.errors import CalciscopeError

FINDINGS = ("medial_calcification", "small_vessel_calcification", "thrombosis", "vasculitis")
MIN_AREA_UM2 = 400.0  # about a 20 um square: a finding you can point at, not a sliver of a cuff


def _features(path: Path) -> list[tuple[str, np.ndarray, float]]:
    """(class name, outer ring px, area px^2) of each polygon of a phantom GeoJSON."""
    out = []
    for f in json.loads(Path(path).read_text())["features"]:
        ring = np.asarray(f["geometry"]["coordinates"][0], np.float64)
        out.append((f["properties"]["classification"]["name"], ring, abs(cv2.contourArea(ring.astype(np.float32)))))
    return out


def _centres(rng, slide_dir: Path, row: dict, size0: int, random_per_slide: int, per_lesion: int) -> np.ndarray:
    stem = Path(row["path"]).name[: -len(".tiff")]
    vessels = json.loads((slide_dir / f"{stem}.vessels.geojson").read_text())["features"]
    pts = [np.asarray(f["geometry"]["coordinates"][0], np.float64).mean(0)
           for f in vessels for _ in range(per_lesion if f["properties"]["findings"] else 1)]
    arts = slide_dir / f"{stem}.artifacts.geojson"
    if arts.is_file():
        pts += [ring.mean(0) for name, ring, _ in _features(arts) if name in ("debris", "perivascular_infiltrate")]
    mask = cv2.imread(str(slide_dir / f"{stem}.tissue.png"), cv2.IMREAD_UNCHANGED)
    if mask is not None and random_per_slide:
        ys, xs = np.nonzero(mask > 0)
        if len(xs):
            j = rng.integers(0, len(xs), random_per_slide)
            ds = size0 / mask.shape[1]
            pts += list(np.stack([xs[j] + 0.5, ys[j] + 0.5], 1) * ds)
    return np.asarray(pts, np.float64).reshape(-1, 2)


def _labels(lesions, x0: float, y0: float, side0: float, mpp0: float) -> list[int] | None:
    """0/1 per finding for the level-0 square (x0, y0, side0), or None when a lesion only grazes it."""
    n = int(round(side0 * mpp0))  # a 1 um raster
    out = []
    for name in FINDINGS:
        covered, ambiguous = False, False
        for cls, ring, area in lesions:
            if cls != name or ring[:, 0].max() < x0 or ring[:, 0].min() > x0 + side0 or \
                    ring[:, 1].max() < y0 or ring[:, 1].min() > y0 + side0:
                continue
            mask = np.zeros((n, n), np.uint8)
            cv2.fillPoly(mask, [np.round((ring - (x0, y0)) * mpp0 * 4).astype(np.int32)], 1, cv2.LINE_8, 2)
            inside = float(mask.sum())  # um^2
            need = min(MIN_AREA_UM2, 0.5 * area * mpp0**2)
            covered |= inside >= need
            ambiguous |= 0 < inside < need
        if ambiguous and not covered:
            return None
        out.append(int(covered))
    return out


def cut_phantom_tiles(manifest, out_dir, *, mpp: float = 1.0, tile_px: int = 112, random_per_slide: int = 8,
                      per_lesion: int = 3, seed: int = 0) -> Path:
    """Cut labelled tiles from the phantoms of a ``generate_dataset`` manifest into out_dir/tiles/; write
    ``tiles.csv`` (path, patient_id, one 0/1 column per finding) and return its path. A vessel with findings gives
    `per_lesion` tiles, each centred within 10 um of it."""
    manifest = Path(manifest)
    rows = list(csv.DictReader(open(manifest, newline="")))
    if not rows:
        raise CalciscopeError(f"{manifest}: no slides")
    out = Path(out_dir)
    (out / "tiles").mkdir(parents=True, exist_ok=True)
    table = []
    for k, row in enumerate(rows):
        rng = np.random.default_rng([int(seed), k])
        path = manifest.parent / row["path"]
        with open_slide(path) as slide:
            size0, mpp0 = slide.dimensions[0], slide.mpp
            side0 = int(round(tile_px * mpp / mpp0))
            lesions = _features(manifest.parent / row["annotations"])
            for j, (cx, cy) in enumerate(_centres(rng, manifest.parent, row, size0, random_per_slide, per_lesion)):
                cx, cy = np.array([cx, cy]) + rng.uniform(-10, 10, 2) / mpp0
                x0 = int(np.clip(cx - side0 / 2, 0, size0 - side0))
                y0 = int(np.clip(cy - side0 / 2, 0, slide.dimensions[1] - side0))
                labels = _labels(lesions, x0, y0, side0, mpp0)
                if labels is None:
                    continue
                rgb = slide.read_region((x0, y0), 0, (side0, side0))
                rgb = cv2.resize(rgb, (tile_px, tile_px), interpolation=cv2.INTER_AREA)
                name = f"tiles/{row['slide_id']}_{j:04d}.png"
                cv2.imwrite(str(out / name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
                table.append([name, row["patient_id"], *labels])
    return _write_table(out / "tiles.csv", ["path", "patient_id", *FINDINGS], table)


def _write_table(csv_path: Path, header: list[str], rows: list) -> Path:
    """Write a CSV whole or not at all (a temporary file renamed into place)."""
    tmp = csv_path.with_name(csv_path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    os.replace(tmp, csv_path)
    return csv_path


def cut_phantom_tile_sets(manifests, out_dir, seeds, **kwargs) -> Path:
    """``cut_phantom_tiles`` for each manifest (into out_dir/<its folder name>/, with its seed: one seed for all or
    one per manifest) and one ``out_dir/tiles.csv`` over all of them, in manifest order: paths relative to out_dir,
    patient ids prefixed ``<seed>_`` so patients of different phantom sets never merge. The training recipe of a
    tile model on several phantom sets (``calciscope phantom-tiles``)."""
    manifests = [Path(m) for m in manifests]
    seeds = [int(s) for s in seeds] or [0]
    if len(seeds) == 1:
        seeds = seeds * len(manifests)
    if not manifests or len(seeds) != len(manifests):
        raise CalciscopeError(f"phantom tiles: {len(manifests)} manifests and {len(seeds)} seeds; give one seed, or "
                              f"one per manifest")
    names = [m.parent.name for m in manifests]
    if len(set(names)) != len(names):
        raise CalciscopeError(f"phantom tiles: two manifests in folders of one name ({', '.join(names)}); each set "
                              f"is written to out/<folder name>/")
    out = Path(out_dir)
    rows = []
    for manifest, seed, name in zip(manifests, seeds, names):
        with open(cut_phantom_tiles(manifest, out / name, seed=seed, **kwargs), newline="") as fh:
            rows += [{**row, "path": f"{name}/{row['path']}", "patient_id": f"{seed}_{row['patient_id']}"}
                     for row in csv.DictReader(fh)]
    if not rows:
        raise CalciscopeError(f"phantom tiles: no tile in {', '.join(map(str, manifests))}")
    return _write_table(out / "tiles.csv", list(rows[0]), [list(r.values()) for r in rows])
