"""H&E phantom slides of skin + subcutaneous fat with ground truth, for tests, the demo and saliency checks.

No public calciphylaxis slides exist, so calciscope draws its own. `generate_slide` writes, per slide:

- ``<slide_id>.tiff``: square RGB pyramid (level 0 plus downsamples 4, 16 and 64 when >= 32 px), 256 px
  JPEG tiles, reduced levels as further pages, resolution tags in px/cm, so OpenSlide opens it as
  ``generic-tiff`` and reports ``openslide.mpp-x``. Pixels are rendered by Beer-Lambert from haematoxylin and
  eosin optical-density fields, using stain vectors measured on a real Aperio scan (see phantom.stain).
- ``<slide_id>.geojson``: lesion polygons (QuPath export format, level-0 px), one per drawn lesion, only
  for the finding classes asked for. Vascular lesions lie inside their vessel outline, except vasculitis,
  whose polygon also covers the perivascular infiltrate (up to VASCULITIS_CUFF_UM beyond the wall).
- ``<slide_id>.vessels.geojson``: every vessel (class ``vessel``) as a Polygon whose outer ring is the drawn
  outer wall and whose first hole is the drawn lumen (narrowed by intimal fibrosis, or filled by thrombus,
  where the vessel has those), with properties vessel_id, kind, compartment (dermis | fat), findings and
  sizes in um: ``outer_diameter_um`` / ``lumen_diameter_um`` = minor axis of the ellipse cv2.fitEllipse fits
  to the written outer / lumen ring (the calibre a pathologist measures), ``outer_major_um`` = the outer
  ring's major axis, ``wall_thickness_um`` = (outer minor - lumen minor) / 2.
- ``<slide_id>.artifacts.geojson``: confounders and artifacts (pen_mark, fold, blur, debris,
  perivascular_infiltrate, border), then the calcium sectioning artifacts when asked for (class
  ``calcium_artifact``, properties ``kind`` = hole | tear | chatter and ``vessel_id``; the polygon is the
  affected area). Every polygon in the GeoJSON files is in level-0 px.
- ``<slide_id>.tissue.png``: the true tissue mask (0/255) at downsample TISSUE_MASK_DOWNSAMPLE = 16 of level 0,
  shape ceil(size_px / 16) square; a cell is tissue when >= half its level-0 pixels are (fat included; glass,
  pen on glass and the black border excluded).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import tifffile

from calciscope.data.phantom.looks import STYLES
from calciscope.data.phantom.raster import render_strip
from calciscope.data.phantom.scene import build_scene
from calciscope.errors import CalciscopeError

FINDINGS = ("medial_calcification", "small_vessel_calcification", "thrombosis", "vasculitis")
OPTIONAL_FINDINGS = ("extravascular_calcification", "intimal_fibrosis", "necrosis")
ALL_FINDINGS = FINDINGS + OPTIONAL_FINDINGS
FINDING_COLORS = {
    "medial_calcification": (96, 32, 160),
    "small_vessel_calcification": (48, 64, 200),
    "thrombosis": (200, 32, 32),
    "vasculitis": (230, 150, 0),
    "extravascular_calcification": (0, 140, 160),
    "intimal_fibrosis": (120, 160, 40),
    "necrosis": (110, 80, 60),
}
ARTIFACT_COLORS = {
    "pen_mark": (0, 160, 0), "fold": (90, 90, 90), "blur": (150, 150, 220), "debris": (60, 0, 90),
    "perivascular_infiltrate": (240, 200, 0), "border": (0, 0, 0), "vessel": (200, 60, 120),
    "calcium_artifact": (0, 200, 220),
}
VASCULITIS_CUFF_UM = 30.0
TISSUE_MASK_DOWNSAMPLE = 16
TILE_PX = 256
STRIP_PX = 512
MIN_SIZE_PX = 512
_SLIDE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class PhantomSlide:
    slide_id: str
    patient_id: str
    path: Path  # <out>/<slide_id>.tiff
    lesions_path: Path  # <out>/<slide_id>.geojson
    vessels_path: Path  # <out>/<slide_id>.vessels.geojson
    artifacts_path: Path  # <out>/<slide_id>.artifacts.geojson
    tissue_mask_path: Path  # <out>/<slide_id>.tissue.png
    labels: dict[str, int]  # finding -> 0/1 (every finding asked for, present or not)
    mpp: float
    size_px: int


def cua_pattern(labels: Mapping[str, int]) -> int:
    """1 when (medial or small-vessel calcification) and thrombosis and not vasculitis; missing = 0."""
    g = lambda k: int(bool(labels.get(k, 0)))  # noqa: E731
    calc = g("medial_calcification") or g("small_vessel_calcification")
    return int(bool(calc and g("thrombosis") and not g("vasculitis")))


# --------------------------------------------------------------------------------------------- validation
def _check_common(size_px, mpp) -> None:
    if not isinstance(size_px, (int, np.integer)) or size_px < MIN_SIZE_PX:
        raise CalciscopeError(f"size_px must be an integer >= {MIN_SIZE_PX}, got {size_px!r}")
    if not isinstance(mpp, (int, float)) or not math.isfinite(mpp) or mpp <= 0:
        raise CalciscopeError(f"mpp must be a positive number of micrometres per pixel, got {mpp!r}")


MIXED = "mixed"  # a dataset's style: every third slide (i % 3 == 2) classic, the others random


def _check_style(style, allowed: tuple[str, ...] = STYLES) -> None:
    if style not in allowed:
        raise CalciscopeError(f"style must be one of {', '.join(allowed)}, got {style!r}")


def slide_style(style: str, i: int) -> str:
    """The drawing of slide ``i`` (0-based) of a dataset drawn in ``style``."""
    return ("classic" if i % 3 == 2 else "random") if style == MIXED else style


def _check_names(names, what: str) -> None:
    for name in names:
        if name not in ALL_FINDINGS:
            raise CalciscopeError(f"unknown finding {name!r} in {what}; known: {', '.join(ALL_FINDINGS)}")


def _check_labels(labels: Mapping[str, int]) -> dict[str, int]:
    if not isinstance(labels, Mapping):
        raise CalciscopeError(f"labels must be a mapping finding -> 0/1, got {type(labels).__name__}")
    _check_names(labels, "labels")
    out = {}
    for k in ALL_FINDINGS:  # canonical order, so dict order never changes the drawing
        if k in labels:
            v = labels[k]
            if v not in (0, 1) or isinstance(v, float) and not float(v).is_integer():
                raise CalciscopeError(f"label {k!r} must be 0 or 1, got {v!r}")
            out[k] = int(v)
    return out


# --------------------------------------------------------------------------------------------- one slide
def generate_slide(out_dir, slide_id: str, labels: Mapping[str, int], *, size_px: int = 4096, mpp: float = 0.5,
                   seed: int = 0, patient_id: str | None = None, artifacts: bool = True, subcutis: bool = True,
                   calcium_artifacts: float = 0.0, style: str = "random") -> PhantomSlide:
    """Draw one phantom slide with the given finding labels and write its files into out_dir.

    Same (seed, slide_id, labels, size_px, mpp, artifacts, subcutis, calcium_artifacts, style) -> byte-identical
    files.

    `style` "random" (domain randomisation, phantom.looks) draws every finding and confounder in one of the several
    appearances it has in real tissue, with stains, textures, sizes and colours drawn per slide; the vessel and
    lesion GeoJSON properties ``appearance`` say which. "classic" draws each finding one way, as the phantoms the
    shipped demo model was trained on (byte-identical to them); vessels and lesions lie in the same places in both. `artifacts=False` leaves out pen marks, folds, blur and the black border (stain/scanner variation
    and the histologic confounders stay).

    `subcutis=False` draws a shave / shallow punch: epidermis and dermis to the deep edge, no fat, so every
    vessel is in the dermis. Findings the generator puts in fat go to the dermis: vessel lesions on dermal
    vessels (no small arteries: those draws become deep-dermal arterioles of 1/3 the diameter), necrosis as
    ischaemic dermal necrosis, extravascular calcification as clusters of calcified elastic fibres.

    `calcium_artifacts` (probability in [0, 1]) gives each calcified vessel (medial or small-vessel
    calcification) a sectioning artifact of its calcium: a ``hole`` (the deposit fell out: glass), a ``tear``
    (a crack 40-200 um long, up to 15 um wide, from the wall into the tissue) or knife ``chatter`` (pale bands
    6-15 um apart over a 100-300 um patch on the vessel). They draw from a random stream of their own, so
    everything outside their polygons is as with calcium_artifacts = 0, which draws none.
    """
    _check_common(size_px, mpp)
    _check_style(style)
    if isinstance(calcium_artifacts, bool) or not isinstance(calcium_artifacts, (int, float)) \
            or not 0 <= calcium_artifacts <= 1:
        raise CalciscopeError(f"calcium_artifacts must be a probability in [0, 1], got {calcium_artifacts!r}")
    if not isinstance(slide_id, str) or not _SLIDE_ID.match(slide_id):
        raise CalciscopeError(f"slide_id must be letters, digits, '.', '_' or '-', got {slide_id!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise CalciscopeError(f"seed must be a non-negative integer, got {seed!r}")
    labels = _check_labels(labels)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    size_px, mpp = int(size_px), float(mpp)
    ss = np.random.SeedSequence([int(seed), zlib.crc32(slide_id.encode())])
    scene, fields, drawn = build_scene(size_px, mpp, ss, labels, artifacts, subcutis=bool(subcutis),
                                       calcium_p=float(calcium_artifacts), style=style)
    paths = {k: out / f"{slide_id}{ext}" for k, ext in (
        ("tiff", ".tiff"), ("les", ".geojson"), ("ves", ".vessels.geojson"), ("art", ".artifacts.geojson"),
        ("mask", ".tissue.png"))}
    mask = _write_tiff(paths["tiff"], scene, fields, fields["style"]["jpeg_quality"])
    _atomic_bytes(paths["mask"], cv2.imencode(".png", mask)[1].tobytes())
    lesions = [_feature(slide_id, "lesion", i, name, poly, FINDING_COLORS[name], size_px, *props)
               for i, (name, poly, *props) in enumerate(scene.lesions)]
    _write_geojson(paths["les"], lesions)
    vessels = []
    for v in scene.vessels:
        outer, lumen = _ring(v.ring(v.ro), size_px), _ring(v.lumen[::-1], size_px)
        (o_minor, o_major), (l_minor, _) = _axes(outer), _axes(lumen)
        props = {"vessel_id": v.vid, "kind": v.kind, "compartment": v.compartment,
                 "outer_diameter_um": round(o_minor * mpp, 2), "lumen_diameter_um": round(l_minor * mpp, 2),
                 "outer_major_um": round(o_major * mpp, 2),
                 "wall_thickness_um": round((o_minor - l_minor) / 2 * mpp, 2),
                 "findings": _drawn_findings(v.findings, labels)}
        if v.looks:
            props["appearance"] = dict(v.looks)
        vessels.append(_feature(slide_id, "vessel", v.vid, "vessel", outer, ARTIFACT_COLORS["vessel"], size_px,
                                props, holes=[lumen]))
    _write_geojson(paths["ves"], vessels)
    arts = [_feature(slide_id, "artifact", i, name, poly, ARTIFACT_COLORS[name], size_px, *props)
            for i, (name, poly, *props) in enumerate(scene.artifacts)]
    arts += [_feature(slide_id, "artifact", len(scene.artifacts) + j, "calcium_artifact", poly,
                      ARTIFACT_COLORS["calcium_artifact"], size_px, {"kind": kind, "vessel_id": vid})
             for j, (kind, vid, poly) in enumerate(scene.calcium_artifacts)]
    _write_geojson(paths["art"], arts)
    del drawn
    # the labels are what was drawn: a finding asked for but left without a lesion (no eligible vessel, or its only
    # vessel already calcified in the media) is 0, so every label has pixels behind it
    shown = {lesion[0] for lesion in scene.lesions}
    labels = {k: int(bool(v) and k in shown) for k, v in labels.items()}
    return PhantomSlide(slide_id, patient_id or slide_id, paths["tiff"], paths["les"], paths["ves"], paths["art"],
                        paths["mask"], labels, mpp, size_px)


def _drawn_findings(findings, labels) -> list[str]:
    """A vessel's findings as drawn: one with both medial and small-vessel calcification shows the medial arc only."""
    out = [f for f in findings if f in labels]
    if "medial_calcification" in out and "small_vessel_calcification" in out:
        out.remove("small_vessel_calcification")
    return out


