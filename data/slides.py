"""Open any slide format behind one interface with explicit units.

Backends, tried in this order:
  * OpenSlide (``openslide-python`` + the ``openslide-bin`` wheel) for .svs .tif .tiff .ndpi .mrxs .scn .bif .vms ...
  * ``tiffslide`` for TIFFs OpenSlide rejects,
  * Pillow for plain images (.png .jpg .jpeg .bmp, flat .tif) as a single level.

A DICOM WSI is a series of files: a slide path may name the series' folder, as PACS and scanners export it, or
any one of its files (``calciscope.data.dicom`` picks the file OpenSlide opens a folder by; a folder of two series
is refused). Its mpp comes from the DICOM Pixel Spacing (OpenSlide's ``openslide.mpp-x``).

Units: ``level0_xy`` is always (x, y) in level-0 pixels; ``size_px`` is always (w, h) in pixels *of the level
read*; ``mpp`` is micrometres per pixel at level 0. The label and macro images are never exposed: they carry
patient identifiers, and so do a DICOM file's patient attributes, which nothing here passes on (only the Series
Instance UID, when a caller asks for it). A ``Slide`` pickles by path, so every DataLoader worker opens its own
handle.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from calciscope.data import dicom
from calciscope.data.tiff_tiles import TiffTiles
from calciscope.errors import SlideError

OPENSLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide"}
PLAIN_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
TIFF_SUFFIXES = {".tif", ".tiff"}
SLIDE_SUFFIXES = OPENSLIDE_SUFFIXES | PLAIN_SUFFIXES  # each such file is one slide; a DICOM file is part of one

_NOT_DICOM = frozenset(SLIDE_SUFFIXES)  # files never read as DICOM when a folder is searched for a series
# Pillow's decompression-bomb guard stays on; a plain image above this is refused with advice.
MAX_PLAIN_PIXELS = 30_000 * 30_000
# An mpp outside this range is a metadata error, not a microscope.
_MPP_RANGE = (0.05, 100.0)


@dataclass(frozen=True)
class SlideInfo:
    """What later stages record about a slide (nothing here can identify a patient)."""

    slide_id: str
    backend: str
    vendor: str | None
    mpp: float
    mpp_source: str  # "metadata" or "override"
    objective_power: float | None
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    dicom_series_uid: str | None = None  # a DICOM slide's Series Instance UID, only when the caller asked for it


def slide_id_from_path(path: str | Path) -> str:
    """A filesystem-safe id from a file (or DICOM series folder) name: letters, digits, '.', '_' and '-' only,
    never empty or dotted."""
    stem = Path(path).name
    for suffix in sorted(SLIDE_SUFFIXES | {dicom.DICOM_SUFFIX}, key=len, reverse=True):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return safe_id(stem)


def is_slide_path(path: str | Path) -> bool:
    """Whether ``path`` names a slide: a slide file (by its suffix), a DICOM file (``.dcm``, standing for its
    series) or a folder that holds a DICOM series."""
    path = Path(path)
    if path.name.startswith("."):
        return False
    if path.is_dir():
        return dicom.holds_series(path, _NOT_DICOM)
    return path.is_file() and (_has_slide_suffix(path) or path.suffix.lower() == dicom.DICOM_SUFFIX)


def find_slides(folder: str | Path) -> list[Path]:
    """The slides a folder holds: the folder itself when DICOM files lie directly in it (a series folder), then in
    name order its slide files and each subfolder that holds a DICOM series (one slide, named after the subfolder:
    the layout of a PACS or scanner export). Loose ``.dcm`` files are never slides of their own."""
    folder = Path(folder)
    found = [folder] if dicom.holds_series(folder, _NOT_DICOM) else []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if (path.is_file() and _has_slide_suffix(path)) or (path.is_dir() and dicom.holds_series(path, _NOT_DICOM)):
            found.append(path)
    return found


def slides_among(paths) -> list[Path]:
    """The slides among ``paths`` (a glob's matches), each once, in the order given: slide files, folders that hold a
    DICOM series, and for DICOM files their folder (so ``export/**/*.dcm`` gives one slide per series folder)."""
    found: dict[Path, None] = {}
    for path in map(Path, paths):
        if path.is_file() and path.suffix.lower() == dicom.DICOM_SUFFIX and not path.name.startswith("."):
            path = path.parent
        if is_slide_path(path):
            found.setdefault(path, None)
    return list(found)


def _has_slide_suffix(path: Path) -> bool:
    name = path.name.lower()
    return not name.startswith(".") and any(name.endswith(s) for s in SLIDE_SUFFIXES)


def safe_id(text: str, max_len: int = 120) -> str:
    """Sanitize a user-supplied id so it can only ever name one directory inside the output folder."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._")
    return cleaned[:max_len] or "slide"


