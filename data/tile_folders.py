"""Tiles already cut: an ImageFolder tree or a CSV of tile files, with any label set (data source "tiles").

Two layouts are read into one :class:`TileTable`:

* a directory ``root/<class_name>/<file>`` (files found recursively inside each class folder; extensions
  ``IMAGE_SUFFIXES``; hidden files and folders skipped). Class names are sorted; labels are one-hot. When root
  holds only ``train``, ``val`` and ``test`` folders (``train`` among them), each of those holds the class folders
  and gives its tiles' split (without ``val``, validation is carved from the train patients).
  Patient ids come from an optional ``root/patients.csv`` (columns ``file,patient_id``, ``file`` relative to
  ``root`` with ``/`` separators; every tile must be listed). Without it each tile's group is its file stem,
  so tiles are split one by one: only safe when no patient contributes more than one tile.
* a CSV with columns ``path`` (relative to the CSV's folder, or absolute), optional ``patient_id``, optional
  ``split`` (train/val/test, empty = let the splitter decide), then either one 0/1 column per label
  (multi-label) or a single ``label`` column of class names (multi-class; ``a;b`` = several labels).
  Every named file must exist when the table is read; whether it decodes is checked when it is read.

Images are decoded with OpenCV, converted to RGB and brought to ``tile_px`` × ``tile_px``: the shorter side is
resized to ``tile_px`` (INTER_AREA when shrinking, INTER_LINEAR when enlarging) and a non-square image is
centre-cropped, so tissue is never stretched. A training transform that crops by itself (``crop_px`` set, e.g. a
random-resized crop) gets the whole image instead, its shorter side at most ``2 × tile_px``.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from calciscope.errors import CalciscopeError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
PATIENTS_FILE = "patients.csv"
SPLITS = ("train", "val", "test")
_RESERVED = ("path", "patient_id", "split")

# (rgb uint8 HWC, seed) -> rgb uint8 HWC
SeededTransform = Callable[[np.ndarray, int], np.ndarray]


@dataclass
class TileTable:
    """Every tile of a dataset with its labels; row ``i`` of each field describes ``paths[i]``."""

    paths: list[Path]
    labels: np.ndarray  # (N, L) float32 0/1 (one-hot for multi-class)
    label_names: list[str]
    groups: list[str]  # patient id per tile (for patient-level splits)
    multiclass: bool  # every tile has exactly one label
    fixed_split: list[str | None] | None  # from an optional ``split`` column

    def __len__(self) -> int:
        return len(self.paths)


def read_tile_table(spec: str | Path, labels: Sequence[str] | None = None) -> TileTable:
    """Read an ImageFolder tree (directory) or a tile CSV; ``labels`` selects and orders the outputs.

    A label in ``labels`` the data does not have is an error listing the labels it does have; ``None`` keeps
    every label the data has (class folders / ``label`` values sorted, label columns in file order).
    """
    spec = Path(spec)
    if labels is not None:
        labels = list(labels)
        if not labels or len(set(labels)) != len(labels):
            raise CalciscopeError(f"{spec}: labels must be a non-empty list without duplicates, got {labels}")
    if spec.is_dir():
        paths, names, matrix, groups, split = _read_folder(spec)
    elif spec.is_file():
        paths, names, matrix, groups, split = _read_csv(spec, labels)
    else:
        raise CalciscopeError(f"{spec}: no such tile folder or CSV")
    matrix = _select(matrix, names, labels, spec)
    names = list(labels) if labels is not None else names
    fixed = split if split is not None and any(s is not None for s in split) else None
    return TileTable(paths=paths, labels=matrix, label_names=names, groups=groups,
                     multiclass=bool(np.all(matrix.sum(axis=1) == 1)), fixed_split=fixed)


def _select(matrix: np.ndarray, names: list[str], labels: list[str] | None, spec: Path) -> np.ndarray:
    if labels is None:
        return matrix
    missing = [name for name in labels if name not in names]
    if missing:
        raise CalciscopeError(f"{spec}: label(s) {missing} not in the data; it has {names} "
                              f"(set data.labels to some of these)")
    return np.ascontiguousarray(matrix[:, [names.index(name) for name in labels]])


# -- ImageFolder ----------------------------------------------------------------------------------------------
def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _read_folder(root: Path):
    """``root/<class>/...``, or ``root/<split>/<class>/...`` when every folder of root is train, val or test (the
    split then comes from the folder)."""
    top = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not top:
        raise CalciscopeError(f"{root}: no class folders (expected {root}/<class_name>/<tile image>)")
    splits = top if {p.name for p in top} <= set(SPLITS) and any(p.name == "train" for p in top) else [root]
    names = sorted({p.name for part in splits for p in part.iterdir() if p.is_dir() and not p.name.startswith(".")})
    paths, class_index, split = [], [], []
    for part in splits:
        for k, name in enumerate(names):
            folder = part / name
            files = sorted(p for p in folder.rglob("*")
                           if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and _visible(p, root)
                           ) if folder.is_dir() else []
            if not files and (part is root or part.name == "train"):
                raise CalciscopeError(f"{folder}: class folder has no images ({' '.join(IMAGE_SUFFIXES)})")
            paths += files
            class_index += [k] * len(files)
            split += [None if part is root else part.name] * len(files)
    matrix = np.zeros((len(paths), len(names)), np.float32)
    matrix[np.arange(len(paths)), class_index] = 1.0
    patients = root / PATIENTS_FILE
    groups = _folder_groups(patients, root, paths) if patients.is_file() else [p.stem for p in paths]
    return paths, names, matrix, groups, split if splits[0] is not root else None


def _folder_groups(patients: Path, root: Path, paths: list[Path]) -> list[str]:
    rows = _read_rows(patients, required=("file", "patient_id"))
    by_file = {}
    for line, row in rows:
        if not row["file"] or not row["patient_id"]:
            raise CalciscopeError(f"{patients}:{line}: empty file or patient_id")
        by_file[Path(row["file"]).as_posix()] = row["patient_id"]
    groups, unlisted = [], []
    for path in paths:
        rel = path.relative_to(root).as_posix()
        groups.append(by_file.get(rel, ""))
        if rel not in by_file:
            unlisted.append(rel)
    if unlisted:
        raise CalciscopeError(f"{patients}: {len(unlisted)} tile(s) have no patient_id, e.g. {unlisted[0]!r} "
                              "(list every tile, or remove the file to split tile by tile)")
    return groups


# -- CSV ------------------------------------------------------------------------------------------------------
def _read_rows(path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) pairs of a CSV with whitespace-stripped cells; missing ``required`` columns are an error."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            missing = [c for c in required if c not in columns]
            if missing:
                raise CalciscopeError(f"{path}: missing column(s) {missing}; has {columns}")
            rows = [(reader.line_num, {(k or "").strip(): (v or "").strip() for k, v in raw.items()})
                    for raw in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise CalciscopeError(f"{path}: not a readable UTF-8 CSV ({exc})") from None
    if not rows:
        raise CalciscopeError(f"{path}: no rows")
    return rows


def _read_csv(path: Path, labels: list[str] | None):
    rows = _read_rows(path, required=("path",))
    columns = list(rows[0][1])
    base = path.parent
    paths, groups, split, seen = [], [], [], {}
    for line, row in rows:
        if not row["path"]:
            raise CalciscopeError(f"{path}:{line}: empty path")
        tile = Path(row["path"]) if Path(row["path"]).is_absolute() else base / row["path"]
        if not tile.is_file():
            raise CalciscopeError(f"{path}:{line}: tile file not found: {tile}")
        if tile in seen:
            raise CalciscopeError(f"{path}:{line}: {row['path']!r} already listed on line {seen[tile]}")
        seen[tile] = line
        paths.append(tile)
        if "patient_id" in columns:
            if not row["patient_id"]:
                raise CalciscopeError(f"{path}:{line}: empty patient_id")
            groups.append(row["patient_id"])
        else:
            groups.append(tile.stem)
        value = row.get("split", "").lower() or None
        if value is not None and value not in SPLITS:
            raise CalciscopeError(f"{path}:{line}: split must be one of {SPLITS} or empty, got {row['split']!r}")
        split.append(value)
    if "label" in columns:
        names, matrix = _class_names_column(path, rows)
    else:
        names, matrix = _label_columns(path, rows, columns, labels)
    return paths, names, matrix, groups, split if "split" in columns else None


def _class_names_column(path: Path, rows) -> tuple[list[str], np.ndarray]:
    """A ``label`` column of class names; ``a;b`` lists several (multi-label), empty = no label."""
    cells = [[name.strip() for name in row["label"].split(";") if name.strip()] for _, row in rows]
    multi = any(";" in row["label"] for _, row in rows)
    if not multi:
        for (line, _), names in zip(rows, cells):
            if not names:
                raise CalciscopeError(f"{path}:{line}: empty label (a multi-class table needs one class per tile)")
    names = sorted({name for cell in cells for name in cell})
    if not names:
        raise CalciscopeError(f"{path}: the label column is empty")
    index = {name: k for k, name in enumerate(names)}
    matrix = np.zeros((len(rows), len(names)), np.float32)
    for r, cell in enumerate(cells):
        matrix[r, [index[name] for name in cell]] = 1.0
    return names, matrix


def _label_columns(path: Path, rows, columns: list[str], labels: list[str] | None) -> tuple[list[str], np.ndarray]:
    """One 0/1 column per label; with ``labels`` only those columns are read (others may hold anything)."""
    names = [c for c in columns if c and c not in _RESERVED]
    if labels is not None:
        missing = [name for name in labels if name not in names]
        if missing:
            raise CalciscopeError(f"{path}: label column(s) {missing} not in the CSV; it has {names} "
                                  f"(set data.labels to some of these)")
        names = list(labels)
    if not names:
        raise CalciscopeError(f"{path}: no label columns (add one 0/1 column per label, or a 'label' column)")
    matrix = np.zeros((len(rows), len(names)), np.float32)
    for r, (line, row) in enumerate(rows):
        for k, name in enumerate(names):
            try:
                value = float(row[name])
            except ValueError:
                value = -1.0
            if value not in (0.0, 1.0):
                raise CalciscopeError(f"{path}:{line}: column {name!r} must be 0 or 1, got {row[name]!r}")
            matrix[r, k] = value
    return names, matrix


# -- images ---------------------------------------------------------------------------------------------------
def read_tile_image(path: str | Path, tile_px: int, *, whole: bool = False) -> np.ndarray:
    """Decode an image file as RGB uint8 (tile_px, tile_px, 3): shorter side resized, centre-cropped to square.
    ``whole``: the whole image instead (shrunk so its shorter side is at most ``2 × tile_px``), for a transform that
    crops it itself."""
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise CalciscopeError(f"{path}: cannot read tile image ({exc.strerror or exc})") from None
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if bgr is None:
        raise CalciscopeError(f"{path}: not a readable image (empty, truncated or not an image)")
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    if not whole:
        return fit_square(rgb, tile_px)
    h, w = rgb.shape[:2]
    if min(h, w) > 2 * tile_px:
        scale = 2 * tile_px / min(h, w)
        rgb = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(rgb)


def fit_square(rgb: np.ndarray, tile_px: int) -> np.ndarray:
    """Resize so the shorter side is ``tile_px`` (area filter when shrinking), then centre-crop to a square."""
    h, w = rgb.shape[:2]
    if (h, w) != (tile_px, tile_px):
        scale = tile_px / min(h, w)
        size = (max(tile_px, round(w * scale)), max(tile_px, round(h * scale)))  # (w, h) for OpenCV
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        y0, x0 = (rgb.shape[0] - tile_px) // 2, (rgb.shape[1] - tile_px) // 2
        rgb = rgb[y0:y0 + tile_px, x0:x0 + tile_px]
    return np.ascontiguousarray(rgb)


class TileFileDataset(Dataset):
    """Tiles of a :class:`TileTable` (all, or the rows ``indices``) as ``(image, labels, i)``.

    image: uint8 (3, tile_px, tile_px); labels: float32 (L,); ``i`` the position in this dataset.
    ``transform(rgb, seed)`` gets ``seed = hash((seed, epoch, i)) % 2**32``, so augmentation is a function of
    (seed, epoch, i) and a resumed run sees the same tiles; :meth:`set_epoch` moves to the next stream.
    """

    def __init__(self, table: TileTable, indices: Sequence[int] | None = None, *, tile_px: int,
                 transform: SeededTransform | None = None, seed: int = 0, epoch: int = 0):
        self.table = table
        self.indices = np.arange(len(table)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.tile_px = int(tile_px)
        self.transform = transform
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.labels = torch.as_tensor(table.labels, dtype=torch.float32)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, i: int) -> np.ndarray:
        """Tile ``i`` as RGB uint8 HWC (tile_px square), after the transform."""
        whole = getattr(self.transform, "crop_px", None) == self.tile_px
        rgb = read_tile_image(self.table.paths[self.indices[i]], self.tile_px, whole=whole)
        if self.transform is not None:
            rgb = self.transform(rgb, hash((self.seed, self.epoch, int(i))) % 2**32)
        return fit_square(rgb, self.tile_px) if whole else rgb

    def __getitem__(self, i: int):
        image = torch.from_numpy(np.ascontiguousarray(self.read(i).transpose(2, 0, 1)))
        return image, self.labels[self.indices[i]], i
