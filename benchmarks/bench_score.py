"""score throughput with 1 and 2 worker processes, and what score costs over predict, measured side by side in one run.

1. Slides/min of ``ScoreRun`` (``calciscope score``) on the same phantom set with 1 and then 2 worker processes, each
   run into a fresh output folder: wall time of ``ScoreRun.run()``, i.e. everything (the probe model load in the
   parent, spawning the workers, each worker's imports and model load, sha256, scoring, saliency, every output file,
   summary.csv, run.json). Scaling efficiency = (rate with 2 ÷ rate with 1) ÷ 2; 1.00 is perfect.
   Each slide is decoded in the process that scores it (``workers=0`` in the settings of both runs), and the run
   splits the cores between its worker processes (torch threads = cores ÷ workers).
2. score vs predict on one slide, same settings: ``Predictor.predict_and_write`` in this process with the model
   already loaded and warm, against (a) the slide's time inside the score worker (summary.csv ``seconds``: sha256 of
   the file, resume check, predict, write; model loaded there too, but it is that process's first slide, so first-call
   costs count) and (b) the whole 1-slide ``ScoreRun``
   (adds process start, imports, the two model loads, summary.csv and run.json: a fixed cost per run).
3. With ``--onnx``: the demo model exported to ONNX; forward tiles/s on the same tiles in memory (uint8 in,
   calibrated probabilities out) in torch (its default precision, and fp32) and in onnxruntime, and predict seconds
   per slide (saliency off) with each runtime.

    python benchmarks/bench_score.py [--model demo|CHECKPOINT_DIR] [--n-slides 8] [--size 2048] [--onnx]

Figures from a shared machine are contended: compare the numbers of one run with each other, not across runs.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from calciscope.data.slides import open_slide
from calciscope.data.synthetic import generate_dataset
from calciscope.data.tiling import make_grid
from calciscope.data.tissue import detect_tissue
from calciscope.inference.batch import ScoreRun
from calciscope.inference.predict import PredictConfig, Predictor


def score_rate(manifest: Path, model: str, out: Path, workers: int, settings: dict) -> tuple[float, float, list]:
    """(seconds, slides/min, outcomes) of one ScoreRun into a fresh folder."""
    start = time.perf_counter()
    outcomes = ScoreRun(manifest, model, out, config=PredictConfig(**settings), workers=workers).run()
    seconds = time.perf_counter() - start
    failed = [o for o in outcomes if o.status != "scored"]
    if failed:
        raise SystemExit(f"bench_score: {len(failed)} slides not scored, e.g. {failed[0].slide_id}: {failed[0].error}")
    return seconds, 60 * len(outcomes) / seconds, outcomes


def one_slide_manifest(manifest: Path, work: Path) -> tuple[Path, Path]:
    row = next(csv.DictReader(open(manifest, encoding="utf-8")))
    path = (manifest.parent / row["path"]).resolve()
    single = work / "one.csv"
    single.write_text(f"slide_id,path\n{row['slide_id']},{path}\n", encoding="utf-8")
    return single, path


def forward_rate(score_tiles, tiles: torch.Tensor, batch_size: int, repeats: int) -> float:
    """Tiles/s of a Predictor's forward pass (uint8 tiles in memory -> calibrated probabilities), best of repeats."""
    score_tiles(tiles[:batch_size])  # warm-up: first-call allocations and kernel choices are not throughput
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(tiles), batch_size):
            score_tiles(tiles[i : i + batch_size])
        best = max(best, len(tiles) / (time.perf_counter() - start))
    return best


