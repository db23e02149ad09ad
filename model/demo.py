"""The shipped demo model: a small CNN trained on labelled tiles cut from phantom slides (``configs/demo.yaml``, which
lists the whole recipe: phantoms, ``calciscope phantom-tiles``, train, evaluate, the transfer check, install).
Synthetic demo, not for clinical use.

    calciscope train --config configs/demo.yaml
    calciscope evaluate --model runs/demo/model --data phantoms/held_out_classic/manifest.csv --out runs/demo/held_out
    calciscope install-demo model runs/demo/model runs/demo/held_out/metrics.json \
        --measured second_renderer=runs/demo/transfer.json

``configs/vessels.yaml`` and its stages (to ``configs/vessels_stage5.yaml``) train the vessel segmenter that ships
beside it in ``demo/vessels/``; ``install-demo model ... --segmenter runs/vessels_stage5`` installs it with a model.

``configs/vessel_classifier.yaml`` trains the per-vessel classifier that ships in ``demo/vessels/classifier/``,
whose slide map is then refit on 96 tuning phantoms (seeds 706 and 707; the config lists the whole recipe):

    calciscope calibrate-slides --classifier runs/vessel_classifier --data phantoms/cua_tune/manifest.csv \
        --data phantoms/cua_tune2/manifest.csv
    calciscope install-demo classifier runs/vessel_classifier
    calciscope evaluate --model demo --data phantoms/held_out/manifest.csv --out runs/vessel_classifier/held_out
    calciscope install-demo classifier runs/vessel_classifier runs/vessel_classifier/held_out/metrics.json

``configs/artifact_classifier.yaml`` trains the calcium-artifact classifier in ``demo/vessels/artifact_classifier/``:

    calciscope install-demo artifact-classifier runs/artifact_classifier

Every network installed must carry an out-of-distribution reference (``model.ood``; the trainers fit one). The
tile model's comes from its training run. The vessel networks, trained before there was one, got theirs from the
classic phantoms they were trained on (weights unchanged):

    calciscope synth --style classic --out phantoms/demo_phantoms --n-slides 48 --size 4096 --seed 100
    calciscope synth --style classic --out phantoms/ood_calibration --n-slides 24 --size 4096 --seed 2100
    calciscope install-demo ood --data phantoms/demo_phantoms/manifest.csv \
        --calibration phantoms/ood_calibration/manifest.csv \
        --network segmenter --network vessel_classifier --network artifact_classifier

``install-demo model ... --measured NAME=FILE`` puts more figures in the card (``metrics[NAME]``): another unseen
set's ``evaluate`` metrics.json, or ``benchmarks/bench_transfer.py --json``'s table for the second renderer.
"""

from __future__ import annotations

import json
import shutil
from importlib.resources import files
from pathlib import Path

from calciscope.errors import CalciscopeError
from calciscope.model.checkpoint import (
    CARD_FILE,
    WEIGHTS_FILE,
    load_card,
    load_checkpoint,
    save_checkpoint,
    update_card,
)
from calciscope.model.segmenter import CARD_FILE as SEG_CARD
from calciscope.model.segmenter import WEIGHTS_FILE as SEG_WEIGHTS
from calciscope.model.segmenter import load_segmenter
from calciscope.model.vessel_classifier import CARD_FILE as CLS_CARD
from calciscope.model.vessel_classifier import WEIGHTS_FILE as CLS_WEIGHTS
from calciscope.model.vessel_classifier import ClassifierCard, load_classifier

MAX_BYTES = 15 * 1024 * 1024


def demo_model_dir() -> Path:
    """Where the demo checkpoint lives inside the installed package."""
    path = Path(str(files("calciscope.model") / "demo"))
    if not (path / CARD_FILE).is_file():
        raise CalciscopeError(f"{path}: the demo model is missing from this installation")
    return path


def resolve_model(spec: str | Path) -> Path:
    """``"demo"`` → the shipped demo checkpoint; anything else is a checkpoint directory (or its model.json)."""
    return demo_model_dir() if str(spec) == "demo" else Path(spec)


def resolve_segmenter(spec: str | Path) -> Path:
    """``"demo"`` → the vessel segmenter shipped beside the demo model; anything else is a segmenter folder."""
    return demo_model_dir() / "vessels" if str(spec) == "demo" else Path(spec)


