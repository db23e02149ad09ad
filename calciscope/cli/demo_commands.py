"""``demo`` (the main job on an embedded phantom) and ``install-demo`` (maintainers: ship retrained demo
networks)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from calciscope.cli.app import app, out, progress_bar
from calciscope.cli.tables import findings_table, ood_line, vessel_line
from calciscope.inference.config import PredictConfig, default_workers

# Commands import the library inside their bodies: `calciscope --help` then starts without torch.


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("calciscope-demo"), "--out", help="Output folder."),
    size: int = typer.Option(3072, "--size", help="Phantom side in pixels (0.5 µm/px)."),
    seed: int = typer.Option(7, "--seed", help="Phantom seed."),
    workers: int = typer.Option(default_workers(), "--workers", help="Tile decoding processes (0: none)."),
):
    """Draw a phantom slide with lesions and score it with the shipped demo model, offline; prints the report path."""
    from calciscope.data.synthetic import generate_slide
    from calciscope.inference.predict import Predictor, check_writable

    check_writable(out_dir)
    findings = {"medial_calcification": 1, "small_vessel_calcification": 0, "thrombosis": 1, "vasculitis": 0}
    # the classic drawing, the one the shipped demo model learned (style "random" once it is retrained on it)
    phantom = generate_slide(out_dir / "slides", "demo_slide", findings, size_px=size, seed=seed, style="classic")
    predictor = Predictor("demo", PredictConfig(workers=workers))
    with progress_bar("scoring") as update:
        result = predictor.predict_and_write(phantom.path, out_dir, progress=update)
    title = f"{result.slide_id}: {result.card.name} (synthetic demo, not for clinical use)"
    out.print(findings_table(result, title, truth=phantom.labels))
    flags = ", ".join(result.qc.get("flags", [])) or "none"
    out.print(f"{result.n_tiles} tiles in {result.seconds:.1f} s; QC flags: {flags}", highlight=False)
    for line in (ood_line(result), vessel_line(result)):
        if line:
            out.print(line, highlight=False, markup=False, soft_wrap=True)
    out.print("Decision support, not a diagnosis. Report:")
    out.print(str(result.out_dir / "report.html"), highlight=False, soft_wrap=True)


install_demo = typer.Typer(help="Maintainers: install trained networks as the shipped demo (a synthetic demo; the "
                                  "recipes in configs/ say how each was made).", no_args_is_help=True)
app.add_typer(install_demo, name="install-demo")


@install_demo.command("model")
def install_demo_model(
    model: Path = typer.Argument(..., help="A checkpoint folder marked synthetic_demo."),
    held_out: Optional[Path] = typer.Argument(None, help="An 'evaluate' metrics.json on phantoms it never saw."),
    segmenter: Optional[Path] = typer.Option(None, "--segmenter", help="A train-vessels folder to ship beside it."),
    measured: list[str] = typer.Option([], "--measured", help="More figures for the card as NAME=FILE (an 'evaluate' "
                                       "metrics.json, a bench_transfer.py --json table); repeatable."),
):
    """Copy a checkpoint (and its segmenter) into the package as the demo model."""
    from calciscope.errors import CalciscopeError
    from calciscope.model.demo import install

    bad = [m for m in measured if "=" not in m or not m.split("=", 1)[0]]
    if bad:
        raise CalciscopeError(f"--measured {bad[0]}: give NAME=FILE")
    figures = dict(m.split("=", 1) for m in measured)
    out.print(str(install(model, held_out, segmenter=segmenter, measured=figures)), highlight=False, soft_wrap=True)


@install_demo.command("classifier")
def install_demo_classifier(
    classifier: Path = typer.Argument(..., help="A train-vessel-classifier folder marked synthetic_demo."),
    held_out: Optional[Path] = typer.Argument(None, help="An 'evaluate --model demo' metrics.json run with it."),
):
    """Copy a vessel classifier beside the demo model's segmenter."""
    from calciscope.model.demo import install_classifier

    out.print(str(install_classifier(classifier, held_out)), highlight=False, soft_wrap=True)


@install_demo.command("artifact-classifier")
def install_demo_artifact_classifier(
    classifier: Path = typer.Argument(..., help="A calcium-artifact classifier folder marked synthetic_demo."),
    measured: Optional[Path] = typer.Argument(None, help="JSON of its figures on unseen phantoms."),
):
    """Copy a calcium-artifact classifier beside the demo model's segmenter."""
    import json

    from calciscope.model.demo import install_artifact_classifier

    figures = json.loads(measured.read_text(encoding="utf-8")) if measured is not None else None
    out.print(str(install_artifact_classifier(classifier, figures)), highlight=False, soft_wrap=True)




@install_demo.command("ood")
def install_demo_ood(
    data: list[Path] = typer.Option(..., "--data", help="The demo's training phantoms' manifest (repeat for several)."),
    calibration: list[Path] = typer.Option([], "--calibration", help="Manifest of phantoms no demo network trained on."),
    description: str = typer.Option("", "--description", help="What the slides are (recipe and seeds), for the cards."),
    network: list[str] = typer.Option([], "--network", help="Fit only this network (tile_model, segmenter, "
                                      "vessel_classifier, artifact_classifier; repeatable; default: all)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
):
    """Fit the out-of-distribution references of the shipped demo model, segmenter and classifiers (their cards
    change, their weights do not); see model/demo.py."""
    from calciscope.cli.training_commands import ood_table
    from calciscope.inference.fit_ood import fit_ood

    progress = None if quiet else (lambda line: out.print(line, highlight=False))
    refs = fit_ood("demo", data, calibration, description=description, allow_demo=True, networks=network,
                   progress=progress)
    out.print(ood_table(refs))