class Slide:
    """A read-only whole-slide image. Use :func:`open_slide` to make one."""

    def __init__(self, path: str | Path, mpp: float | None = None, *, direct_tiles: bool = True):
        self.path = Path(path)
        self._mpp_override = mpp
        self._direct_tiles = direct_tiles
        self._open()

    # -- lifecycle -------------------------------------------------------------------------------------------
    def _open(self) -> None:
        path = self.path
        if not path.exists():
            raise SlideError(path, "no such file")
        file = dicom.slide_file(path) if path.is_dir() else path  # a folder can only be a DICOM series
        try:
            size = file.stat().st_size
        except OSError as exc:
            raise SlideError(path, f"cannot be read ({exc.strerror})") from exc
        if size == 0:
            raise SlideError(path, "is empty (0 bytes)")
        if not os.access(file, os.R_OK):
            raise SlideError(path, "cannot be read (permission denied)")

        suffix = file.suffix.lower()
        errors: list[str] = []
        self._handle = None
        if suffix not in PLAIN_SUFFIXES:
            for opener in (_open_openslide, _open_tiffslide):
                if opener is _open_tiffslide and suffix not in TIFF_SUFFIXES:
                    continue
                try:
                    self._handle, self.backend = opener(file)
                    break
                except SlideError:
                    raise
                except Exception as exc:  # backends raise their own types; collect them for one message
                    errors.append(f"{opener.__name__[6:]}: {_first_line(exc)}")
        if self._handle is None and (suffix in PLAIN_SUFFIXES or suffix in TIFF_SUFFIXES):
            try:
                self._handle, self.backend = _open_pillow(file)
            except SlideError:
                raise
            except Exception as exc:
                errors.append(f"pillow: {_first_line(exc)}")
        if self._handle is None:
            if suffix not in SLIDE_SUFFIXES and not errors:
                raise SlideError(path, f"unsupported file type '{suffix or '(none)'}'")
            raise SlideError(path, "not a readable slide or image (" + "; ".join(errors) + ")")

        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(
            (int(w), int(h)) for w, h in self._handle.level_dimensions
        )
        self.level_downsamples: tuple[float, ...] = tuple(float(d) for d in self._handle.level_downsamples)
        props = self._handle.properties
        self.vendor = props.get("openslide.vendor") or props.get("tiffslide.vendor")
        power = props.get("openslide.objective-power") or props.get("tiffslide.objective-power")
        self.objective_power = _to_float(power)
        self._series_uid = props.get("dicom.SeriesInstanceUID") if self.vendor == "dicom" else None
        self._metadata_mpp = _metadata_mpp(props)
        self._tiles = None
        if self.backend == "openslide" and self._direct_tiles:
            self._tiles = TiffTiles.open(file, self.level_dimensions, self.vendor, self._openslide_level_region)
        self._check_readable()

    def _check_readable(self) -> None:
        """Decode a few pixels of the smallest level: catches truncated files at open, not mid-batch."""
        level = self.level_count - 1
        w, h = self.level_dimensions[level]
        if w <= 0 or h <= 0:
            raise SlideError(self.path, "has an empty image (0 pixels)")
        ds = self.level_downsamples[level]
        for fx, fy in ((0.5, 0.5), (0.999, 0.999)):  # centre and last tile: truncation cuts the end of the file
            x, y = int(w * fx), int(h * fy)
            self.read_region((int(x * ds), int(y * ds)), level, (1, 1))

    def close(self) -> None:
        if self._tiles is not None:
            self._tiles.close()
            self._tiles = None
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {"path": self.path, "mpp": self._mpp_override, "direct_tiles": self._direct_tiles}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["mpp"], direct_tiles=state.get("direct_tiles", True))

    def __repr__(self) -> str:
        return f"Slide({str(self.path)!r}, backend={self.backend!r}, levels={self.level_count}, mpp={self.mpp_or_none})"

    # -- geometry --------------------------------------------------------------------------------------------
    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in pixels."""
        return self.level_dimensions[0]

    @property
    def direct_tile_levels(self) -> tuple[int, ...]:
        """The levels whose pixels are decoded straight from the file's tiles (``data.tiff_tiles``), not by OpenSlide."""
        if self._tiles is None:
            return ()
        return tuple(i for i, level in enumerate(self._tiles.levels) if level is not None)

    @property
    def slide_id(self) -> str:
        return slide_id_from_path(self.path)

    @property
    def mpp_or_none(self) -> float | None:
        return self._mpp_override if self._mpp_override is not None else self._metadata_mpp

    @property
    def mpp(self) -> float:
        """Micrometres per level-0 pixel; a slide without it (and no override) is an error, never a guess."""
        mpp = self.mpp_or_none
        if mpp is None:
            raise SlideError(self.path, "has no resolution (mpp) in its metadata; pass the slide's µm/px with --slide-mpp")
        return mpp

    @property
    def dicom_series_uid(self) -> str | None:
        """The Series Instance UID of a DICOM slide (None for other formats)."""
        return self._series_uid

    def info(self, *, series_uid: bool = False) -> SlideInfo:
        """What outputs may record about the slide; a DICOM slide's Series Instance UID only with ``series_uid``
        (it links the result back to the study in the PACS)."""
        return SlideInfo(
            slide_id=self.slide_id,
            backend=self.backend,
            vendor=self.vendor,
            mpp=self.mpp,
            mpp_source="override" if self._mpp_override is not None else "metadata",
            objective_power=self.objective_power,
            level_dimensions=self.level_dimensions,
            level_downsamples=self.level_downsamples,
            dicom_series_uid=self.dicom_series_uid if series_uid else None,
        )

    def best_level_for_downsample(self, downsample: float) -> int:
        """The highest-resolution level we can read *down* from: its downsample ≤ the one asked for (1% slack)."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * 1.01:
                best = level
        return best

    # -- pixels ----------------------------------------------------------------------------------------------
    def read_region(self, level0_xy: tuple[int, int], level: int, size_px: tuple[int, int]) -> np.ndarray:
        """RGB uint8 array (h, w, 3) of ``size_px`` = (w, h) pixels at ``level``, top-left at level-0 ``level0_xy``.

        Pixels outside the slide or transparent in the file come back white (the colour of glass). A tiled TIFF's
        tiles are decoded directly where that gives OpenSlide's pixels (``data.tiff_tiles``).
        """
        if self._handle is None:
            raise SlideError(self.path, "slide is closed")
        x, y = (int(v) for v in level0_xy)
        w, h = (int(v) for v in size_px)
        level = int(level)
        if self._tiles is not None and self._tiles.covers(level, x, y, self.level_downsamples[level]):
            ds = int(self.level_downsamples[level])
            try:
                return self._tiles.read(level, x // ds, y // ds, w, h)
            except Exception as exc:
                raise SlideError(self.path, f"cannot decode pixels at level {level} ({x}, {y}): "
                                            f"{_first_line(exc)}") from exc
        try:
            region = self._handle.read_region((x, y), int(level), (w, h))
        except Exception as exc:
            raise SlideError(self.path, f"cannot decode pixels at level {level} ({x}, {y}): {_first_line(exc)}") from exc
        return _to_rgb(region)

    def enlarge_tile_cache(self, capacity_bytes: int) -> bool:
        """Give this slide a private OpenSlide cache of decoded tiles of ``capacity_bytes`` (OpenSlide's own: 32 MiB
        per handle), for a reader that comes back to tiles it decoded a while ago (the vessel segmenter's next row of
        windows), and the same to the tiles decoded directly (``data.tiff_tiles``). False where the backend has none
        (tiffslide, pillow) or the OpenSlide library is older than 4."""
        if self.backend != "openslide" or self._handle is None:
            return False
        if self._tiles is not None:
            self._tiles.set_cache_bytes(capacity_bytes)
        import openslide

        try:
            self._handle.set_cache(openslide.OpenSlideCache(int(capacity_bytes)))
        except (AttributeError, openslide.OpenSlideError):  # openslide-python < 1.3, or OpenSlide < 4.0
            return False
        return True

    def _openslide_level_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """OpenSlide's RGB of a region at ``level`` from level pixel (x, y) (the direct reader's check)."""
        ds = self.level_downsamples[level]
        return _to_rgb(self._handle.read_region((round(x * ds), round(y * ds)), level, (w, h)))

    def read_downsampled(self, downsample: float, *, strip_px: int = 2048) -> np.ndarray:
        """The whole slide shrunk by ``downsample`` (relative to level 0), read in strips from the best level.

        Memory stays bounded by the output plus one strip, whatever the slide's size.
        """
        downsample = max(1.0, float(downsample))
        level = self.best_level_for_downsample(downsample)
        lw, lh = self.level_dimensions[level]
        level_ds = self.level_downsamples[level]
        scale = level_ds / downsample  # level px -> output px (≤ 1)
        out_w = max(1, int(round(self.dimensions[0] / downsample)))
        out_h = max(1, int(round(self.dimensions[1] / downsample)))
        out = np.empty((out_h, out_w, 3), np.uint8)
        rows_per_strip = max(1, int(strip_px * scale))  # output rows per strip
        for oy in range(0, out_h, rows_per_strip):
            oh = min(rows_per_strip, out_h - oy)
            ly0 = int(math.floor(oy / scale))
            ly1 = min(lh, max(ly0 + 1, int(math.ceil((oy + oh) / scale))))
            strip = self.read_region((0, int(round(ly0 * level_ds))), level, (lw, ly1 - ly0))
            out[oy : oy + oh] = _resize(strip, (out_w, oh))
        return out

    def thumbnail(self, max_px: int = 1024) -> np.ndarray:
        """RGB thumbnail whose longer side is at most ``max_px`` (drawn from the pyramid, never the vendor's
        stored thumbnail, label or macro image)."""
        return self.read_downsampled(max(self.dimensions) / max_px)


def open_slide(path: str | Path, mpp: float | None = None, *, direct_tiles: bool = True) -> Slide:
    """Open a slide of any supported format; ``mpp`` (µm/px at level 0) overrides the file's metadata.
    ``direct_tiles=False`` reads every pixel through the backend (OpenSlide), never ``data.tiff_tiles``."""
    if mpp is not None and not (_MPP_RANGE[0] <= mpp <= _MPP_RANGE[1]):
        raise SlideError(path, f"mpp override {mpp} µm/px is outside the plausible range {_MPP_RANGE}")
    return Slide(path, mpp=mpp, direct_tiles=direct_tiles)


@lru_cache(maxsize=16)
def _cached_slide(path: str, mpp: float | None, pid: int) -> Slide:
    return Slide(path, mpp=mpp)


def cached_slide(path: str | Path, mpp: float | None = None) -> Slide:
    """A per-process handle cache for datasets: each DataLoader worker (process) gets its own handles."""
    return _cached_slide(str(path), mpp, os.getpid())


# -- backends ------------------------------------------------------------------------------------------------
def _open_openslide(path: Path):
    import openslide

    return openslide.OpenSlide(str(path)), "openslide"


def _open_tiffslide(path: Path):
    import tiffslide

    return tiffslide.TiffSlide(str(path)), "tiffslide"


def _open_pillow(path: Path):
    return _PillowHandle(path), "pillow"


class _PillowHandle:
    """A plain image seen as a one-level slide; mpp only from TIFF resolution tags in cm or inch."""

    def __init__(self, path: Path):
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img = Image.open(path)
                w, h = img.size
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise SlideError(path, f"image too large for a plain-image reader ({exc}); convert it to a pyramidal TIFF") from exc
        if w * h > MAX_PLAIN_PIXELS:
            raise SlideError(path, f"image too large for a plain-image reader ({w}×{h} px); convert it to a pyramidal TIFF")
        self.properties: dict[str, str] = {}
        if img.format == "TIFF":
            mpp = _tiff_tag_mpp(img)
            if mpp is not None:
                self.properties["openslide.mpp-x"] = self.properties["openslide.mpp-y"] = str(mpp)
        img.load()
        self._img = img.convert("RGB")
        img.close()
        self.level_dimensions = ((w, h),)
        self.level_downsamples = (1.0,)

    def read_region(self, xy, level, size):
        x, y = xy
        w, h = size
        return self._img.crop((x, y, x + w, y + h))  # out-of-bounds areas come back black; _to_rgb can't tell

    def close(self):
        self._img = None


def _tiff_tag_mpp(img: Image.Image) -> float | None:
    tags = getattr(img, "tag_v2", {})
    unit = tags.get(296, 2)  # ResolutionUnit: 1 none, 2 inch, 3 cm
    res = tags.get(282)
    if not res or unit == 1:
        return None
    per_um = float(res) / (25_400.0 if unit == 2 else 10_000.0)
    return 1.0 / per_um if per_um > 0 else None


# -- helpers -------------------------------------------------------------------------------------------------
def _metadata_mpp(props) -> float | None:
    for key in ("openslide.mpp-x", "tiffslide.mpp-x"):
        mpp = _to_float(props.get(key))
        if mpp is not None and _MPP_RANGE[0] <= mpp <= _MPP_RANGE[1]:
            return mpp
    return None


def _to_float(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) and out > 0 else None


def _to_rgb(region) -> np.ndarray:
    import cv2

    arr = np.asarray(region)
    if arr.ndim == 2:
        return cv2.cvtColor(arr, cv2.COLOR_GRAY2RGB)
    if arr.shape[2] == 4:
        alpha = cv2.extractChannel(arr, 3)
        rgb = cv2.cvtColor(arr, cv2.COLOR_RGBA2RGB)
        if cv2.minMaxLoc(alpha)[0] < 255:  # OpenSlide pads out-of-slide areas with transparent black: show glass
            rgb[alpha == 0] = 255
        return rgb
    return np.ascontiguousarray(arr[..., :3])


def _resize(arr: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    import cv2

    if (arr.shape[1], arr.shape[0]) == tuple(size_wh):
        return arr
    shrink = size_wh[0] < arr.shape[1]
    return cv2.resize(arr, size_wh, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
