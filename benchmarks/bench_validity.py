"""Validity of a model on unseen, biopsy-sized phantoms: slide AUROC and ECE per finding and for the CUA pattern,
and vessel detection, from ``predict`` itself, on slides drawn from a seed no recipe uses.

Issue 22's bars, measured here rather than in the test-suite (100 slides of 4096² take tens of minutes on 2 cores):
slide AUROC ≥ 0.95 and slide ECE ≤ 0.05 (10 equal-width bins) per finding and for the CUA pattern, on ≥ 100
biopsy-sized (≥ 4096², 2 × 2 mm at 0.5 µm/px) phantoms; vessel recall and precision ≥ 0.9 (a true vessel is found at
IoU ≥ 0.5 or, under 20 µm, by a centroid within 4 µm; IoU-only recall beside it).

    python benchmarks/bench_validity.py [--model demo] [--n-slides 100] [--size 4096] [--seed 424242]
                                        [--style random|classic] [--out DIR]

The phantoms are kept in ``--out`` (default: a temporary folder) with ``validity.json`` (every figure and each slide's
probabilities), so a second model can be measured on the very same slides with ``--reuse``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from calciscope.data.synthetic import generate_dataset
from calciscope.data.vessels.match import match_vessels
from calciscope.data.vessels.truth import read_vessels
from calciscope.inference.predict import PredictConfig, Predictor
from calciscope.model.cua import CUARule, cua_score
from calciscope.training.metrics import binary_metrics
from calciscope.training.sources import read_manifest

SEED = 424_242  # no recipe in configs/ uses it
ECE_BINS = 10


def measure(model: str, manifest: Path) -> dict:
    """Per-slide probabilities, CUA scores and vessel matches of ``predict`` on every slide of ``manifest``."""
    predictor = Predictor(model, PredictConfig(workers=2, saliency="none", top_k=0))
    labels = predictor.labels
    records = read_manifest(manifest, labels, need_labels=True)
    probs, cua, truth_y = [], [], []
    n_true = n_found = n_pairs = n_iou = 0
    start = time.perf_counter()
    for i, record in enumerate(records, 1):
        result = predictor.predict(record.path)
        probs.append([result.probabilities[k] for k in labels])
        cua.append(result.cua.get("score") or 0.0)
        truth_y.append(record.labels)
        if result.vessels is not None and record.vessels is not None:
            truth = read_vessels(record.vessels)
            m = match_vessels([v.polygon for v in result.vessels.vessels], [v.polygon for v in truth],
                              result.slide.mpp)
            n_true, n_found, n_pairs, n_iou = n_true + m.n_true, n_found + m.n_detected, n_pairs + len(m.pairs), \
                n_iou + m.n_pairs_iou
        if i % 10 == 0 or i == len(records):
            print(f"  {i}/{len(records)} slides, {time.perf_counter() - start:.0f} s", flush=True)
    y, p = np.array(truth_y, float), np.array(probs, float)
    rule = CUARule.from_dict(predictor.card.cua_rule)
    cua_truth = (cua_score(y, rule, labels=labels) > 0.5).astype(int)
    out = {"model": model, "n_slides": len(records), "labels": labels, "per_finding": {}, "slides": {
        "ids": [r.slide_id for r in records], "probabilities": p.tolist(), "cua": cua}}
    for j, k in enumerate(labels):
        out["per_finding"][k] = _figures(y[:, j].astype(int), p[:, j])
    out["cua_pattern"] = _figures(cua_truth, np.array(cua))
    if n_true:
        out["vessels"] = {"true": n_true, "listed": n_found, "recall": n_pairs / n_true,
                          "precision": n_pairs / n_found if n_found else None, "recall_iou": n_iou / n_true}
    return out


def _figures(y: np.ndarray, p: np.ndarray) -> dict:
    m = binary_metrics(y, p, n_bins=ECE_BINS)
    return {"positives": int(y.sum()), "auroc": m["auroc"], "ece": m["ece"], "brier": m["brier"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--n-slides", type=int, default=100)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--style", default="random", choices=("random", "classic"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--reuse", action="store_true", help="score the phantoms already in --out")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="calciscope-validity-"))
    manifest = out / "manifest.csv"
    if not (args.reuse and manifest.is_file()):
        print(f"drawing {args.n_slides} phantoms of {args.size}² (seed {args.seed}, style {args.style}) in {out}")
        manifest = generate_dataset(out, args.n_slides, size_px=args.size, seed=args.seed, style=args.style)
    report = measure(args.model, manifest)
    report["phantoms"] = {"n": args.n_slides, "size_px": args.size, "seed": args.seed, "style": args.style}
    (out / "validity.json").write_text(json.dumps(report, indent=2))
    print(f"\n{args.model} on {report['n_slides']} unseen {args.size}² phantoms (seed {args.seed}, {args.style}):")
    print(f"{'finding':28s} {'positives':>9s} {'AUROC':>7s} {'ECE':>7s}   bars: AUROC >= 0.95, ECE <= 0.05")
    for name, m in [*report["per_finding"].items(), ("CUA pattern", report["cua_pattern"])]:
        print(f"{name:28s} {m['positives']:9d} {m['auroc']:7.3f} {m['ece']:7.3f}")
    if "vessels" in report:
        v = report["vessels"]
        print(f"vessels: {v['listed']} listed / {v['true']} true: recall {v['recall']:.3f} (IoU only "
              f"{v['recall_iou']:.3f}), precision {v['precision']:.3f}   bars: >= 0.9")
    print(out / "validity.json")


if __name__ == "__main__":
    main()
