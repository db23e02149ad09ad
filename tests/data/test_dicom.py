"""calciscope.data.dicom + slides: a DICOM WSI series opens as a folder or through any one of its files, with
its mpp, its pixels, and nothing of the patient or the label in any output.

The series is made at test time from the CMU fixture with wsidicomizer (a test dependency), with a pyramid and
identifying attributes and a magenta label image put in on purpose, so the tests can look for them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli
from PIL import Image

from calciscope.data.dicom import WSI_SOP_CLASS, read_wsi_header, series_in
from calciscope.data.slides import find_slides, open_slide, slides_among
from calciscope.errors import SlideError
from calciscope.io import sha256_file

if not os.environ.get("CI"):  # CI installs the test extra: there these tests run (and fail without it), never skip
    pytest.importorskip("wsidicomizer")

# attributes that identify the patient, set in the converted files so the tests can look for them in outputs
PATIENT = {"PatientName": "Calcitest^Johanna", "PatientID": "PID-4711-XQ", "PatientBirthDate": "19230405"}
IDENTIFYING_TEXT = ["Calcitest", "Johanna", "PID-4711-XQ", "19230405", "1923-04-05"]
LABEL_RGB = (255, 0, 255)  # the label image: a colour no output draws


def dicomize(svs: Path, out: Path, *, label: bool = True) -> Path:
    """Convert ``svs`` into a DICOM WSI series in ``out``: every level of a pyramid (JPEG tiles of 256 px), the
    patient attributes of ``PATIENT`` and, with ``label``, a label and an overview image painted ``LABEL_RGB``.

    wsidicomizer 0.26 writes the edge tiles of the levels it adds itself (add_missing_levels) short of a full tile,
    which OpenSlide rightly refuses, and its label= option turns the pyramid into label images; so the pyramid is
    made first (a lossless tiled TIFF, one level per halving) and the label and overview are added afterwards.
    """
    import cv2
    import tifffile
    from wsidicomizer import WsiDicomizer
    from wsidicomizer.sources import TiffSlideSource  # the opentile source needs libturbojpeg; tiffslide does not

    with open_slide(svs) as slide:
        levels = [slide.read_region((0, 0), 0, slide.dimensions)]
        resolution = (1e4 / slide.mpp, 1e4 / slide.mpp)  # pixels per cm
    while max(levels[-1].shape[:2]) > 256:
        h, w = levels[-1].shape[:2]
        levels.append(cv2.resize(levels[-1], ((w + 1) // 2, (h + 1) // 2), interpolation=cv2.INTER_AREA))
    pyramid = out.with_name(out.name + ".pyramid.tif")
    with tifffile.TiffWriter(pyramid) as tif:
        for n, level in enumerate(levels):
            tif.write(level, tile=(256, 256), compression="zlib", photometric="rgb", resolution=resolution,
                      resolutionunit="CENTIMETER", **({"subifds": len(levels) - 1} if n == 0 else {"subfiletype": 1}))

    def identify(dataset, metadata):
        for key, value in PATIENT.items():
            setattr(dataset, key, value)
        return dataset

    WsiDicomizer.convert(pyramid, out, metadata_post_processor=identify, tile_size=256,
                         preferred_source=TiffSlideSource, workers=1)
    pyramid.unlink()
    if label:
        _add_painted_images(out, ("LABEL", "OVERVIEW"))
    return out


def _add_painted_images(folder: Path, flavors: tuple[str, ...]) -> None:
    """Add single-frame images of the given flavors, filled with ``LABEL_RGB``, to the series in ``folder``."""
    import io

    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import generate_uid

    smallest = min(folder.iterdir(), key=lambda p: pydicom.dcmread(p, stop_before_pixels=True).TotalPixelMatrixColumns)
    for flavor in flavors:
        ds = pydicom.dcmread(smallest)
        ds.ImageType = ["ORIGINAL", "PRIMARY", flavor, "NONE"]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.Rows, ds.Columns, ds.NumberOfFrames = ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns, 1
        jpeg = io.BytesIO()
        Image.new("RGB", (ds.Columns, ds.Rows), LABEL_RGB).save(jpeg, "JPEG", quality=95)
        ds.PixelData = encapsulate([jpeg.getvalue()])
        ds.save_as(folder / f"{flavor.lower()}.dcm")


@pytest.fixture(scope="module")
def series(tmp_path_factory, cmu_svs) -> Path:
    """The CMU fixture as one DICOM series folder (pyramid levels, label, overview, thumbnail)."""
    return dicomize(cmu_svs, tmp_path_factory.mktemp("dicom") / "cmu_series")


@pytest.fixture(scope="module")
def other_series(tmp_path_factory, cmu_svs) -> Path:
    """A second conversion of the same scan: another Series Instance UID, no label."""
    return dicomize(cmu_svs, tmp_path_factory.mktemp("dicom_other") / "series_b", label=False)


def _uid(folder: Path) -> str:
    return next(iter(series_in(folder)))


def test_the_converted_series_is_what_the_tests_assume(series):
    import openslide
    import pydicom

    files = [h for group in series_in(series).values() for h in group]
    assert {h.flavor for h in files} == {"VOLUME", "LABEL", "OVERVIEW"}
    assert sum(h.flavor == "VOLUME" for h in files) >= 4  # a pyramid
    ds = pydicom.dcmread(files[0].path, stop_before_pixels=True)
    assert str(ds.PatientName) == PATIENT["PatientName"] and ds.SOPClassUID == WSI_SOP_CLASS
    raw = openslide.OpenSlide(str(files[0].path))  # what a careless reader would hand on
    assert raw.properties["dicom.PatientID"] == PATIENT["PatientID"]
    label = np.asarray(raw.associated_images["label"].convert("RGB"))
    assert _has_label_block(label)


def test_the_folder_and_each_of_its_files_open_the_same_slide(series):
    with open_slide(series) as slide:
        assert slide.vendor == "dicom" and slide.backend == "openslide"
        assert slide.dimensions == (2220, 2967) and slide.level_count >= 4
        assert slide.mpp == pytest.approx(0.499) and slide.info().mpp_source == "metadata"
        assert slide.slide_id == "cmu_series"
        region = slide.read_region((900, 1400), 0, (96, 64))
        levels = slide.level_dimensions
    for path in sorted(series.iterdir()):  # levels, label, overview and thumbnail files alike
        with open_slide(path) as one:
            assert one.level_dimensions == levels and one.mpp == pytest.approx(0.499)
            assert np.array_equal(one.read_region((900, 1400), 0, (96, 64)), region)
            assert one.slide_id == path.stem


def test_pixels_match_the_scan_they_were_converted_from(series, cmu_svs):
    import cv2

    with open_slide(series) as dcm, open_slide(cmu_svs) as svs:
        a = dcm.read_region((700, 1100), 0, (512, 512)).astype(np.float32)
        b = svs.read_region((700, 1100), 0, (512, 512)).astype(np.float32)
        thumb_a, thumb_b = dcm.thumbnail(256).astype(np.float32), svs.thumbnail(256).astype(np.float32)
    # JPEG re-encoding (4:2:2 chroma) errs pixel by pixel (mean ~5 of 255) but not over 8 × 8 px (~0.7); a one-pixel
    # shift would cost ~16 and ~4
    assert np.abs(a - b).mean() < 8 and np.abs(cv2.blur(a, (8, 8)) - cv2.blur(b, (8, 8))).mean() < 1.5
    assert np.abs(thumb_a - thumb_b).mean() < 8  # the lower levels are the same picture


def test_predict_on_the_folder_writes_no_patient_identifier_uid_or_label(capsys, tmp_path, series):
    out = tmp_path / "out"
    code, _, stderr = run_cli(capsys, "predict", series, "--out", out, "--workers", "0", "--top-k", "1")
    assert code == 0, stderr
    result = json.loads((out / "cmu_series" / "result.json").read_text())
    assert result["slide"]["vendor"] == "dicom" and result["slide"]["mpp"] == pytest.approx(0.499)
    assert result["slide"]["file"] == "cmu_series"

    import pydicom

    uids = set()
    for path in series.iterdir():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        uids |= {str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)}
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "report.html" for p in files)
    for path in files:
        data = path.read_bytes()
        for text in IDENTIFYING_TEXT + sorted(uids):
            assert text.encode() not in data, f"{text} in {path.relative_to(out)}"
        if path.suffix == ".png":
            assert not _has_label_block(np.asarray(Image.open(path).convert("RGB"))), path.name


def _has_label_block(rgb: np.ndarray, side: int = 16) -> bool:
    """Whether a side × side block of the image is the label's colour (within JPEG error)."""
    close = (np.abs(rgb.astype(np.int16) - LABEL_RGB) <= 40).all(axis=2).astype(np.int32)
    if close.shape[0] < side or close.shape[1] < side:
        return False
    sums = close.cumsum(0).cumsum(1)
    sums = np.pad(sums, ((1, 0), (1, 0)))
    blocks = sums[side:, side:] - sums[:-side, side:] - sums[side:, :-side] + sums[:-side, :-side]
    return bool((blocks == side * side).any())


