"""Training examples from a slide manifest: slides + GeoJSON lesions → labelled tissue tiles.

The manifest is a CSV with ``path`` (relative to the CSV's folder or absolute) and optionally ``slide_id``,
``patient_id``, ``annotations`` (QuPath GeoJSON), ``split`` (train/val/test) and one 0/1 column per label
(slide-level labels, used for stratified splits and slide-level metrics).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from torch.utils.data import Dataset

from calciscope.data.annotations import DEFAULT_ALIASES, LabelingConfig, read_geojson, tile_labels
from calciscope.data.datasets import to_chw_uint8
from calciscope.data.slides import cached_slide, open_slide, slide_id_from_path
from calciscope.data.tiling import TileGrid, TilingConfig, make_grid
from calciscope.data.tissue import detect_tissue
from calciscope.data.vessels.sampling import vessel_grid
from calciscope.data.vessels.truth import read_vessels
from calciscope.errors import CalciscopeError
from calciscope.training.config import TrainConfig


@dataclass
class SlideRecord:
    slide_id: str
    patient_id: str
    path: Path
    annotations: Path | None
    labels: np.ndarray | None  # (L,) slide-level 0/1, when the manifest has the label columns
    split: str | None
    vessels: Path | None = None  # vessel outlines (GeoJSON, class "vessel"): column ``vessels`` or the sidecar
    artifacts: Path | None = None  # artifact annotations (GeoJSON): column ``artifacts`` or the sidecar


def read_manifest(path: str | Path, labels: Sequence[str], *, need_annotations: bool = False,
                  need_labels: bool = False) -> list[SlideRecord]:
    """Read and check a slide manifest; every problem names the manifest, the row and the value."""
    path = Path(path)
    if not path.is_file():
        raise CalciscopeError(f"{path}: no such manifest")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        rows = list(reader)
    if "path" not in columns:
        raise CalciscopeError(f"{path}: the manifest needs a 'path' column (has: {', '.join(columns)})")
    if not rows:
        raise CalciscopeError(f"{path}: the manifest lists no slides")
    has_labels = all(label in columns for label in labels)
    if (need_labels or any(label in columns for label in labels)) and not has_labels:
        missing = [label for label in labels if label not in columns]
        raise CalciscopeError(f"{path}: unknown label(s) {missing}: not columns of the manifest (columns: {', '.join(columns)})")
    records, seen = [], set()
    for row_number, row in enumerate(rows, start=2):
        where = f"{path} row {row_number}"
        slide_path = _resolve(path.parent, row["path"])
        if not slide_path.exists():  # a file, or a folder holding a DICOM series
            raise CalciscopeError(f"{where}: slide file {slide_path} does not exist")
        annotations = _resolve(path.parent, row["annotations"]) if row.get("annotations") else None
        if need_annotations and annotations is None:
            raise CalciscopeError(f"{where}: no annotations file given for {slide_path.name}")
        if annotations is not None and not annotations.is_file():
            raise CalciscopeError(f"{where}: annotation file {annotations} does not exist")
        slide_id = row.get("slide_id") or slide_id_from_path(slide_path)
        if slide_id in seen:
            raise CalciscopeError(f"{where}: slide id {slide_id!r} appears twice")
        seen.add(slide_id)
        values = None
        if has_labels:
            try:
                values = np.array([int(row[label]) for label in labels], np.float32)
            except ValueError:
                raise CalciscopeError(f"{where}: label values must be 0 or 1") from None
            if not np.isin(values, (0, 1)).all():
                raise CalciscopeError(f"{where}: label values must be 0 or 1")
        split = (row.get("split") or "").strip() or None
        vessels = _sidecar(where, path.parent, row.get("vessels"), slide_path, ".vessels.geojson", "vessel outline")
        artifacts = _sidecar(where, path.parent, row.get("artifacts"), slide_path, ".artifacts.geojson",
                             "artifact annotation")
        records.append(SlideRecord(slide_id, row.get("patient_id") or slide_id, slide_path, annotations, values, split,
                                   vessels, artifacts))
    return records


def _sidecar(where: str, base: Path, value: str | None, slide_path: Path, suffix: str, what: str) -> Path | None:
    """The row's file when the column names one (it must exist), else ``<slide stem><suffix>`` beside the slide
    when that exists, else None."""
    if value:
        p = _resolve(base, value)
        if not p.is_file():
            raise CalciscopeError(f"{where}: {what} file {p} does not exist")
        return p
    p = slide_path.with_name(slide_path.stem + suffix)
    return p if p.is_file() else None


def _resolve(base: Path, value: str) -> Path:
    p = Path(value)
    return p if p.is_absolute() else (base / p)


@dataclass
class TileExamples:
    """Every labelled tissue tile of every slide, flattened: tile m is tile ``tile_index[m]`` of slide
    ``slide_index[m]``. ``trainable[m]`` says whether tile m is in the training pool: all tiles, less the
    all-negative tiles dropped by ``data.negatives_per_slide`` (validation and evaluation always see every tile;
    hard-negative mining may bring dropped tiles back)."""

    slides: list[SlideRecord]
    grids: list[TileGrid]
    slide_index: np.ndarray
    tile_index: np.ndarray
    labels: np.ndarray  # (M, L) float32
    trainable: np.ndarray | None = None  # (M,) bool; None = every tile
    pixels: np.ndarray | None = None  # (M, tile_px, tile_px, 3) uint8 with ``data.cache_tiles``, else None

    def __post_init__(self) -> None:
        if self.trainable is None:
            self.trainable = np.ones(len(self.labels), bool)

    def tiles_of(self, slide_ids: Sequence[int], *, trainable_only: bool = False) -> np.ndarray:
        mask = np.isin(self.slide_index, np.asarray(slide_ids))
        return np.flatnonzero(mask & self.trainable if trainable_only else mask)

    def slide_labels(self) -> np.ndarray:
        """(S, L) slide-level labels: the manifest's, else 'any tile positive'."""
        out = np.zeros((len(self.slides), self.labels.shape[1]), np.float32)
        for s, record in enumerate(self.slides):
            if record.labels is not None:
                out[s] = record.labels
            else:
                mask = self.slide_index == s
                out[s] = self.labels[mask].max(axis=0) if mask.any() else 0
        return out


