"""Cost of vessel analysis relative to grid-only predict, measured side by side in one run.

For each phantom size: the same slide scored by ``predict`` with ``--vessels none`` (grid only) and with the demo
segmenter and vessel classifier (segmentation, instances, measurement, compartments, a crop per vessel and faint
outline through the classifier, adequacy, QC, vessels.geojson / vessels.csv and the report's vessel section), each in a fresh process so peak RSS is its own
(VmHWM of the main process). Prints seconds, the ratio, the vessel stage's own seconds, vessel counts and RSS.
Warm-up: one untimed run of each in its process before the timed one (imports, first-call costs).

    python benchmarks/bench_vessels.py [--sizes 4096 8192] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from calciscope.data.synthetic import generate_slide

FINDINGS = {"medial_calcification": 1, "small_vessel_calcification": 1, "thrombosis": 1, "vasculitis": 0}

_CHILD = """
import json, sys, time
from calciscope.inference.predict import PredictConfig, Predictor
vessels, workers = sys.argv[3], int(sys.argv[4])
predictor = Predictor("demo", PredictConfig(workers=workers, saliency="none", vessels=vessels,
                                            sampling=None if vessels != "none" else "grid"))
predictor.predict_and_write(sys.argv[1], sys.argv[2] + "/warm")
start = time.perf_counter()
result = predictor.predict_and_write(sys.argv[1], sys.argv[2] + "/timed")
seconds = time.perf_counter() - start
hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
v = result.vessels
print(json.dumps({"seconds": seconds, "n_tiles": result.n_tiles, "peak_rss_mb": hwm_kb / 1024,
                  "vessel_seconds": None if v is None else v.seconds,
                  "n_vessels": None if v is None else len(v.vessels)}))
"""


def run(slide: Path, out: Path, vessels: str, workers: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(slide), str(out), vessels, str(workers)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for size in args.sizes:
            slide = generate_slide(work, f"bench_{size}", FINDINGS, size_px=size, seed=4242).path
            grid = run(slide, work / f"grid_{size}", "none", args.workers)
            full = run(slide, work / f"vessels_{size}", "auto", args.workers)
            print(f"{size}² phantom ({size * 0.5 / 1000:.1f} mm square), {grid['n_tiles']} grid tiles, "
                  f"{full['n_vessels']} vessels:")
            print(f"  predict, grid only        {grid['seconds']:7.2f} s   peak RSS {grid['peak_rss_mb']:7.0f} MB")
            print(f"  predict, vessel analysis  {full['seconds']:7.2f} s   peak RSS {full['peak_rss_mb']:7.0f} MB   "
                  f"(vessel stage {full['vessel_seconds']:.2f} s)")
            print(f"  ratio with/without vessels: time {full['seconds'] / grid['seconds']:.2f}, "
                  f"peak RSS {full['peak_rss_mb'] / grid['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
