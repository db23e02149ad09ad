"""``synth`` (phantom slides) and ``tile`` (tissue, QC and a tile grid of any slide)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape  # messages hold file names and 'pkg[extra]': never markup

from calciscope.cli.app import app, console, out, progress_bar
from calciscope.errors import CalciscopeError

# Commands import the library inside their bodies: `calciscope --help` then starts without torch.


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
    style: str = typer.Option("random", "--style", help="random: each finding in one of its several real "
                              "appearances (domain randomisation); classic: one drawing each, as the shipped demo's "
                              "first tile model was trained on; mixed: every third slide classic, the others "
                              "random."),
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
            style=style,
            progress=update,
        )
    out.print(manifest)


@app.command("phantom-tiles")
def phantom_tiles(
    data: list[Path] = typer.Option(..., "--data", help="A phantom manifest (calciscope synth); repeat for several."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for the tiles and one tiles.csv over all sets."),
    seed: list[int] = typer.Option([0], "--seed", help="Seed of the tile centres' jitter and random tissue points: "
                                   "one for all sets, or one per --data."),
    random_per_slide: int = typer.Option(8, "--random-per-slide", help="Tiles at random tissue points per slide."),
):
    """Cut labelled 112 µm tiles (1 µm/px) around the vessels, confounders and random tissue of phantom slides: a
    tile folder for ``train`` (data.source: tiles), labelled plainly positive or plainly negative per finding."""
    from calciscope.data.phantom_tiles import cut_phantom_tile_sets

    out.print(cut_phantom_tile_sets(data, out_dir, seed, random_per_slide=random_per_slide))


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