def drawn_artifacts(slide: PhantomSlide) -> set[str]:
    """Names of the artifact classes present in a phantom's artifacts GeoJSON."""
    data = json.loads(Path(slide.artifacts_path).read_text())
    return {f["properties"]["classification"]["name"] for f in data["features"]}


def _ring(poly, size: int) -> list[list[float]]:
    """A polygon as written to GeoJSON: clipped to the slide, rounded to 0.01 px, closed."""
    ring = [[round(float(x), 2), round(float(y), 2)] for x, y in np.clip(np.asarray(poly, np.float64), 0, size)]
    ring.append(ring[0])
    return ring


def _axes(ring: list[list[float]]) -> tuple[float, float]:
    """(minor, major) axis in px of the ellipse cv2.fitEllipse fits to a written ring (of the minimum-area rectangle
    for a ring clipped by the slide edge to a sliver: fitEllipse gives such a degenerate ring no reproducible fit)."""
    pts = np.asarray(ring[:-1], np.float32)
    if cv2.contourArea(pts) < 1.0:
        _, (w, h), _ = cv2.minAreaRect(pts)
        return float(min(w, h)), float(max(w, h))
    _, axes, _ = cv2.fitEllipse(pts)
    return float(min(axes)), float(max(axes))


def _feature(slide_id, kind, i, name, poly, color, size, props=None, holes=()) -> dict:
    """A QuPath annotation feature; `poly` and `holes` are (N, 2) level-0 px arrays or rings from _ring."""
    rings = [p if isinstance(p, list) else _ring(p, size) for p in (poly, *holes)]
    fid = str(uuid.UUID(bytes=zlib.crc32(f"{slide_id}:{kind}:{i}".encode()).to_bytes(4, "big") * 4, version=4))
    properties = {"objectType": "annotation", "classification": {"name": name, "color": list(color)}}
    properties.update(props or {})
    return {"type": "Feature", "id": fid, "geometry": {"type": "Polygon", "coordinates": rings},
            "properties": properties}


