"""predict throughput, saliency cost and memory, measured side by side in one run.

1. End-to-end ``predict`` tiles/s (tissue mask, grid, decode in workers, tile QC, forward, aggregation, CUA score,
   every output file written; saliency off) ÷ forward-only tiles/s of the same model, same batch size, same
   precision, on the same tiles already in memory as uint8: target ≥ 0.85.
2. Saliency cost per top tile: Grad-CAM and integrated gradients.
3. Peak RSS of ``predict`` (fresh process each, main process and largest decoding worker) on a phantom and on one
   with 4× the area: target ≤ 1.2×.

    python benchmarks/bench_predict.py [--model demo|CHECKPOINT_DIR|resnet18] [--size 8192] [--repeats 2]

``--model resnet18`` builds a randomly initialised resnet18 at 224 px / 0.5 µm/px (the speed of a typical real
model; its outputs are meaningless).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from calciscope.data.slides import open_slide
from calciscope.data.synthetic import generate_slide
from calciscope.data.tiling import make_grid
from calciscope.data.tissue import detect_tissue
from calciscope.inference.predict import PredictConfig, Predictor
from calciscope.inference.saliency import saliency_maps
from calciscope.model import ModelCard, create_model, save_checkpoint
from calciscope.model.precision import prepare_inputs

FINDINGS = {"medial_calcification": 1, "small_vessel_calcification": 1, "thrombosis": 1, "vasculitis": 0}

_RSS_CHILD = """
import json, resource, sys
from calciscope.inference.predict import PredictConfig, Predictor
predictor = Predictor(sys.argv[1], PredictConfig(workers=int(sys.argv[4]), batch_size=int(sys.argv[5])))
result = predictor.predict_and_write(sys.argv[2], sys.argv[3])
hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
worker_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"n_tiles": result.n_tiles, "peak_rss_mb": hwm_kb / 1024, "worker_peak_mb": worker_kb / 1024}))
"""


def resolve_model(name: str, work: Path) -> str:
    if name != "resnet18":
        return name
    labels = list(FINDINGS)
    torch.manual_seed(0)
    model = create_model("resnet18", labels).eval()
    card = ModelCard(name="bench-resnet18", labels=labels, backbone="resnet18", tile_px=224, mpp=0.5)
    return str(save_checkpoint(work / "resnet18", model, card))


def forward_only_rate(predictor: Predictor, tiles: torch.Tensor, batch_size: int, repeats: int) -> float:
    """The model's own speed: normalise + forward + sigmoid on uint8 tiles already in memory."""
    model, precision = predictor.tiles.model, predictor.precision
    best = 0.0
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            for i in range(0, len(tiles), batch_size):
                x = prepare_inputs(tiles[i : i + batch_size], predictor.tiles.mean, predictor.tiles.std, precision)
                with precision.autocast():
                    y = model(x)
                torch.sigmoid(y.float() / predictor.tiles.temperature)
            best = max(best, len(tiles) / (time.perf_counter() - start))
    return best


def end_to_end_rate(model: str, path: Path, out: Path, batch_size: int, workers: int, repeats: int) -> float:
    predictor = Predictor(model, PredictConfig(batch_size=batch_size, workers=workers, saliency="none"))
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        result = predictor.predict_and_write(path, out)
        best = max(best, result.n_tiles / (time.perf_counter() - start))
    return best


def saliency_seconds_per_tile(predictor: Predictor, tiles: np.ndarray, method: str) -> float:
    targets = np.arange(len(tiles)) % len(predictor.labels)
    start = time.perf_counter()
    saliency_maps(predictor.tiles.model, tiles, targets, predictor.card.mean, predictor.card.std, method=method)
    return (time.perf_counter() - start) / len(tiles)


def peak_rss(model: str, path: Path, out: Path, workers: int, batch_size: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", _RSS_CHILD, model, str(path), str(out), str(workers),
                           str(batch_size)], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="demo, a checkpoint directory, or resnet18 (random weights)")
    parser.add_argument("--size", type=int, default=8192, help="side of the smaller phantom in pixels (0.5 µm/px)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_predict_"))
    model = resolve_model(args.model, work)
    small = generate_slide(work, "small", FINDINGS, size_px=args.size, seed=1).path
    large = generate_slide(work, "large", FINDINGS, size_px=args.size * 2, seed=1).path

    predictor = Predictor(model, PredictConfig(batch_size=args.batch_size, workers=0))
    with open_slide(small) as slide:
        grid = make_grid(slide, detect_tissue(slide), predictor.tiling)
        tiles = np.stack([grid.read(slide, i) for i in range(len(grid))])
    chw = torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous()

    forward = forward_only_rate(predictor, chw, args.batch_size, args.repeats)
    rates = {w: end_to_end_rate(model, small, work / "out", args.batch_size, w, args.repeats) for w in (0, 1, 2)}
    guided = saliency_seconds_per_tile(predictor, tiles[:16], "guided-gradcam")
    cam = saliency_seconds_per_tile(predictor, tiles[:16], "gradcam")
    ig = saliency_seconds_per_tile(predictor, tiles[:16], "ig")
    rss_small = peak_rss(model, small, work / "rss", 2, args.batch_size)
    rss_large = peak_rss(model, large, work / "rss", 2, args.batch_size)

    card = predictor.card
    print(f"model {card.name} ({card.backbone}, {card.tile_px} px at {card.mpp:g} µm/px), "
          f"{predictor.precision.describe()}, batch {args.batch_size}, torch threads {torch.get_num_threads()}")
    print(f"phantom {args.size}²: {len(grid)} tissue tiles; best of {args.repeats}")
    print(f"forward only, tiles in memory         : {forward:8.1f} tiles/s")
    for w, rate in rates.items():
        print(f"predict end to end, {w} decode workers : {rate:8.1f} tiles/s  ratio {rate / forward:.2f} (target ≥ 0.85)")
    print(f"saliency per top tile: guided Grad-CAM (default) {guided * 1000:.0f} ms, Grad-CAM {cam * 1000:.0f} ms, "
          f"integrated gradients (32 steps) {ig * 1000:.0f} ms")
    print(f"peak RSS {args.size}²  : {rss_small['peak_rss_mb']:7.1f} MB main, {rss_small['worker_peak_mb']:.1f} MB "
          f"largest worker ({rss_small['n_tiles']} tiles)")
    print(f"peak RSS {args.size * 2}² : {rss_large['peak_rss_mb']:7.1f} MB main, {rss_large['worker_peak_mb']:.1f} MB "
          f"largest worker ({rss_large['n_tiles']} tiles)")
    print(f"RSS ratio 4× area    : {rss_large['peak_rss_mb'] / rss_small['peak_rss_mb']:.2f} (target ≤ 1.20)")


if __name__ == "__main__":
    main()
