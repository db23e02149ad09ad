"""The ``calciscope`` command: parse, call the library, print. Everything here is callable from Python too."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from calciscope import __version__
from calciscope.errors import CalciscopeError

app = typer.Typer(
    name="calciscope",
    help="Score H&E whole-slide images for the calciphylaxis pattern. Decision support, not a diagnosis.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()


@contextmanager
def progress_bar(description: str):
    """A rich progress bar; yields ``update(done, total)``."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as bar:
        task = bar.add_task(description, total=None, rate="")

        def update(done: int, total: int) -> None:
            elapsed = bar.tasks[task].elapsed or 0.0
            rate = f"{done / elapsed:.0f}/s" if elapsed > 0 else ""
            bar.update(task, completed=done, total=total, rate=rate)

        yield update


def _parse_prevalence(text: Optional[str]) -> Optional[dict[str, float]]:
    if not text:
        return None
    result = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            result[name.strip()] = float(value)
        except ValueError:
            raise CalciscopeError(f"--prevalence: expected finding=probability pairs, got {part!r}") from None
        if not sep:
            raise CalciscopeError(f"--prevalence: expected finding=probability pairs, got {part!r}")
    return result


@app.command()
def synth(
    out_dir: Path = typer.Option(..., "--out", help="Folder for the phantom slides and manifest.csv."),
    n_slides: int = typer.Option(4, "--n-slides", help="Number of slides."),
    size: int = typer.Option(4096, "--size", help="Level-0 width and height in pixels."),
    mpp: float = typer.Option(0.5, "--mpp", help="Level-0 resolution in µm/px."),
    seed: int = typer.Option(0, "--seed", help="Random seed; same seed, same files."),
    prevalence: Optional[str] = typer.Option(None, "--prevalence", help="e.g. 'thrombosis=0.5,vasculitis=0.2'."),
    slides_per_patient: int = typer.Option(2, "--slides-per-patient", help="Consecutive slides sharing a patient id."),
    no_artifacts: bool = typer.Option(False, "--no-artifacts", help="Draw no pen marks, folds, blur or borders."),
):
    """Generate synthetic H&E phantom slides with ground-truth lesion polygons and a manifest."""
    from calciscope.data.synthetic import generate_dataset

    with progress_bar("synth") as update:
        manifest = generate_dataset(
            out_dir,
            n_slides,
            size_px=size,
            mpp=mpp,
            seed=seed,
            prevalence=_parse_prevalence(prevalence),
            slides_per_patient=slides_per_patient,
            artifacts=not no_artifacts,
            progress=update,
        )
    out.print(manifest)


@app.command()
def tile(
    slides: list[Path] = typer.Argument(..., help="Slide files (.svs .tif .ndpi .mrxs .png .jpg ...)."),
    out_dir: Path = typer.Option(..., "--out", help="Output folder; each slide writes OUT/<slide_id>/."),
    mpp: float = typer.Option(0.5, "--mpp", help="Tile resolution in µm/px."),
    tile_px: int = typer.Option(224, "--tile-px", help="Tile side in pixels at --mpp."),
    overlap_px: int = typer.Option(0, "--overlap-px", help="Overlap between neighbouring tiles, pixels at --mpp."),
    min_tissue: float = typer.Option(0.5, "--min-tissue", help="Keep tiles whose tissue fraction is at least this."),
    slide_mpp: Optional[float] = typer.Option(None, "--slide-mpp", help="Override the slide's level-0 µm/px."),
    annotations: Optional[Path] = typer.Option(None, "--annotations", help="QuPath GeoJSON: adds label columns."),
    save_tiles: bool = typer.Option(False, "--save-tiles", help="Also write every tile as PNG under tiles/."),
    workers: int = typer.Option(min(4, os.cpu_count() or 1), "--workers", help="Decoding processes (0: none)."),
):
    """Find tissue, cut a tile grid at --mpp and write tiles.csv, qc.json and an annotated thumbnail."""
    from calciscope.data.tile_export import tile_slide
    from calciscope.data.tiling import TilingConfig

    if annotations is not None and len(slides) > 1:
        raise CalciscopeError("--annotations belongs to one slide; tile annotated slides one at a time")
    config = TilingConfig(mpp=mpp, tile_px=tile_px, overlap_px=overlap_px, min_tissue=min_tissue)
    failures = 0
    for path in slides:
        try:
            with progress_bar(path.name) as update:
                result = tile_slide(
                    path,
                    out_dir,
                    tiling=config,
                    slide_mpp=slide_mpp,
                    annotations=annotations,
                    save_tiles=save_tiles,
                    workers=workers,
                    progress=update,
                )
        except CalciscopeError as exc:
            if len(slides) == 1:
                raise
            failures += 1
            console.print(f"[red]calciscope: error:[/red] {exc}", highlight=False)
            continue
        flags = ", ".join(result.qc_flags) or "none"
        out.print(f"{result.slide_id}: {result.n_tiles} tiles, QC flags: {flags} -> {result.out_dir}", highlight=False)
    if failures:
        raise typer.Exit(1)


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("calciscope-demo"), "--out", help="Output folder."),
    size: int = typer.Option(3072, "--size", help="Phantom side in pixels (0.5 µm/px)."),
    seed: int = typer.Option(7, "--seed", help="Phantom seed."),
):
    """Make a phantom slide with lesions and run the pipeline on it, offline."""
    from calciscope.data.synthetic import generate_slide
    from calciscope.data.tile_export import tile_slide

    findings = {"medial_calcification": 1, "small_vessel_calcification": 0, "thrombosis": 1, "vasculitis": 0}
    phantom = generate_slide(out_dir / "slides", "demo_slide", findings, size_px=size, seed=seed)
    with progress_bar("tiling") as update:
        result = tile_slide(phantom.path, out_dir, annotations=phantom.lesions_path, workers=0, progress=update)
    table = Table(title=f"demo phantom {phantom.slide_id} (synthetic, not for clinical use)")
    table.add_column("finding drawn")
    table.add_column("present", justify="right")
    for name, value in phantom.labels.items():
        table.add_row(name, "yes" if value else "no")
    out.print(table)
    out.print(f"{result.n_tiles} tissue tiles at 0.5 µm/px; QC flags: {', '.join(result.qc_flags) or 'none'}")
    out.print("Scoring with the demo model arrives with the inference stage; tiling output:")
    out.print(str(result.out_dir / "thumbnail.png"), highlight=False)