def _write_geojson(path: Path, features: list[dict]) -> None:
    text = json.dumps({"type": "FeatureCollection", "features": features}, separators=(",", ":"))
    _atomic_bytes(path, text.encode())


def _atomic_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_tiff(path: Path, scene, fields, quality: int) -> np.ndarray:
    """Render strip by strip into a tiled JPEG pyramid; return the true tissue mask at downsample 16."""
    size, mpp = scene.size, scene.mpp
    ds_mask = TISSUE_MASK_DOWNSAMPLE
    n_mask = -(-size // ds_mask)
    mask = np.zeros((n_mask, n_mask), np.uint8)
    level1 = np.zeros((size // 4, size // 4, 3), np.uint8)

    def tiles():
        for y0 in range(0, size, STRIP_PX):
            y1 = min(y0 + STRIP_PX, size)
            rgb, tissue = render_strip(scene, fields, y0, y1)
            h4, w4 = (y1 - y0) // 4, size // 4
            if h4:
                level1[y0 // 4 : y0 // 4 + h4] = cv2.resize(rgb[: h4 * 4, : w4 * 4], (w4, h4),
                                                            interpolation=cv2.INTER_AREA)
            hm = -(-(y1 - y0) // ds_mask)
            pad = np.zeros((hm * ds_mask, n_mask * ds_mask), np.float32)
            pad[: y1 - y0, :size] = tissue
            frac = pad.reshape(hm, ds_mask, n_mask, ds_mask).mean(axis=(1, 3))
            mask[y0 // ds_mask : y0 // ds_mask + hm] = np.where(frac >= 0.5, 255, 0)
            for r in range(0, y1 - y0, TILE_PX):
                for c in range(0, size, TILE_PX):
                    t = rgb[r : r + TILE_PX, c : c + TILE_PX]
                    if t.shape[:2] != (TILE_PX, TILE_PX):
                        t = np.pad(t, ((0, TILE_PX - t.shape[0]), (0, TILE_PX - t.shape[1]), (0, 0)), mode="edge")
                    yield np.ascontiguousarray(t)

    levels = []
    tmp = path.with_name(path.name + ".tmp")
    opts = dict(tile=(TILE_PX, TILE_PX), photometric="rgb", compression="jpeg",
                compressionargs={"level": int(quality)}, resolutionunit="CENTIMETER", metadata=None)
    try:
        with tifffile.TiffWriter(tmp, bigtiff=size > 30000) as tif:
            tif.write(tiles(), shape=(size, size, 3), dtype=np.uint8, subfiletype=0,
                      resolution=(1e4 / mpp, 1e4 / mpp), **opts)
            levels.append((4, level1))
            prev = level1
            for ds in (16, 64):
                n = size // ds
                if n < 32:
                    break
                prev = cv2.resize(prev[: n * 4, : n * 4], (n, n), interpolation=cv2.INTER_AREA)
                levels.append((ds, prev))
            for ds, arr in levels:
                tif.write(arr, subfiletype=1, resolution=(1e4 / (mpp * ds), 1e4 / (mpp * ds)), **opts)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return mask


# --------------------------------------------------------------------------------------------- a dataset
def _sample_labels(rng: np.random.Generator, findings: Sequence[str], prevalence: Mapping[str, float] | None):
    """Default: CUA pattern in ~1/3 of slides, each finding ~0.3-0.5; `prevalence` -> independent draws."""
    fs = set(findings)
    cua_possible = "thrombosis" in fs and ({"medial_calcification", "small_vessel_calcification"} & fs)
    labels = {}
    if prevalence is None and cua_possible:
        if rng.random() < 0.34:
            labels = {"thrombosis": 1, "vasculitis": 0, "medial_calcification": int(rng.random() < 0.7),
                      "small_vessel_calcification": int(rng.random() < 0.6)}
            calcs = [k for k in ("medial_calcification", "small_vessel_calcification") if k in fs]
            if not any(labels[k] for k in calcs):
                labels[calcs[int(rng.integers(len(calcs)))]] = 1
        else:
            p = {"medial_calcification": 0.35, "small_vessel_calcification": 0.35, "thrombosis": 0.33,
                 "vasculitis": 0.45}
            while True:
                labels = {k: int(rng.random() < p[k]) for k in FINDINGS}
                if not cua_pattern({k: v for k, v in labels.items() if k in fs}):
                    break
        for k in OPTIONAL_FINDINGS:
            labels[k] = int(rng.random() < 0.35)
    else:
        prevalence = prevalence or {}
        labels = {k: int(rng.random() < prevalence.get(k, 0.4)) for k in ALL_FINDINGS}
    return {k: labels[k] for k in ALL_FINDINGS if k in fs}


def generate_dataset(out_dir, n_slides: int, *, size_px: int = 4096, mpp: float = 0.5, seed: int = 0,
                     prevalence: Mapping[str, float] | None = None, slides_per_patient: int = 2,
                     findings: Sequence[str] = FINDINGS, artifacts: bool = True, subcutis: bool = True,
                     calcium_artifacts: float = 0.0, style: str = "random",
                     progress: Callable[[int, int], None] | None = None) -> Path:
    """Write n_slides phantoms and ``manifest.csv`` into out_dir; returns the manifest path.

    Slide i (0-based) is named ``phantom_{i+1:04d}``; its labels and drawing seed come from
    SeedSequence([seed, i]), so slide i is the same whatever n_slides is. `slides_per_patient`
    consecutive slides share a patient id ``P0001``... `progress(done, n_slides)` is called after each slide.
    `subcutis`, `calcium_artifacts` and `style` are passed to every slide (see generate_slide; `style` "mixed": every
    third slide classic, the others random); when not at their defaults the manifest gains a column ``subcutis``
    (0) / ``calcium_artifact`` (1 when the slide has any).
    """
    _check_common(size_px, mpp)
    _check_style(style, STYLES + (MIXED,))
    if not isinstance(n_slides, (int, np.integer)) or n_slides < 1:
        raise CalciscopeError(f"n_slides must be an integer >= 1, got {n_slides!r}")
    if not isinstance(slides_per_patient, (int, np.integer)) or slides_per_patient < 1:
        raise CalciscopeError(f"slides_per_patient must be an integer >= 1, got {slides_per_patient!r}")
    if isinstance(findings, str) or not findings:
        raise CalciscopeError(f"findings must be a non-empty list of finding names, got {findings!r}")
    _check_names(findings, "findings")
    findings = [k for k in ALL_FINDINGS if k in set(findings)]
    if prevalence is not None:
        _check_names(prevalence, "prevalence")
        for k, p in prevalence.items():
            if not isinstance(p, (int, float)) or not 0 <= p <= 1:
                raise CalciscopeError(f"prevalence of {k!r} must be a probability in [0, 1], got {p!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise CalciscopeError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(calcium_artifacts, bool) or not isinstance(calcium_artifacts, (int, float)) \
            or not 0 <= calcium_artifacts <= 1:
        raise CalciscopeError(f"calcium_artifacts must be a probability in [0, 1], got {calcium_artifacts!r}")
    extra = (["subcutis"] if not subcutis else []) + (["calcium_artifact"] if calcium_artifacts > 0 else [])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(int(n_slides)):
        ss = np.random.SeedSequence([int(seed), i])
        slide_seed = int(ss.generate_state(1)[0])
        labels = _sample_labels(np.random.default_rng(np.random.SeedSequence([int(seed), i, 1])), findings,
                                prevalence)
        sid, pid = f"phantom_{i + 1:04d}", f"P{i // slides_per_patient + 1:04d}"
        slide = generate_slide(out, sid, labels, size_px=size_px, mpp=mpp, seed=slide_seed, patient_id=pid,
                               artifacts=artifacts, subcutis=subcutis, calcium_artifacts=calcium_artifacts,
                               style=slide_style(style, i))
        drawn = drawn_artifacts(slide)
        flags = {"subcutis": 0, "calcium_artifact": int("calcium_artifact" in drawn)}
        labels = slide.labels  # as drawn
        rows.append([sid, pid, slide.path.name, slide.lesions_path.name, *(labels[k] for k in findings),
                     cua_pattern(labels), *(int(a in drawn) for a in ("pen_mark", "fold", "blur")),
                     *(flags[k] for k in extra)])
        if progress is not None:
            progress(i + 1, int(n_slides))
    manifest = out / "manifest.csv"
    tmp = manifest.with_name(manifest.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "patient_id", "path", "annotations", *findings, "cua_pattern", "pen_mark", "fold",
                    "blur", *extra])
        w.writerows(rows)
    os.replace(tmp, manifest)
    return manifest