def tiling_config(config: TrainConfig) -> TilingConfig:
    return TilingConfig(mpp=config.data.mpp, tile_px=config.data.tile_px, min_tissue=config.data.min_tissue)


def labeling_config(config: TrainConfig) -> LabelingConfig:
    return LabelingConfig(labels=tuple(config.data.labels), aliases={**DEFAULT_ALIASES, **config.data.aliases},
                          min_fraction=config.data.min_lesion_fraction, min_area_um2=config.data.min_lesion_um2)


def build_tile_examples(records: list[SlideRecord], config: TrainConfig,
                        progress: Callable[[int, int], None] | None = None) -> TileExamples:
    """Tissue mask, grid and lesion labels for each slide; every tissue tile is kept, and at most
    ``negatives_per_slide`` all-negative tiles per slide (a seeded random choice) are marked trainable.
    With ``data.cache_tiles`` every tile is also decoded once, here, into one uint8 array (read in slide order,
    about 1 ms a tile; DataLoader workers then share it instead of decoding JPEG tiles every epoch)."""
    tiling, labeling = tiling_config(config), labeling_config(config)
    grids, slide_index, tile_index, labels, trainable, pixels = [], [], [], [], [], []
    for s, record in enumerate(records):
        with open_slide(record.path) as slide:
            grid, vessel_labels, on_vessel = sampled_grid(slide, record, config, tiling)
            y = (tile_labels(read_geojson(record.annotations, labeling), grid, slide.dimensions, labeling)
                 if record.annotations is not None else np.zeros((len(grid), len(labeling.labels)), np.uint8))
            y = np.maximum(y, vessel_labels)
            if config.data.cache_tiles:
                size = config.data.tile_px
                pixels.append(np.stack([grid.read(slide, i) for i in range(len(grid))]) if len(grid)
                              else np.zeros((0, size, size, 3), np.uint8))
        keep = np.ones(len(grid), bool)
        cap = config.data.negatives_per_slide
        if cap is not None:  # on grid tiles only: every vessel tile is kept (normal vessels are the hard negatives)
            negatives = np.flatnonzero((y.sum(axis=1) == 0) & ~on_vessel)
            if len(negatives) > cap:
                rng = np.random.default_rng([config.seed, s])
                keep[np.setdiff1d(negatives, rng.choice(negatives, cap, replace=False))] = False
        grids.append(grid)
        slide_index.append(np.full(len(grid), s))
        tile_index.append(np.arange(len(grid)))
        labels.append(y.astype(np.float32))
        trainable.append(keep)
        if progress is not None:
            progress(s + 1, len(records))
    if not grids or sum(len(t) for t in tile_index) == 0:
        raise CalciscopeError("no tissue tiles in any slide of the manifest")
    return TileExamples(records, grids, np.concatenate(slide_index), np.concatenate(tile_index),
                        np.concatenate(labels), np.concatenate(trainable),
                        np.concatenate(pixels) if config.data.cache_tiles else None)


