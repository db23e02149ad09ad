"""``evaluate`` and ``evaluate-vessels``: a model's figures on labelled data it never saw."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.table import Table

from calciscope.cli.app import app, console, out

# Commands import the library inside their bodies: `calciscope --help` then starts without torch.


@app.command("evaluate-vessels")
def evaluate_vessels(
    segmenter: str = typer.Option("demo", "--segmenter", help="A train-vessels folder, or 'demo' for the shipped one."),
    data: Path = typer.Option(..., "--data", help="Manifest of slides with vessel outlines the segmenter never saw."),
    out_dir: Path = typer.Option(..., "--out", help="Where detection.json goes."),
    min_mean_probability: list[float] = typer.Option(
        [], "--min-mean-probability", help="Instance filter to evaluate (repeat to compare several; "
        "default: the segmenter card's)."),
    apply: bool = typer.Option(False, "--apply", help="Write the value with the highest min(recall, precision) "
                               "into the segmenter's card, where predict and score read it."),
):
    """Vessel detection recall and precision (IoU 0.5), diameter and count error of a segmenter on labelled slides."""
    from calciscope.inference.evaluate import evaluate_vessels as run

    report = run(segmenter, data, out_dir, list(min_mean_probability) or None, apply=apply,
                 progress=lambda line: console.print(line, highlight=False))
    table = Table(title=f"{segmenter} on {data.name}")
    for column in ("min mean prob", "true", "found", "recall", "precision", "diameter err", "count err"):
        table.add_column(column, justify="right")
    for value, m in report["by_min_mean_probability"].items():
        table.add_row(value, str(m["vessels_true"]), str(m["vessels_detected"]),
                      *(f"{m[k]:.3f}" if m[k] is not None else "n/a"
                        for k in ("recall", "precision", "median_diameter_error", "count_error")))
    out.print(table)
    if "applied" in report:
        console.print(f"min_mean_probability {report['applied']['min_mean_probability']:g} written to "
                      f"{report['applied']['card']}", highlight=False, soft_wrap=True)
    out.print(str(out_dir / "detection.json"), highlight=False, soft_wrap=True)


@app.command()
def evaluate(
    model: str = typer.Option(..., "--model", help="A calciscope checkpoint directory, or 'demo' for the shipped model."),
    data: Path = typer.Option(..., "--data", help="Slide manifest CSV (with annotations) or a tile folder/CSV."),
    out_dir: Path = typer.Option(..., "--out", help="Where metrics.json, roc.png and reliability.png go."),
    workers: int = typer.Option(min(4, os.cpu_count() or 1), "--workers", help="Data loading processes."),
):
    """Compute the training metrics (per finding, per slide, CUA pattern) of a model on labelled data."""
    from calciscope.inference.evaluate import evaluate_model

    report = evaluate_model(model, data, out_dir, workers=workers)
    table = Table(title=f"{model} on {data.name}")
    for column in ("finding", "AUROC", "AUPRC", "sens@90%spec", "ECE"):
        table.add_column(column, justify="right" if column != "finding" else "left")
    level = report.get("slides", report["examples"])
    for label, m in level["per_label"].items():
        table.add_row(label, *(f"{m[k]:.3f}" for k in ("auroc", "auprc", "sens_at_spec", "ece")))
    out.print(table)
    out.print(str(out_dir / "metrics.json"), highlight=False)


