"""``predict``, ``score`` and ``export``: slides in, scores and files out."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape  # messages hold file names and 'pkg[extra]': never markup

from calciscope.cli.app import app, console, out, predict_options, progress_bar
from calciscope.cli.tables import ood_line, summary_table, vessel_line
from calciscope.errors import CalciscopeError
from calciscope.inference.config import PredictConfig

# Commands import the library inside their bodies: `calciscope --help` then starts without torch.


@app.command()
@predict_options()
def predict(
    slides: list[Path] = typer.Argument(..., help="Slide files (.svs .tif .ndpi .mrxs .png .jpg ...)."),
    model: str = typer.Option("demo", "--model", help="A checkpoint directory, or 'demo' for the shipped demo model "
                                                     "(with --runtime onnxruntime: an .onnx file from 'export')."),
    out_dir: Path = typer.Option(Path("calciscope-results"), "--out", help="Output folder; one OUT/<slide_id>/ per slide."),
    config: PredictConfig = None,
):
    """Score slides: per-finding probabilities, CUA-pattern score, vessels, heatmaps, saliency, QuPath GeoJSON,
    HTML report."""
    from calciscope.inference.predict import Predictor, check_writable

    check_writable(out_dir)
    predictor = Predictor(model, config)
    results, failures = [], 0
    for path in slides:
        try:
            with progress_bar(path.name) as update:
                result = predictor.predict_and_write(path, out_dir, progress=update)
        except CalciscopeError as exc:
            if len(slides) == 1:
                raise
            failures += 1
            console.print(f"[red]calciscope: error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
            continue
        results.append(result)
        out.print(f"{result.slide_id}: {result.n_tiles} tiles in {result.seconds:.1f} s -> "
                  f"{result.out_dir / 'report.html'}", highlight=False, soft_wrap=True)
        for line in (ood_line(result), vessel_line(result)):
            if line:
                out.print(line, highlight=False, markup=False, soft_wrap=True)
    if results:
        out.print(summary_table(results))
    if failures:
        console.print(f"{failures} of {len(slides)} slides failed", highlight=False)
        raise typer.Exit(1)


@app.command()
@predict_options(exclude=("workers",))
def score(
    source: str = typer.Argument(..., help="A manifest CSV (path[, slide_id, mpp, ...]), a folder of slides or a glob."),
    model: str = typer.Option("demo", "--model", help="A checkpoint directory, or 'demo' "
                                                     "(with --runtime onnxruntime: an .onnx file from 'export')."),
    out_dir: Path = typer.Option(..., "--out", help="Output folder: OUT/<slide_id>/, summary.csv, run.json."),
    workers: int = typer.Option(1, "--workers", help="Slides scored in parallel, each in its own process."),
    backend: str = typer.Option("local", "--backend", help="local (worker processes) or ray (one task per slide)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster address (default: start one)."),
    config: PredictConfig = None,
):
    """Score many slides: resumable, a bad slide or a crashed worker never stops the batch."""
    from calciscope.inference.batch import ScoreRun

    with progress_bar("slides", per_minute=True) as update:
        outcomes = ScoreRun(source, model, out_dir, config=config, workers=workers, backend=backend,
                            ray_address=ray_address, progress=update).run()
    counts = {status: sum(o.status == status for o in outcomes) for status in ("scored", "resumed", "failed")}
    for o in outcomes:
        if o.status == "failed":
            console.print(f"[red]failed:[/red] {escape(o.error)}", highlight=False, soft_wrap=True)
    out.print(f"{len(outcomes)} slides: {counts['scored']} scored, {counts['resumed']} already done, "
              f"{counts['failed']} failed", highlight=False)
    out.print(str(Path(out_dir) / "summary.csv"), highlight=False, soft_wrap=True)
    if counts["failed"]:
        raise typer.Exit(1)


@app.command()
def export(
    model: str = typer.Option(..., "--model", help="A checkpoint directory, or 'demo'."),
    fmt: str = typer.Option("onnx", "--format", help="onnx (the only format today)."),
    out_file: Path = typer.Option(..., "--out", help="The file to write, e.g. model.onnx."),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset (default: the exporter's)."),
):
    """Export a checkpoint for deployment: ONNX with the input normalisation and the model card inside; scores
    within 1e-4 of torch, checked before the file is written. Score with it: predict/score --runtime onnxruntime."""
    if fmt.lower() != "onnx":
        raise CalciscopeError(f"--format {fmt}: unsupported export format; supported: onnx")
    from calciscope.inference.onnx_runtime import export_onnx

    with console.status("exporting to ONNX and checking it against torch"):
        path = export_onnx(model, out_file, opset=opset)
    out.print(str(path), highlight=False, markup=False, soft_wrap=True)


