"""``train``, ``train-vessels``, ``train-vessel-classifier``, ``fit-vessel-head``, ``calibrate-slides`` and
``fit-ood``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from calciscope.cli.app import app, console, out, progress_bar
from calciscope.errors import CalciscopeError

# Commands import the library inside their bodies: `calciscope --help` then starts without torch.


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
def features(
    slides: list[str] = typer.Argument(..., help="Slides: files, folders, quoted globs or a manifest CSV."),
    encoder: str = typer.Option(..., "--encoder", help="uni, uni2-h, virchow2, h-optimus-0, h-optimus-1, phikon-v2, "
                                "conch, prov-gigapath (or a calciscope checkpoint folder)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="The publisher's weights file or folder (local; "
                                           "nothing is downloaded)."),
    out_dir: Path = typer.Option(..., "--out", help="Feature cache folder (data.cache_dir for training)."),
    mpp: Optional[float] = typer.Option(None, "--mpp", help="Tile resolution, µm/px (default: the encoder's, 0.5)."),
    tile_px: Optional[int] = typer.Option(None, "--tile-px", help="Tile size in px (default: the encoder's)."),
    batch_size: int = typer.Option(64, "--batch-size"),
    workers: int = typer.Option(2, "--workers", help="Tile-decoding processes per slide."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when there is one), cpu or cuda:N."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
):
    """Cache tile embeddings (with level-0 coordinates) of slides with a frozen encoder, one file per slide;
    rerun the same command to resume. Train attention-MIL on them with data.source slide_labels and data.cache_dir."""
    from calciscope.training.features import extract_features

    files = extract_features(slides, encoder, weights, out_dir, mpp=mpp, tile_px=tile_px, batch_size=batch_size,
                             workers=workers, device=device, progress=_lines(quiet))
    out.print(f"{len(files)} slides: {out_dir}", highlight=False, soft_wrap=True)


@app.command("fit-vessel-head")
def fit_vessel_head_cmd(
    model: Path = typer.Option(..., "--model", help="The checkpoint folder to add the vessel head to."),
    data: Path = typer.Option(..., "--data", help="Manifest of slides with vessel outlines the model never trained on."),
    vessels: str = typer.Option("auto", "--vessels", help="Segmenter folder (default: the model folder's vessels/)."),
):
    """Fit per-vessel calibrated probabilities (tile scores + vessel size and place) into a model's card."""
    from calciscope.inference.fit_vessel_head import fit_into_card

    with progress_bar("slides") as update:
        head = fit_into_card(model, data, vessels, progress=update)
    metrics = head.metrics
    out.print(f"{metrics['n_vessels']} vessels; per-vessel AUROC (grouped CV): {metrics.get('cv_auroc', 'n/a')}",
              highlight=False, soft_wrap=True)
    out.print(str(model / "model.json"), highlight=False, soft_wrap=True)


