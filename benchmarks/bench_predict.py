"""predict against the floor of its networks, a biopsy-sized slide, memory against slide size, and saliency cost,
measured side by side in one run (the machine's load average is printed with each part: on a shared machine, compare
only figures from one run).

1. Forward-only floor: every network ``predict`` runs, on the data of one slide already in memory, in predict's own
   precision and batch sizes: the tile model on the grid tiles (normalise, forward, calibrated sigmoid), the vessel
   segmenter on its tissue windows, the vessel classifier on every outline it judges and the calcium-artifact
   classifier on the listed vessels. ``predict`` end to end (tissue mask, grid, decoding, tile QC, segmentation,
   instance cutting, measurement, crops, classifiers, aggregation, CUA score, every output file; saliency off), with
   the vessel stage on (the default) and off (``--vessels none``): ratio = floor seconds ÷ predict seconds, target
   ≥ 0.85 with the vessel stage on (off: the floor is the tile model alone).
2. A biopsy-sized phantom (``--biopsy``, default 12288² at 0.5 µm/px: 6.1 mm square): ``predict`` seconds per slide
   with its default settings (saliency included), target ≤ 15 s on 2 cores.
3. Peak memory of ``predict`` with its default settings, each size in a fresh process: the proportional set size
   (PSS, so pages a decoding worker shares with the main process count once) of the main process plus its decoding
   workers, sampled every 0.1 s; target ≤ 1.2× for 4× the area.
4. Saliency cost per top tile: guided Grad-CAM, Grad-CAM and integrated gradients.

    python benchmarks/bench_predict.py [--model demo|CHECKPOINT_DIR|resnet18] [--size 8192] [--biopsy 12288]
        [--rss-sizes 8192 16384 24576] [--repeats 2] [--workdir DIR] [--skip rss saliency]

``--model resnet18`` builds a randomly initialised resnet18 at 224 px / 0.5 µm/px (the speed of a typical real
model; its outputs are meaningless; it has no vessel stage). Phantoms are kept in ``--workdir`` between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import openslide
import tifffile
import torch

from calciscope.data.slides import open_slide
from calciscope.data.synthetic import TILE_PX, generate_slide
from calciscope.data.tiling import make_grid
from calciscope.data.tissue import detect_tissue
from calciscope.inference.predict import PredictConfig, Predictor
from calciscope.inference.saliency import saliency_maps
from calciscope.model import ModelCard, create_model, save_checkpoint
from calciscope.model.segmenter import plan_windows, read_window, run_windows
from calciscope.model.vessel_classifier import classifier_logits, crop_geometry, read_crop, vessel_extras
from calciscope.model.vessel_detection import detect_vessels

FINDINGS = {"medial_calcification": 1, "small_vessel_calcification": 1, "thrombosis": 1, "vasculitis": 0}
MAX_DRAWN = 16384  # the largest phantom side drawn directly (see ``phantom``)

_RSS_CHILD = """
import json, os, sys, threading, time
from calciscope.inference.predict import PredictConfig, Predictor

def pss_kb(pid):
    try:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0

def children(pid):
    try:
        return [int(c) for t in os.listdir(f"/proc/{pid}/task")
                for c in open(f"/proc/{pid}/task/{t}/children").read().split()]
    except OSError:
        return []

peak = {"total": 0, "main": 0, "workers": 0}
stop = threading.Event()

def sample():
    me = os.getpid()
    while not stop.is_set():
        main, workers = pss_kb(me), sum(pss_kb(c) for c in children(me))
        if main + workers > peak["total"]:
            peak.update(total=main + workers, main=main, workers=workers)
        stop.wait(0.1)

predictor = Predictor(sys.argv[1], PredictConfig())
thread = threading.Thread(target=sample, daemon=True)
thread.start()
start = time.perf_counter()
result = predictor.predict_and_write(sys.argv[2], sys.argv[3])
seconds = time.perf_counter() - start
stop.set()
thread.join()
hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
v = result.vessels
print(json.dumps({"n_tiles": result.n_tiles, "seconds": seconds, "peak_pss_mb": peak["total"] / 1024,
                  "main_pss_mb": peak["main"] / 1024, "workers_pss_mb": peak["workers"] / 1024,
                  "main_hwm_mb": hwm_kb / 1024, "n_vessels": None if v is None else len(v.vessels),
                  "peak_map_rows": None if v is None or v.maps is None else v.maps.peak_rows}))