def test_series_uid_is_recorded_only_when_asked(series):
    with open_slide(series) as slide:
        assert slide.dicom_series_uid == _uid(series)
        assert slide.info().dicom_series_uid is None
        assert slide.info(series_uid=True).dicom_series_uid == _uid(series)


def test_predict_records_the_series_uid_when_asked(capsys, tmp_path, series):
    code, _, stderr = run_cli(capsys, "predict", series, "--out", tmp_path, "--workers", "0", "--top-k", "0",
                              "--saliency", "none", "--record-series-uid")
    assert code == 0, stderr
    result = json.loads((tmp_path / "cmu_series" / "result.json").read_text())
    assert result["slide"]["dicom_series_uid"] == _uid(series)


def test_a_folder_of_two_series_is_refused_in_one_line_naming_both(capsys, tmp_path, series, other_series):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for folder in (series, other_series):
        for path in folder.iterdir():
            shutil.copy(path, mixed / path.name)
    with pytest.raises(SlideError) as info:
        open_slide(mixed)
    message = str(info.value)
    assert "\n" not in message and str(mixed) in message and "2 DICOM series" in message
    assert _uid(series) in message and _uid(other_series) in message
    code, _, stderr = run_cli(capsys, "predict", mixed, "--out", tmp_path / "out", "--workers", "0")
    assert code == 1 and len(stderr.strip().splitlines()) == 1 and _uid(other_series) in stderr
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    with open_slide(next(mixed.glob("*.dcm"))) as one:  # one file names its own series: no doubt which
        assert one.dimensions == (2220, 2967)