def install(source: str | Path, held_out: str | Path | None = None, segmenter: str | Path | None = None,
            measured: dict[str, str | Path] | None = None) -> Path:
    """Copy a trained checkpoint into the package as the demo model, after checking it loads and is small.

    ``held_out``: a ``calciscope evaluate`` metrics.json on phantoms never used in training; it goes into the
    card as ``metrics["held_out"]`` so the card carries what the model scored on unseen data. ``measured``: more
    such figures, name -> JSON file (another held-out set, ``bench_transfer.py --json``), into ``metrics[name]``.
    ``segmenter``: a ``calciscope train-vessels`` folder, copied to ``demo/vessels/`` (it must load and be a
    synthetic demo).
    """

    source = Path(source)
    model, card = load_checkpoint(source)
    if not card.synthetic_demo:
        raise CalciscopeError(f"{source}: its card is not marked synthetic_demo; the demo model must be")
    _check_ood(source, card)
    target = Path(str(files("calciscope.model"))) / "demo"
    figures = {"held_out": held_out} if held_out is not None else {}
    figures.update(measured or {})
    for name, path in figures.items():
        if not Path(path).is_file():
            raise CalciscopeError(f"{path}: no such metrics file (for the card's metrics[{name!r}])")
    if figures:
        card.metrics = {**card.metrics, **{k: json.loads(Path(v).read_text()) for k, v in figures.items()}}
        save_checkpoint(target, model, card)
    else:
        target.mkdir(exist_ok=True)
        for name in (WEIGHTS_FILE, CARD_FILE):
            shutil.copyfile(source / name, target / name)
    if segmenter is not None:
        _, seg_card = load_segmenter(segmenter)
        if not seg_card.synthetic_demo:
            raise CalciscopeError(f"{segmenter}: its card is not marked synthetic_demo; the demo segmenter must be")
        _check_ood(Path(segmenter), seg_card)
        (target / "vessels").mkdir(exist_ok=True)
        for name in (SEG_WEIGHTS, SEG_CARD):
            shutil.copyfile(Path(segmenter) / name, target / "vessels" / name)
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    if size > MAX_BYTES:
        raise CalciscopeError(f"{source}: {size / 2**20:.1f} MiB is over the {MAX_BYTES / 2**20:.0f} MiB demo budget")
    return target


def _check_ood(source: Path, card) -> None:
    """The demo must say when a slide is unlike its phantoms: a network without an OOD reference is not shipped."""
    if not card.ood_reference:
        raise CalciscopeError(f"{source}: its card has no out-of-distribution reference (the trainers fit one; for a "
                              f"network trained without it: calciscope fit-ood --model FOLDER --data MANIFEST)")


def _copy_classifier(source: Path, subfolder: str) -> Path:
    """Copy a classifier folder's weights and card to ``demo/vessels/<subfolder>/``; returns that folder."""

    target = demo_model_dir() / "vessels" / subfolder
    target.mkdir(parents=True, exist_ok=True)
    if source.resolve() != target.resolve():
        for name in (CLS_WEIGHTS, CLS_CARD):
            shutil.copyfile(source / name, target / name)
    return target


def install_classifier(source: str | Path, held_out: str | Path | None = None) -> Path:
    """Copy a ``calciscope train-vessel-classifier`` folder to ``demo/vessels/classifier/``, after checking it loads,
    is a synthetic demo and judges the demo model's findings. ``held_out``: a ``calciscope evaluate --model demo``
    metrics.json on unseen phantoms, run with this classifier in place; its slide (and vessel) metrics go into the
    card as ``metrics["held_out"]``."""

    source = Path(source)
    _, card = load_classifier(source)
    if not card.synthetic_demo:
        raise CalciscopeError(f"{source}: its card is not marked synthetic_demo; the demo classifier must be")
    _check_ood(source, card)
    missing = set(load_card(demo_model_dir()).labels) - set(card.labels)
    if missing:
        raise CalciscopeError(f"{source}: it does not judge {sorted(missing)}, which the demo model reports")
    target = _copy_classifier(source, "classifier")
    if held_out is not None:
        report = json.loads(Path(held_out).read_text())
        if "slides_from_tiles" not in report:
            raise CalciscopeError(f"{held_out}: its slide metrics do not come from a vessel classifier (evaluate with "
                                  f"this classifier installed)")
        held = {"data": str(Path(held_out).parent.name), "slides": report["slides"],
                **({"vessels": report["vessels"]} if "vessels" in report else {})}
        update_card(ClassifierCard, target, metrics={**card.metrics, "held_out": held})
    return target


def install_artifact_classifier(source: str | Path, measured: dict | None = None) -> Path:
    """Copy a calcium-artifact classifier (``train-vessel-classifier`` with ``judge_artifacts``) to
    ``demo/vessels/artifact_classifier/`` after checking it loads, is a synthetic demo and has that output;
    ``measured`` (figures on unseen phantoms) goes into its card as ``metrics["held_out"]``."""

    source = Path(source)
    _, card = load_classifier(source)
    if not card.synthetic_demo or not card.artifact_output:
        raise CalciscopeError(f"{source}: the demo artifact classifier must be marked synthetic_demo and have a "
                              f"calcium_artifact output")
    _check_ood(source, card)
    target = _copy_classifier(source, "artifact_classifier")
    if measured is not None:
        update_card(ClassifierCard, target, metrics={**card.metrics, "held_out": measured})
    return target
