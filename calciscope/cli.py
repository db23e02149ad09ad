"""The ``calciscope`` command: parse, call the library, print. Everything here is callable from Python too."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import sys
import typing
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape  # messages hold file names and 'pkg[extra]': never markup
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from calciscope._version import __version__
from calciscope.errors import CalciscopeError
from calciscope.inference.config import PredictConfig, cli_fields, default_workers

app = typer.Typer(
    name="calciscope",
    help="Score H&E whole-slide images for the calciphylaxis pattern. Decision support, not a diagnosis.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console(width=None if sys.stdout.isatty() else 120)  # tables stay whole in logs and pipes


@contextmanager
def progress_bar(description: str, per_minute: bool = False):
    """A rich progress bar with rate and ETA; yields ``update(done, total)``."""
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
            if elapsed <= 0:
                rate = ""
            else:
                rate = f"{60 * done / elapsed:.1f}/min" if per_minute else f"{done / elapsed:.0f}/s"
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
    no_subcutis: bool = typer.Option(False, "--no-subcutis", help="Epidermis and dermis only (a shave): no fat."),
    calcium_artifacts: float = typer.Option(0.0, "--calcium-artifacts", metavar="P",
                                            help="Probability that a calcified vessel gets a hole, tear or chatter."),
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
            subcutis=not no_subcutis,
            calcium_artifacts=calcium_artifacts,
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
            console.print(f"[red]calciscope: error:[/red] {escape(str(exc))}", highlight=False)
            continue
        flags = ", ".join(result.qc_flags) or "none"
        out.print(f"{result.slide_id}: {result.n_tiles} tiles, QC flags: {flags} -> {result.out_dir}", highlight=False)
    if failures:
        raise typer.Exit(1)


def _findings_table(result, title: str, truth: Optional[dict[str, int]] = None) -> Table:
    table = Table(title=title)
    table.add_column("finding")
    table.add_column("probability", justify="right")
    table.add_column("threshold", justify="right")
    table.add_column("call", justify="left")
    if truth is not None:
        table.add_column("drawn in phantom", justify="left")
    for label in result.labels:
        p, t = result.probabilities[label], result.thresholds[label]
        row = [label, f"{p:.3f}", f"{t:.3f}", "above" if p >= t else "below"]
        if truth is not None:
            row.append("yes" if truth.get(label) else "no")
        table.add_row(*row)
    cua = result.cua
    if cua.get("score") is not None:
        call = ("insufficient sampling: not judged" if cua.get("status") == "insufficient_sampling"
                else f"limited by {cua['limiting_term']}")
        table.add_row("CUA-pattern score", f"{cua['score']:.3f}", "", call,
                      *([""] if truth is not None else []), style="bold")
    return table


def _cua_cell(cua: dict) -> str:
    if cua.get("score") is None:
        return "n/a"
    if cua.get("status") == "insufficient_sampling":
        return f"{cua['score']:.3f} (insufficient sampling)"
    return f"{cua['score']:.3f}"


def _vessel_line(result) -> Optional[str]:
    """One line on the vessel analysis (count, small fat vessels, adequacy), or None when it did not run."""
    analysis = result.vessels
    if analysis is None:
        return None
    a = analysis.adequacy
    n = len(analysis.vessels)
    line = (f"{result.slide_id}: {n} vessel{'' if n == 1 else 's'}, {a['small_fat_vessels']} small in subcutaneous "
            f"fat ({a['min_small_fat_vessels']} needed): sampling {a['status']}")
    if a["status"] != "sufficient":
        line += " - the CUA pattern and the absence of vasculitis cannot be judged"
    return line


def _summary_table(results) -> Table:
    labels = results[0].labels
    table = Table(title="calciscope predict (decision support, not a diagnosis)")
    table.add_column("slide")
    table.add_column("tiles", justify="right")
    for label in labels:
        table.add_column(label.replace("_", " "), justify="right")
    table.add_column("CUA pattern", justify="right")
    table.add_column("QC flags")
    for r in results:
        table.add_row(r.slide_id, str(r.n_tiles), *(f"{r.probabilities[label]:.3f}" for label in labels),
                      _cua_cell(r.cua), ", ".join(r.qc.get("flags", [])) or "-")
    return table


def predict_options(exclude: tuple[str, ...] = ()):
    """Give a command one option per ``PredictConfig`` field (flag, help and default are written once, in the
    dataclass) plus ``--config predict.yaml``; the command receives the resolved ``config``: the YAML's settings,
    then the options given on the command line."""

    def decorate(command):
        shared = cli_fields(exclude)
        hints = typing.get_type_hints(PredictConfig)
        params = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "config"]
        for f in shared:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
            option = typer.Option(None, flag, help=f.metadata["help"],
                                  show_default=str(default) if default is not None else False)
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                            annotation=Optional[_without_none(hints[f.name])], default=option))
        params.append(inspect.Parameter("predict_config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                                        default=typer.Option(None, "--config", help="Settings file (YAML) with "
                                                             "PredictConfig keys; options given here win.")))

        @functools.wraps(command)
        def wrapper(**kwargs):
            given = {f.name: kwargs.pop(f.name) for f in shared}
            given = {k: v for k, v in given.items() if v is not None}
            path = kwargs.pop("predict_config")
            config = PredictConfig.from_yaml(path, given) if path is not None else PredictConfig(**given)
            return command(config=config, **kwargs)

        wrapper.__signature__ = inspect.Signature(params)
        wrapper.__annotations__ = {}
        return wrapper

    return decorate


def _without_none(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


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
        vessels = _vessel_line(result)
        if vessels:
            out.print(vessels, highlight=False, markup=False, soft_wrap=True)
    if results:
        out.print(_summary_table(results))
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
    phantom = generate_slide(out_dir / "slides", "demo_slide", findings, size_px=size, seed=seed)
    predictor = Predictor("demo", PredictConfig(workers=workers))
    with progress_bar("scoring") as update:
        result = predictor.predict_and_write(phantom.path, out_dir, progress=update)
    title = f"{result.slide_id}: {result.card.name} (synthetic demo, not for clinical use)"
    out.print(_findings_table(result, title, truth=phantom.labels))
    flags = ", ".join(result.qc.get("flags", [])) or "none"
    out.print(f"{result.n_tiles} tiles in {result.seconds:.1f} s; QC flags: {flags}", highlight=False)
    vessels = _vessel_line(result)
    if vessels:
        out.print(vessels, highlight=False, markup=False, soft_wrap=True)
    out.print("Decision support, not a diagnosis. Report:")
    out.print(str(result.out_dir / "report.html"), highlight=False, soft_wrap=True)


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
    config: Path = typer.Option(..., "--config", help="Segmenter config (YAML); see configs/vessels.yaml."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Segmenter folder (overrides the config's 'out')."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Training steps (overrides the config's)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
):
    """Train the vessel segmenter on slides with vessel outlines (GeoJSON class 'vessel'); prints its folder.
    Put the folder at <model>/vessels, or pass it to predict/score --vessels."""
    import dataclasses

    from calciscope.training.train_segmenter import load_config as load_segmenter_config
    from calciscope.training.train_segmenter import train_segmenter

    cfg = load_segmenter_config(config)
    cfg = dataclasses.replace(cfg, **({"out": str(out_dir)} if out_dir else {}), **({"steps": steps} if steps else {}))
    folder = train_segmenter(cfg, None if quiet else (lambda line: console.print(line, highlight=False)))
    out.print(str(folder), highlight=False, soft_wrap=True)


@app.command("train-vessel-classifier")
def train_vessel_classifier(
    config: Path = typer.Option(..., "--config", help="Classifier config (YAML); see configs/vessel_classifier.yaml."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Classifier folder (overrides the config's 'out')."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs (overrides the config's)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
):
    """Train the per-vessel classifier on slides with vessel outlines whose 'findings' say what each vessel has;
    prints its folder. Put the folder at <segmenter>/classifier, or pass it to predict/score --vessel-classifier; one
    trained for calcium artifacts only (labels: [], judge_artifacts: true) goes to <segmenter>/artifact_classifier
    or --artifact-classifier."""
    import dataclasses

    from calciscope.training.train_classifier import load_config as load_classifier_config
    from calciscope.training.train_classifier import train_classifier

    cfg = load_classifier_config(config)
    cfg = dataclasses.replace(cfg, **({"out": str(out_dir)} if out_dir else {}),
                              **({"epochs": epochs} if epochs is not None else {}))
    folder = train_classifier(cfg, None if quiet else (lambda line: console.print(line, highlight=False)))
    out.print(str(folder), highlight=False, soft_wrap=True)


@app.command("calibrate-slides")
def calibrate_slides(
    classifier: Path = typer.Option(..., "--classifier", help="A 'train-vessel-classifier' folder; its card is rewritten."),
    data: list[Path] = typer.Option(..., "--data", help="Manifest of labelled slides the classifier never saw "
                                    "(repeat for several)."),
    model: str = typer.Option("demo", "--model", help="The model (tile model and segmenter) predict runs with."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
):
    """Refit a vessel classifier's slide map (highest vessel probability → slide probability) on labelled slides:
    predict scores each slide with this classifier, and a Platt map per finding is fit to the slide labels and written
    into the classifier's card. Slide AUROC per finding is unchanged; probabilities and the CUA-pattern score move."""
    from calciscope.inference.calibrate_slides import calibrate_slides as refit

    record = refit(model, classifier, data, None if quiet else (lambda line: console.print(line, highlight=False)))
    table = Table(title=f"slide map of {classifier.name}, fit on {record['n_slides']} slides of "
                        f"{', '.join(record['data'])}")
    for column in ("finding", "positives", "a", "b", "ECE before", "ECE after", "Brier before", "Brier after"):
        table.add_column(column, justify="right" if column != "finding" else "left")
    for k, m in record["per_label"].items():
        table.add_row(k, str(m["positives"]), *(f"{m[c]:.3f}" if c in m else "-" for c in "ab"),
                      *(f"{m[f]:.3f}" for f in ("ece_before", "ece_after", "brier_before", "brier_after")))
    out.print(table)
    kept = [k for k, m in record["per_label"].items() if m["kept_previous_map"]]
    if kept:
        console.print(f"kept the previous map for {', '.join(kept)}: these slides are all positive or all negative",
                      highlight=False)
    console.print("(ECE and Brier on the slides the map was fit on; judge it on others with 'calciscope evaluate')",
                  highlight=False)
    out.print(str(classifier / "classifier.json"), highlight=False, soft_wrap=True)


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


install_demo = typer.Typer(help="Maintainers: install trained networks as the shipped demo (a synthetic demo; the "
                                  "recipes in configs/ say how each was made).", no_args_is_help=True)
app.add_typer(install_demo, name="install-demo")


@install_demo.command("model")
def install_demo_model(
    model: Path = typer.Argument(..., help="A checkpoint folder marked synthetic_demo."),
    held_out: Optional[Path] = typer.Argument(None, help="An 'evaluate' metrics.json on phantoms it never saw."),
    segmenter: Optional[Path] = typer.Option(None, "--segmenter", help="A train-vessels folder to ship beside it."),
):
    """Copy a checkpoint (and its segmenter) into the package as the demo model."""
    from calciscope.model.demo import install

    out.print(str(install(model, held_out, segmenter=segmenter)), highlight=False, soft_wrap=True)


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
        console.print(f"[red]calciscope: error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("calciscope: interrupted")
        sys.exit(130)