"""


def load() -> str:
    return "load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())


def resolve_model(name: str, work: Path) -> str:
    if name != "resnet18":
        return name
    labels = list(FINDINGS)
    torch.manual_seed(0)
    model = create_model("resnet18", labels).eval()
    card = ModelCard(name="bench-resnet18", labels=labels, backbone="resnet18", tile_px=224, mpp=0.5)
    return str(save_checkpoint(work / "resnet18", model, card))


def phantom(work: Path, size: int) -> Path:
    """A size² phantom at 0.5 µm/px (kept in ``work``). Above ``MAX_DRAWN`` px the phantom generator cannot draw one
    (an OpenCV limit of 32767 samples in its texture fields), so it is a 2 × 2 mosaic of size/2 phantoms (seeds 1-4):
    the same tissue density, four times the area."""
    path = work / f"bench_{size}.tiff"
    if not path.is_file():
        if size <= MAX_DRAWN:
            generate_slide(work, f"bench_{size}", FINDINGS, size_px=size, seed=1)
        else:
            quarters = [generate_slide(work / f"q{size}", f"q{i}", FINDINGS, size_px=size // 2, seed=i).path
                        for i in range(1, 5)]
            mosaic(quarters, path, size)
    return path


def mosaic(quarters: list[Path], path: Path, size: int, mpp: float = 0.5) -> None:
    """Write a size² tiled JPEG pyramid (as the phantom generator writes them) from four size/2 slides, row-major."""
    half = size // 2
    slides = [openslide.OpenSlide(str(q)) for q in quarters]

    def tiles():
        for y in range(0, size, TILE_PX):
            for x in range(0, size, TILE_PX):
                q = slides[2 * (y >= half) + (x >= half)]
                region = q.read_region((x % half, y % half), 0, (TILE_PX, TILE_PX))
                yield np.ascontiguousarray(np.asarray(region)[..., :3])

    level1 = np.zeros((size // 4, size // 4, 3), np.uint8)
    for i, q in enumerate(slides):
        y, x = divmod(i, 2)
        level1[y * half // 4 : (y + 1) * half // 4, x * half // 4 : (x + 1) * half // 4] = \
            np.asarray(q.read_region((0, 0), 1, (half // 4, half // 4)))[..., :3]
    opts = dict(tile=(TILE_PX, TILE_PX), photometric="rgb", compression="jpeg", compressionargs={"level": 90},
                resolutionunit="CENTIMETER", metadata=None)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(tiles(), shape=(size, size, 3), dtype=np.uint8, subfiletype=0, resolution=(1e4 / mpp, 1e4 / mpp),
                  **opts)
        prev = level1
        tif.write(level1, subfiletype=1, resolution=(1e4 / (mpp * 4), 1e4 / (mpp * 4)), **opts)
        for ds in (16, 64):
            n = size // ds
            prev = cv2.resize(prev[: n * 4, : n * 4], (n, n), interpolation=cv2.INTER_AREA)
            tif.write(prev, subfiletype=1, resolution=(1e4 / (mpp * ds), 1e4 / (mpp * ds)), **opts)
    for q in slides:
        q.close()


def timed(run) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of ``run()``: CPU time of this process's threads and of the worker processes that
    ended meanwhile (predict's decoding workers end with each slide). On a loaded machine CPU time moves less."""
    t0, start = os.times(), time.perf_counter()
    run()
    wall, t1 = time.perf_counter() - start, os.times()
    cpu = t1.user - t0.user + t1.system - t0.system + t1.children_user - t0.children_user \
        + t1.children_system - t0.children_system
    return wall, cpu


def best(run, repeats: int) -> float:
    """The shortest wall time of ``repeats`` calls of ``run()``."""
    return min(timed(run)[0] for _ in range(repeats))