def test_a_folder_without_a_slide_series_is_refused(tmp_path, series):
    labels_only = tmp_path / "labels_only"
    labels_only.mkdir()
    for header in series_in(series)[_uid(series)]:
        if header.flavor != "VOLUME":
            shutil.copy(header.path, labels_only / header.path.name)
    with pytest.raises(SlideError, match="no slide image"):
        open_slide(labels_only)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not DICOM")
    assert read_wsi_header(tmp_path / "notes" / "readme.txt") is None
    with pytest.raises(SlideError, match="is a directory"):
        open_slide(tmp_path / "notes")


def test_folders_of_slides_and_globs_count_each_series_once(tmp_path, series, cmu_svs):
    root = tmp_path / "export"
    shutil.copytree(series, root / "case_7")
    shutil.copy(cmu_svs, root / "scan.svs")
    (root / "empty").mkdir()
    assert find_slides(root) == [root / "case_7", root / "scan.svs"]
    assert find_slides(root / "case_7") == [root / "case_7"]
    assert slides_among(sorted(root.glob("**/*"))) == [root / "case_7", root / "scan.svs"]

    from calciscope.inference.batch import read_jobs

    assert [(j.slide_id, Path(j.path)) for j in read_jobs(root)] == [("case_7", root / "case_7"),
                                                                    ("scan", root / "scan.svs")]
    assert [j.slide_id for j in read_jobs(f"{root}/**/*.dcm")] == ["case_7"]
    assert [j.slide_id for j in read_jobs(root / "case_7")] == ["case_7"]


def test_a_series_folder_has_a_content_hash(tmp_path, series):
    copy = shutil.copytree(series, tmp_path / "copy")
    assert sha256_file(copy) == sha256_file(series)
    victim = next(copy.glob("*.dcm"))
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert sha256_file(copy) != sha256_file(series)


def test_tile_and_training_manifests_take_a_series_folder(capsys, tmp_path, series):
    code, _, stderr = run_cli(capsys, "tile", series, "--out", tmp_path / "tiles", "--workers", "0")
    assert code == 0, stderr
    qc = json.loads((tmp_path / "tiles" / "cmu_series" / "qc.json").read_text())
    assert qc["slide"]["vendor"] == "dicom" and qc["slide"]["dicom_series_uid"] is None

    from calciscope.training.sources import read_manifest

    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"slide_id,patient_id,path\ncase_7,p7,{series}\n")
    (record,) = read_manifest(manifest, ["thrombosis"])
    assert record.path == series