def onnx_figures(model: str, slide: Path, work: Path, settings: dict, repeats: int) -> list[str]:
    from calciscope.inference.onnx_runtime import export_onnx

    onnx_path = export_onnx(model, work / "model.onnx")
    plain = {**settings, "saliency": "none"}
    predictors = {
        "torch (default precision)": Predictor(model, PredictConfig(**plain)),
        "torch fp32": Predictor(model, PredictConfig(**plain, amp="off")),
        "onnxruntime fp32": Predictor(onnx_path, PredictConfig(**plain, runtime="onnxruntime")),
    }
    first = next(iter(predictors.values()))
    with open_slide(slide) as s:
        grid = make_grid(s, detect_tissue(s), first.tiling)
        tiles = np.stack([grid.read(s, i) for i in range(len(grid))])
    chw = torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous()
    lines, base = [], None
    for name, predictor in predictors.items():
        rate = forward_rate(predictor.score_tiles, chw, plain.get("batch_size", 64), repeats)
        base = base or rate
        seconds = min(_timed(predictor.predict_and_write, slide, work / "onnx_out") for _ in range(repeats))
        precision = "fp32" if predictor.precision is None else predictor.precision.describe()
        lines.append(f"{name:26s}: forward {rate:8.1f} tiles/s ({rate / base:.2f}×), predict {seconds:5.2f} s/slide "
                     f"[{precision}]")
    return [f"runtimes, {len(grid)} tiles in memory, batch {plain.get('batch_size', 64)}, saliency off, "
            f"best of {repeats}:"] + ["  " + line for line in lines]


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="demo or a checkpoint directory")
    parser.add_argument("--n-slides", type=int, default=8)
    parser.add_argument("--size", type=int, default=2048, help="phantom side in pixels (0.5 µm/px)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--saliency", default="guided-gradcam",
                        help="guided-gradcam (the default of score), gradcam, ig or none")
    parser.add_argument("--repeats", type=int, default=2, help="repeats of the one-slide and --onnx figures")
    parser.add_argument("--onnx", action="store_true", help="also compare torch and onnxruntime")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_score_"))
    manifest = generate_dataset(work / "slides", args.n_slides, size_px=args.size, seed=args.seed, artifacts=False)
    settings = {"batch_size": args.batch_size, "saliency": args.saliency, "workers": 0}

    runs = {w: score_rate(manifest, args.model, work / f"score_w{w}", w, settings) for w in (1, 2)}
    n_tiles = sum(o.n_tiles for o in runs[1][2])

    single, slide = one_slide_manifest(manifest, work)
    predictor = Predictor(args.model, PredictConfig(**settings))
    predict_s = min(_timed(predictor.predict_and_write, slide, work / "predict_out") for _ in range(args.repeats))
    in_worker, whole = [], []
    for i in range(args.repeats):
        seconds, _, outcomes = score_rate(single, args.model, work / f"score_one_{i}", 1, settings)
        whole.append(seconds)
        in_worker.append(outcomes[0].seconds)
    load_s = _timed(Predictor, args.model, PredictConfig(**settings))

    rate1, rate2 = runs[1][1], runs[2][1]
    print(f"model {predictor.card.name} ({predictor.card.backbone}, {predictor.card.tile_px} px at "
          f"{predictor.card.mpp:g} µm/px), {predictor.precision.describe()}, batch {args.batch_size}, saliency "
          f"{args.saliency}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"{args.n_slides} phantoms of {args.size}² (seed {args.seed}), {n_tiles} tissue tiles in all")
    per_slide = {w: float(np.mean([o.seconds for o in runs[w][2]])) for w in (1, 2)}
    print(f"score, 1 worker  : {runs[1][0]:6.1f} s  {rate1:6.1f} slides/min (wall time of the whole run); "
          f"{per_slide[1]:.2f} s per slide inside its worker")
    print(f"score, 2 workers : {runs[2][0]:6.1f} s  {rate2:6.1f} slides/min  speed-up {rate2 / rate1:.2f}×, "
          f"scaling efficiency {rate2 / rate1 / 2:.2f}; {per_slide[2]:.2f} s per slide inside its worker")
    print(f"one slide, best of {args.repeats}:")
    print(f"  predict_and_write, model loaded       : {predict_s:6.2f} s")
    print(f"  score, the slide inside its worker    : {min(in_worker):6.2f} s  ({min(in_worker) / predict_s:.2f}× "
          f"predict; sha256 + resume check, and the first slide of a fresh process: cold first calls)")
    print(f"  score, whole 1-slide run              : {min(whole):6.2f} s  ({min(whole) / predict_s:.2f}× predict; "
          f"fixed cost {min(whole) - predict_s:.2f} s: process start, imports, 2 model loads, summary, run.json)")
    print(f"  model load alone (Predictor(...))     : {load_s:6.2f} s")
    if args.onnx:
        for line in onnx_figures(args.model, slide, work, settings, args.repeats):
            print(line)


if __name__ == "__main__":
    main()