def floor_jobs(predictor: Predictor, path: Path) -> tuple[dict, dict]:
    """The forward passes ``predict`` runs on ``path``, as jobs on its data decoded into memory first: the tile
    model on the grid tiles, the segmenter on its windows, the classifiers on their crops; and the counts."""
    cfg, stage = predictor.config, predictor.vessel_stage
    counts = {"n_windows": 0, "n_crops": 0}
    with open_slide(path) as slide:
        mask = detect_tissue(slide)
        grid = make_grid(slide, mask, predictor.tiling)
        tiles = torch.from_numpy(np.stack([grid.read(slide, i) for i in range(len(grid))]).transpose(0, 3, 1, 2).copy())
        counts["n_tiles"] = len(grid)
        jobs = {"tiles": lambda: [predictor.score_tiles(tiles[i : i + cfg.batch_size])
                                  for i in range(0, len(tiles), cfg.batch_size)]}
        if stage.segmenter is None:
            return jobs, counts
        seg, seg_card = stage.segmenter
        plan = plan_windows(slide, seg_card, mask)
        windows = np.stack([read_window(slide, plan, x, y) for x, y in plan.windows()])
        batch = stage.vessel_config.window_batch
        jobs["segmenter"] = lambda: [run_windows(seg, seg_card, windows[i : i + batch], stage.precision)
                                     for i in range(0, len(windows), batch)]
        counts["n_windows"] = len(windows)
        judged = []
        if stage.vessel_classifier is not None:
            at = stage.vessel_classifier[1].candidate_min_mean_probability
            vessels, candidates, _ = detect_vessels(slide, mask, seg, seg_card, stage.vessel_config, at,
                                                    precision=stage.precision)
            judged.append((stage.vessel_classifier, vessels + candidates))
        if stage.artifact_classifier is not None:
            judged.append((stage.artifact_classifier, predictor.predict(path).vessels.vessels))
        inputs = []
        for (net, card), found in judged:
            crop = card.crop_config
            crops = np.stack([read_crop(slide, *crop_geometry(v.polygon, slide.mpp, crop), crop.crop_px)
                              for v in found]) if found else np.zeros((0, crop.crop_px, crop.crop_px, 3), np.uint8)
            extras = vessel_extras(np.array([v.geometry.outer_diameter_um for v in found]),
                                   np.array([v.compartment == "fat" for v in found]))
            inputs.append((net, card, crops, extras))
            counts["n_crops"] += len(found)
        jobs["classifiers"] = lambda: [classifier_logits(net, card, crops, extras, stage.vessel_config.batch_size,
                                                         stage.precision) for net, card, crops, extras in inputs]
    return jobs, counts


def throughput(model: str, path: Path, out: Path, batch_size: int, workers: int, repeats: int) -> tuple[list, dict]:
    """Per repeat, side by side: each network's forward pass on data in memory, then ``predict`` (saliency off) with
    the vessel stage on and off; (wall, CPU) seconds of each. Every predictor is warmed up first."""
    settings = dict(batch_size=batch_size, workers=workers, saliency="none")
    on = Predictor(model, PredictConfig(**settings))
    off = Predictor(model, PredictConfig(**settings, vessels="none", sampling="grid"))
    jobs, counts = floor_jobs(on, path)
    for predictor in (on, off):
        predictor.predict_and_write(path, out)
    for job in jobs.values():
        job()
    rows = []
    for _ in range(repeats):
        row = {name: timed(job) for name, job in jobs.items()}
        row["on"] = timed(lambda: on.predict_and_write(path, out))
        row["off"] = timed(lambda: off.predict_and_write(path, out))
        row["load"] = os.getloadavg()[0]
        rows.append(row)
    return rows, counts


def saliency_seconds_per_tile(predictor: Predictor, tiles: np.ndarray, method: str) -> float:
    targets = np.arange(len(tiles)) % len(predictor.labels)
    start = time.perf_counter()
    saliency_maps(predictor.tiles.model, tiles, targets, predictor.card.mean, predictor.card.std, method=method)
    return (time.perf_counter() - start) / len(tiles)


