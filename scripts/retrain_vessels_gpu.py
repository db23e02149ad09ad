"""Retrain the demo's vessel segmenter and vessel classifier on a GPU machine, from the repository's recipes, with
the bigger schedules a CPU cannot afford (issue 22, item 5). Nothing in calciscope depends on it: every bar is
reachable on CPU; this is the fast route when a GPU is lent.

On a bare machine with the repository and ``pip install .``:

    python scripts/retrain_vessels_gpu.py --out runs/gpu                # phantoms, segmenter, classifier
    python scripts/retrain_vessels_gpu.py --out /tmp/smoke --smoke      # the same steps, tiny, on CPU (~5 min)

What it runs, in order, each step printed with its wall time:

1. the training phantoms of ``configs/vessels.yaml``, ``configs/vessels_stage5.yaml`` and
   ``configs/vessel_classifier.yaml`` (same seeds, sizes and options), drawn in ``--style`` (default ``random``:
   the randomised phantom the demo is to be retrained on), in parallel processes;
2. ``train-vessels`` on all of them in one stage (``--steps``, default 20,000: four times stages 1-5 together),
   from a config written beside the run that is ``configs/vessels_stage5.yaml`` with its manifests, ``init`` and
   step count replaced;
3. ``train-vessel-classifier`` on its recipe's phantoms with the new segmenter's detections (``--epochs``, default
   40), from ``configs/vessel_classifier.yaml`` likewise rewritten;
4. ``calibrate-slides --grid-route vasculitis`` on 64 biopsy-sized phantoms (seed 515151, as the recipe).

The networks land in ``OUT/segmenter`` and ``OUT/classifier``, and together with the shipped tile model in
``OUT/model`` (``predict --model OUT/model``); install them with ``calciscope install-demo`` after measuring them (``benchmarks/bench_validity.py``, ``benchmarks/bench_transfer.py``). The trainers pick CUDA when
there is one and run in its precision (fp16 autocast). The wall-time target is 10 minutes of GPU time; it has not
been timed on a GPU yet (none was lent to the session that wrote it), only smoke-run on CPU.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# (folder, slides, size, seed, extra synth options): the phantom sets of the recipes named in the docstring
PHANTOMS = [
    ("vessel_phantoms", 32, 4096, 300, ["--calcium-artifacts", "0.5"]),
    ("vessel_phantoms2", 32, 4096, 301, ["--calcium-artifacts", "0.5"]),
    ("vessel_phantoms3", 24, 2048, 302, ["--calcium-artifacts", "0.5", "--prevalence",
                                         "thrombosis=0.5,vasculitis=0.5"]),
    ("demo_phantoms", 48, 4096, 100, []),
]
SLIDE_MAP = ("slide_map_biopsy", 64, 4096, 515151, [])


def run(step: str, args: list[str]) -> None:
    start = time.perf_counter()
    print(f"== {step}: {' '.join(args)}", flush=True)
    subprocess.run(args, check=True)
    print(f"   {step}: {time.perf_counter() - start:.0f} s", flush=True)


def synth(out: Path, style: str, sets, smoke: bool, jobs: int) -> dict[str, Path]:
    def one(spec):
        name, n, size, seed, extra = spec
        n, size = (min(n, 4), 2048) if smoke else (n, size)
        subprocess.run(["calciscope", "synth", "--style", style, "--out", str(out / name), "--n-slides", str(n),
                        "--size", str(size), "--seed", str(seed), *extra], check=True, stdout=subprocess.DEVNULL)
        return name, out / name / "manifest.csv"

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # each synth is its own process
        manifests = dict(pool.map(one, sets))
    print(f"== phantoms ({style}): {len(sets)} sets in {time.perf_counter() - start:.0f} s", flush=True)
    return manifests


def write_config(source: Path, target: Path, changes: dict) -> Path:
    config = yaml.safe_load(source.read_text())
    config.update(changes)
    target.write_text(yaml.safe_dump(config, sort_keys=False))
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="Run folder (phantoms, configs, networks).")
    parser.add_argument("--style", default="random", choices=["random", "classic"], help="Phantom drawing.")
    parser.add_argument("--steps", type=int, default=20_000, help="Segmenter training steps.")
    parser.add_argument("--epochs", type=int, default=40, help="Vessel classifier epochs.")
    parser.add_argument("--jobs", type=int, default=8, help="Phantom sets drawn at once.")
    parser.add_argument("--smoke", action="store_true", help="Tiny sets and schedules: check the steps on CPU.")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    steps, epochs = (20, 1) if args.smoke else (args.steps, args.epochs)

    manifests = synth(out / "phantoms", args.style, [*PHANTOMS, SLIDE_MAP], args.smoke, args.jobs)
    segmenter_config = write_config(CONFIGS / "vessels_stage5.yaml", out / "segmenter.yaml", {
        "manifest": str(manifests["vessel_phantoms"]),
        "extra_manifests": [str(manifests["vessel_phantoms2"]), str(manifests["vessel_phantoms3"])],
        "init": None, "keep_init_validation": False, "steps": steps, "lr": 0.003, "out": str(out / "segmenter"),
        "description": f"Synthetic demo, retrained by scripts/retrain_vessels_gpu.py ({args.style} phantoms, "
                       f"seeds 300-302, {steps} steps). Not for clinical use."})
    run("segmenter", ["calciscope", "train-vessels", "--config", str(segmenter_config), "--quiet"])
    classifier_config = write_config(CONFIGS / "vessel_classifier.yaml", out / "classifier.yaml", {
        "manifests": [str(manifests["vessel_phantoms"]), str(manifests["demo_phantoms"])],
        "segmenter": str(out / "segmenter"), "epochs": epochs, "out": str(out / "classifier"),
        "description": f"Synthetic demo, retrained by scripts/retrain_vessels_gpu.py ({args.style} phantoms, "
                       f"seeds 300 and 100, {epochs} epochs). Not for clinical use."})
    run("classifier", ["calciscope", "train-vessel-classifier", "--config", str(classifier_config), "--quiet"])
    model = assemble(out)
    run("slide map", ["calciscope", "calibrate-slides", "--model", str(model), "--classifier",
                      str(model / "vessels" / "classifier"), "--data", str(manifests["slide_map_biopsy"]),
                      "--grid-route", "vasculitis", "--quiet"])
    print(f"model with the new vessel networks: {model}")


def assemble(out: Path) -> Path:
    """``OUT/model``: the shipped demo's tile model and calcium-artifact classifier with the new segmenter and vessel
    classifier, laid out as the demo is (``vessels/``, ``vessels/classifier/``), so predict (and calibrate-slides)
    run the new networks together."""
    from calciscope.model.demo import demo_model_dir

    model = out / "model"
    if model.exists():
        shutil.rmtree(model)
    shutil.copytree(demo_model_dir(), model, ignore=shutil.ignore_patterns("segmenter.*", "classifier"))
    for name in ("segmenter.json", "segmenter.safetensors"):
        shutil.copy2(out / "segmenter" / name, model / "vessels" / name)
    shutil.copytree(out / "classifier", model / "vessels" / "classifier",
                    ignore=shutil.ignore_patterns("*.csv", "*.png", "last", "best", "held_out"))
    return model


if __name__ == "__main__":
    sys.exit(main())