def sampled_grid(slide, record: SlideRecord, config: TrainConfig, tiling: TilingConfig):
    """The slide's tiles as ``data.sampling`` asks: (grid, (N, L) uint8 labels from the vessels' own findings,
    (N,) bool vessel tile). "grid": the tissue grid; "vessels": tiles centred on the annotated vessels
    (calciscope.data.vessels.sampling); "both": the grid followed by the vessel tiles. A vessel's centre tile is labelled
    with the vessel's ``findings`` (when its annotation lists them) on top of the lesion-polygon labels every tile
    gets; the tiles around a large vessel's wall get the lesion-polygon labels only.
    """
    labels = list(config.data.labels)
    sampling = config.data.sampling
    grid = make_grid(slide, detect_tissue(slide), tiling)
    if sampling == "grid":
        return grid, np.zeros((len(grid), len(labels)), np.uint8), np.zeros(len(grid), bool)
    if record.vessels is None:
        raise CalciscopeError(f"{record.path}: data.sampling {sampling!r} needs vessel outlines: a 'vessels' column "
                              f"in the manifest or {record.path.stem}.vessels.geojson beside the slide")
    vessels = read_vessels(record.vessels)
    vgrid, owner = vessel_grid(slide, [v.polygon for v in vessels], tiling)
    vlabels = np.zeros((len(vgrid), len(labels)), np.uint8)
    for m in np.flatnonzero(vgrid.colrow[:, 1] == 0):
        for finding in vessels[owner[m]].findings:
            if finding in labels:
                vlabels[m, labels.index(finding)] = 1
    if sampling == "vessels":
        return vgrid, vlabels, np.ones(len(vgrid), bool)
    both = dataclasses.replace(grid, xy=np.concatenate([grid.xy, vgrid.xy]),
                               colrow=np.concatenate([grid.colrow, vgrid.colrow]),
                               tissue_fraction=np.concatenate([grid.tissue_fraction, vgrid.tissue_fraction]),
                               n_candidates=grid.n_candidates + vgrid.n_candidates)
    return (both, np.concatenate([np.zeros((len(grid), len(labels)), np.uint8), vlabels]),
            np.concatenate([np.zeros(len(grid), bool), np.ones(len(vgrid), bool)]))


def example_seed(seed: int, epoch: int, index: int) -> int:
    """A per-example augmentation seed that depends only on (run seed, epoch, example), never on the process."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


class TileTrainingDataset(Dataset):
    """Tiles read from slides on the fly (or from the examples' decoded cache), augmented with a seed fixed by
    (seed, epoch, tile).

    Items: (uint8 CHW image, float labels (L,), position in ``indices``).
    """

    def __init__(self, examples: TileExamples, indices: np.ndarray, *, transform=None, seed: int = 0):
        self.examples = examples
        self.indices = np.asarray(indices)
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int):
        m = int(self.indices[j])
        if self.examples.pixels is not None:
            rgb = self.examples.pixels[m].copy()  # transforms may work in place; the cache stays as decoded
        else:
            s = int(self.examples.slide_index[m])
            rgb = self.examples.grids[s].read(cached_slide(self.examples.slides[s].path), int(self.examples.tile_index[m]))
        if self.transform is not None:
            rgb = self.transform(rgb, seed=example_seed(self.seed, self.epoch, m))
        return to_chw_uint8(rgb), self.examples.labels[m], j