@app.command("train-vessels")
def train_vessels(
    config: Optional[Path] = typer.Option(None, "--config", help="Segmenter config (YAML); see configs/vessels.yaml."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Finish the stopped run in this segmenter folder."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Segmenter folder (overrides the config's 'out')."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Training steps (overrides the config's)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
):
    """Train the vessel segmenter on slides with vessel outlines (GeoJSON class 'vessel'); prints its folder.
    Put the folder at <model>/vessels, or pass it to predict/score --vessels."""
    from calciscope.training.train_segmenter import load_config as load_segmenter_config
    from calciscope.training.train_segmenter import train_segmenter

    cfg = _config_or_resume(load_segmenter_config, config, resume, out=out_dir, steps=steps)
    folder = train_segmenter(cfg, _lines(quiet), resume=resume)
    out.print(str(folder), highlight=False, soft_wrap=True)


@app.command("train-vessel-classifier")
def train_vessel_classifier(
    config: Optional[Path] = typer.Option(None, "--config", help="Classifier config (YAML); see "
                                          "configs/vessel_classifier.yaml."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Finish the stopped run in this classifier folder."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Classifier folder (overrides the config's 'out')."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs (overrides the config's)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
):
    """Train the per-vessel classifier on slides with vessel outlines whose 'findings' say what each vessel has;
    prints its folder. Put the folder at <segmenter>/classifier, or pass it to predict/score --vessel-classifier; one
    trained for calcium artifacts only (labels: [], judge_artifacts: true) goes to <segmenter>/artifact_classifier
    or --artifact-classifier."""
    from calciscope.training.train_classifier import load_config as load_classifier_config
    from calciscope.training.train_classifier import train_classifier

    cfg = _config_or_resume(load_classifier_config, config, resume, out=out_dir, epochs=epochs)
    folder = train_classifier(cfg, _lines(quiet), resume=resume)
    out.print(str(folder), highlight=False, soft_wrap=True)


def _config_or_resume(load, config: Optional[Path], resume: Optional[Path], **overrides):
    """The config a new run trains with (``--config`` and the options given), or None to resume a stopped run."""
    if (config is None) == (resume is None):
        raise CalciscopeError("give exactly one of --config (a new run) or --resume FOLDER (finish a stopped run)")
    if resume is not None:
        return None
    given = {k: (str(v) if isinstance(v, Path) else v) for k, v in overrides.items() if v is not None}
    return dataclasses.replace(load(config), **given)


def _lines(quiet: bool):
    return None if quiet else (lambda line: console.print(line, highlight=False))


@app.command("calibrate-slides")
def calibrate_slides(
    classifier: Path = typer.Option(..., "--classifier", help="A 'train-vessel-classifier' folder; its card is rewritten."),
    data: list[Path] = typer.Option(..., "--data", help="Manifest of labelled slides the classifier never saw "
                                    "(repeat for several)."),
    model: str = typer.Option("demo", "--model", help="The model (tile model and segmenter) predict runs with."),
    grid_route: list[str] = typer.Option([], "--grid-route", help="A finding whose slide map also takes the tile "
                                         "model's grid-tile slide probability, so it needs no vessel outline "
                                         "(e.g. vasculitis; repeat for several)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
):
    """Refit a vessel classifier's slide map (highest vessel probability → slide probability) on labelled slides:
    predict scores each slide with this classifier, and a Platt map per finding is fit to the slide labels and written
    into the classifier's card. Slide AUROC per finding is unchanged (except with --grid-route); probabilities and the
    CUA-pattern score move."""
    from calciscope.inference.calibrate_slides import calibrate_slides as refit

    record = refit(model, classifier, data, None if quiet else (lambda line: console.print(line, highlight=False)),
                   grid_route=grid_route)
    table = Table(title=f"slide map of {classifier.name}, fit on {record['n_slides']} slides of "
                        f"{', '.join(record['data'])}")
    for column in ("finding", "positives", "a", "b", "grid", "ECE before", "ECE after", "Brier before", "Brier after"):
        table.add_column(column, justify="right" if column != "finding" else "left")
    for k, m in record["per_label"].items():
        table.add_row(k, str(m["positives"]), *(f"{m[c]:.3f}" if c in m else "-" for c in ("a", "b", "grid")),
                      *(f"{m[f]:.3f}" for f in ("ece_before", "ece_after", "brier_before", "brier_after")))
    out.print(table)
    kept = [k for k, m in record["per_label"].items() if m["kept_previous_map"]]
    if kept:
        console.print(f"kept the previous map for {', '.join(kept)}: these slides are all positive or all negative",
                      highlight=False)
    console.print("(ECE and Brier on the slides the map was fit on; judge it on others with 'calciscope evaluate')",
                  highlight=False)
    out.print(str(classifier / "classifier.json"), highlight=False, soft_wrap=True)




@app.command("fit-ood")
def fit_ood_cmd(
    model: Path = typer.Option(..., "--model", help="The checkpoint folder (its vessels/ networks are fit too)."),
    data: list[Path] = typer.Option(..., "--data", help="Manifest of the slides the networks were trained on "
                                    "(repeat for several)."),
    calibration: list[Path] = typer.Option([], "--calibration", help="Manifest of slides no network trained on, to "
                                           "set the thresholds (default: a quarter of --data's patients)."),
    network: list[str] = typer.Option([], "--network", help="Fit only this network (tile_model, segmenter, "
                                      "vessel_classifier, artifact_classifier; repeatable; default: all)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
):
    """Fit the out-of-distribution reference of a model and of the vessel networks beside it from the slides they
    were trained on, and write it into their cards (the weights do not change). The trainers fit it themselves; this
    adds one to networks trained without it."""
    from calciscope.inference.fit_ood import fit_ood

    refs = fit_ood(model, data, calibration, networks=network, progress=_lines(quiet))
    out.print(ood_table(refs))


def ood_table(refs: dict) -> Table:
    """One row per fitted reference: units, components, thresholds, validation false alarms."""
    table = Table(title="out-of-distribution references")
    for column in ("network", "units (reference / calibration)", "components", "unit threshold",
                   "slide threshold", "calibration slides flagged"):
        table.add_column(column, justify="left" if column == "network" else "right")
    for name, ref in refs.items():
        fit = ref.fit
        table.add_row(name, f"{fit['n_train_units']} / {fit['n_validation_units']} {ref.unit}s",
                      str(fit["components"]), f"{ref.unit_threshold:.3f}", f"{ref.slide_threshold:.0%}",
                      f"{fit.get('validation_slides_flagged', '-')} of {fit.get('n_validation_slides', '-')}")
    return table