def peak_memory(model: str, path: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", _RSS_CHILD, model, str(path), str(out)], capture_output=True,
                          text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="demo, a checkpoint directory, or resnet18 (random weights)")
    parser.add_argument("--size", type=int, default=8192, help="side of the throughput phantom in pixels (0.5 µm/px)")
    parser.add_argument("--biopsy", type=int, default=12288, help="side of the biopsy-sized phantom (0: skip)")
    parser.add_argument("--rss-sizes", type=int, nargs="*", default=[8192, 16384, 24576])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=PredictConfig().workers, help="decoding workers end to end")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None, help="keeps the phantoms between runs")
    parser.add_argument("--skip", nargs="*", default=[], choices=["throughput", "biopsy", "rss", "saliency"])
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_predict_"))
    work.mkdir(parents=True, exist_ok=True)
    model = resolve_model(args.model, work)
    predictor = Predictor(model, PredictConfig(batch_size=args.batch_size, workers=0, saliency="none"))
    card = predictor.card
    print(f"model {card.name} ({card.backbone}, {card.tile_px} px at {card.mpp:g} µm/px), "
          f"{predictor.precision.describe()}, batch {args.batch_size}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs; {load()}")

    if "throughput" not in args.skip:
        rows, counts = throughput(model, phantom(work, args.size), work / "out", args.batch_size, args.workers,
                                  args.repeats)
        n = counts["n_tiles"]
        nets = [name for name in ("tiles", "segmenter", "classifiers") if name in rows[0]]
        print(f"\nphantom {args.size}²: {n} tiles, {counts['n_windows']} segmenter windows, {counts['n_crops']} "
              f"vessel crops; {args.workers} decoding workers; side by side, {args.repeats} repeats "
              f"(wall s / CPU s; ratio = forward only ÷ predict)")
        for r, row in enumerate(rows, start=1):
            floor = [sum(row[k][i] for k in nets) for i in (0, 1)]
            parts = ", ".join(f"{k} {row[k][0]:.2f}" for k in nets)
            print(f"  repeat {r} (load {row['load']:.1f}): forward only {floor[0]:6.2f} / {floor[1]:6.2f} ({parts}); "
                  f"predict, vessel stage on {row['on'][0]:6.2f} / {row['on'][1]:6.2f}: ratio {floor[0] / row['on'][0]:.2f}"
                  f" / {floor[1] / row['on'][1]:.2f}; off {row['off'][0]:6.2f} / {row['off'][1]:6.2f}: ratio "
                  f"{row['tiles'][0] / row['off'][0]:.2f} / {row['tiles'][1] / row['off'][1]:.2f}")
        fastest = {k: min(row[k][0] for row in rows) for k in [*nets, "on", "off"]}
        floor = sum(fastest[k] for k in nets)
        print(f"  best of {args.repeats}: forward only {floor:.2f} s ({n / fastest['tiles']:.0f} tiles/s for the tile "
              f"model alone); predict, vessel stage on {fastest['on']:.2f} s ({n / fastest['on']:.1f} tiles/s): "
              f"ratio {floor / fastest['on']:.2f} (target ≥ 0.85); off {fastest['off']:.2f} s: ratio "
              f"{fastest['tiles'] / fastest['off']:.2f}")

    if args.biopsy and "biopsy" not in args.skip:
        biopsy = phantom(work, args.biopsy)
        default = Predictor(model, PredictConfig())
        result = default.predict_and_write(biopsy, work / "out")  # warm-up
        runs = [timed(lambda: default.predict_and_write(biopsy, work / "out")) for _ in range(args.repeats)]
        side_mm = args.biopsy * 0.5 / 1000
        print(f"\nbiopsy phantom {args.biopsy}² ({side_mm:.1f} mm square), {result.n_tiles} tiles, "
              f"{len(result.vessels.vessels) if result.vessels else 0} vessels, default settings (saliency on): "
              f"{min(w for w, _ in runs):.1f} s per slide, best of {args.repeats} (target ≤ 15 s on 2 cores; "
              f"wall / CPU s: {', '.join(f'{w:.1f} / {c:.1f}' for w, c in runs)}); {load()}")

    if args.rss_sizes and "rss" not in args.skip:
        print(f"\npeak memory of predict (default settings, fresh process each; PSS of main + decoding workers); "
              f"{load()}")
        rows = []
        for size in args.rss_sizes:
            m = peak_memory(model, phantom(work, size), work / "rss")
            rows.append((size, m))
            print(f"  {size:6d}²: {m['peak_pss_mb']:7.1f} MB (main {m['main_pss_mb']:.1f}, workers "
                  f"{m['workers_pss_mb']:.1f}; main VmHWM {m['main_hwm_mb']:.1f}), {m['n_tiles']} tiles, "
                  f"{m['seconds']:.1f} s, peak map rows {m['peak_map_rows']}")
        base_size, base = rows[0]
        for size, m in rows[1:]:
            print(f"  {(size / base_size) ** 2:4.1f}× area: ratio {m['peak_pss_mb'] / base['peak_pss_mb']:.2f}"
                  f"{' (target ≤ 1.20)' if size == 2 * base_size else ''}")

    if "saliency" not in args.skip:
        with open_slide(phantom(work, args.size)) as slide:
            grid = make_grid(slide, detect_tissue(slide), predictor.tiling)
            tiles = np.stack([grid.read(slide, i) for i in range(min(16, len(grid)))])
        guided = saliency_seconds_per_tile(predictor, tiles, "guided-gradcam")
        cam = saliency_seconds_per_tile(predictor, tiles, "gradcam")
        ig = saliency_seconds_per_tile(predictor, tiles, "ig")
        print(f"\nsaliency per top tile: guided Grad-CAM (default) {guided * 1000:.0f} ms, Grad-CAM {cam * 1000:.0f} ms, "
              f"integrated gradients (32 steps) {ig * 1000:.0f} ms; {load()}")


if __name__ == "__main__":
    main()