@app.command()
def train(
    config: Optional[Path] = typer.Option(None, "--config", help="Training config (YAML); see configs/demo.yaml."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the stopped run in this directory."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run directory (overrides the config's 'out')."),
    overrides: list[str] = typer.Option([], "--set", help="Override a config value, e.g. --set optim.epochs=3."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
):
    """Train a tile or MIL model; writes checkpoints, metrics, plots and a model card to the run directory."""
    import yaml

    from calciscope.training.config import load_config
    from calciscope.training.train import fit

    if (config is None) == (resume is None):
        raise CalciscopeError("give exactly one of --config (a new run) or --resume RUN_DIR (continue a run)")
    cfg = None
    if config is not None:
        values = {}
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep:
                raise CalciscopeError(f"--set expects key=value, got {item!r}")
            values[key.strip()] = yaml.safe_load(value)
        if out_dir is not None:
            values["out"] = str(out_dir)
        cfg = load_config(config, values)
    run_dir = fit(cfg, resume=resume, show_progress=not quiet)
    out.print(f"model: {run_dir / 'model'}", highlight=False)
    out.print(f"metrics: {run_dir / 'metrics.json'}", highlight=False)


@app.command()
def evaluate(
    model: Path = typer.Option(..., "--model", help="A calciscope checkpoint directory."),
    data: Path = typer.Option(..., "--data", help="Slide manifest CSV (with annotations) or a tile folder/CSV."),
    out_dir: Path = typer.Option(..., "--out", help="Where metrics.json, roc.png and reliability.png go."),
    workers: int = typer.Option(min(4, os.cpu_count() or 1), "--workers", help="Data loading processes."),
):
    """Compute the training metrics (per finding, per slide, CUA pattern) of a model on labelled data."""
    from calciscope.training.train import evaluate_model

    report = evaluate_model(model, data, out_dir, workers=workers)
    table = Table(title=f"{model} on {data.name}")
    for column in ("finding", "AUROC", "AUPRC", "sens@90%spec", "ECE"):
        table.add_column(column, justify="right" if column != "finding" else "left")
    level = report.get("slides", report["examples"])
    for label, m in level["per_label"].items():
        table.add_row(label, *(f"{m[k]:.3f}" for k in ("auroc", "auprc", "sens_at_spec", "ece")))
    out.print(table)
    out.print(str(out_dir / "metrics.json"), highlight=False)


@app.command()
def version():
    """Print the calciscope version."""
    out.print(__version__)


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point: one clear line per error, a traceback only with --debug."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("CALCISCOPE_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    try:
        app(args=args, prog_name="calciscope", standalone_mode=True)
    except CalciscopeError as exc:
        if debug:
            raise
        console.print(f"[red]calciscope: error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("calciscope: interrupted")
        sys.exit(130)
