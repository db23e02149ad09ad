"""DICOM whole-slide images on disk: which files of a folder make one slide.

A DICOM WSI is a series of files (Series Instance UID): one or more per pyramid level (image flavor ``VOLUME``)
plus ``LABEL``, ``OVERVIEW`` and ``THUMBNAIL`` images; PACS and scanners export it as a folder. OpenSlide 4 opens
the whole series from any one of its files (it scans that file's folder for the same Series Instance UID), so a
folder is opened by naming one of its ``VOLUME`` files. A folder must hold one slide series; series without a
``VOLUME`` image (a label or overview filed as a series of its own) are not slides and are passed over.

Headers are read only up to the Series Instance UID (pydicom), never pixel data; the label and overview images
are never read at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from calciscope.errors import SlideError

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
DICOM_SUFFIX = ".dcm"
_SERIES_INSTANCE_UID = 0x0020000E


@dataclass(frozen=True)
class DicomFile:
    """One file of a DICOM WSI series."""

    path: Path
    series_uid: str
    flavor: str  # value 3 of Image Type: VOLUME (a pyramid level), LABEL, OVERVIEW, THUMBNAIL


def read_wsi_header(path: str | Path) -> DicomFile | None:
    """The series and image flavor of a DICOM WSI file; None for any other file (not DICOM, not whole-slide
    microscopy, unreadable)."""
    from pydicom.filereader import read_partial

    path = Path(path)
    try:
        with open(path, "rb") as f:
            ds = read_partial(f, stop_when=lambda tag, vr, length: tag > _SERIES_INSTANCE_UID)
        sop_class = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", ""))
        series_uid = str(ds.get("SeriesInstanceUID", "") or "")
        image_type = list(ds.get("ImageType") or [])
    except Exception:  # pydicom raises many types for files that are not DICOM (or are cut short): none is a slide
        return None
    if sop_class != WSI_SOP_CLASS or not series_uid:
        return None
    return DicomFile(path, series_uid, str(image_type[2]).upper() if len(image_type) > 2 else "")


def series_in(folder: str | Path, skip_suffixes: frozenset[str] = frozenset()) -> dict[str, list[DicomFile]]:
    """The DICOM WSI files directly in ``folder`` (not in its subfolders, as OpenSlide), by Series Instance UID,
    in file-name order; hidden files and files ending in one of ``skip_suffixes`` are not read."""
    series: dict[str, list[DicomFile]] = {}
    for path in sorted(Path(folder).iterdir()):
        if path.name.startswith(".") or path.suffix.lower() in skip_suffixes or not path.is_file():
            continue
        header = read_wsi_header(path)
        if header is not None:
            series.setdefault(header.series_uid, []).append(header)
    return series


def holds_series(folder: str | Path, skip_suffixes: frozenset[str] = frozenset()) -> bool:
    """Whether ``folder`` holds a DICOM WSI file directly (read until the first one)."""
    for path in sorted(Path(folder).iterdir()):
        if path.name.startswith(".") or path.suffix.lower() in skip_suffixes or not path.is_file():
            continue
        if read_wsi_header(path) is not None:
            return True
    return False


def slide_file(folder: str | Path) -> Path:
    """The file OpenSlide opens the folder's one slide series by (its first ``VOLUME`` file).

    A folder without a slide series, or with more than one, is a ``SlideError`` (one line naming the series by
    their Series Instance UIDs).
    """
    folder = Path(folder)
    try:
        series = series_in(folder)
    except OSError as exc:
        raise SlideError(folder, f"cannot be read ({exc.strerror or exc})") from exc
    slides = {uid: files for uid, files in series.items() if any(f.flavor == "VOLUME" for f in files)}
    if not slides:
        if series:
            raise SlideError(folder, "holds DICOM label or overview images but no slide image (no VOLUME image)")
        raise SlideError(folder, "is a directory with no DICOM WSI files in it; name a slide file, or a folder that "
                                 "holds one DICOM series")
    if len(slides) > 1:
        named = " and ".join(f"{uid} ({len(files)} files)" for uid, files in slides.items())
        raise SlideError(folder, f"holds {len(slides)} DICOM series, not one: {named}; name one series' folder or "
                                 f"one of its files")
    files = next(iter(slides.values()))
    return next(f.path for f in files if f.flavor == "VOLUME")
