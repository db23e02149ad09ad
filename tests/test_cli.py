"""The calciscope command: thin over the library, one clear line per error, no partial outputs."""

import csv
import json
import subprocess
import sys

import pytest
from helpers import run_cli
from PIL import Image


def test_tile_writes_table_qc_thumbnail_and_tiles(capsys, tmp_path, cmu_svs):
    code, stdout, _ = run_cli(capsys, "tile", cmu_svs, "--out", tmp_path, "--save-tiles", "--workers", "0")
    assert code == 0
    out = tmp_path / "CMU-1-Small-Region"
    assert "CMU-1-Small-Region" in stdout and str(out) in stdout
    rows = list(csv.DictReader(open(out / "tiles.csv")))
    qc = json.loads((out / "qc.json").read_text())
    assert qc["tiles"]["n_tiles"] == len(rows) > 20
    assert qc["slide"]["mpp"] == pytest.approx(0.499) and qc["slide"]["backend"] == "openslide"
    assert set(qc["qc"]) >= {"tissue_area_mm2", "pen_fraction", "dark_fraction", "blurry_tile_fraction", "flags"}
    saved = sorted(p.name for p in (out / "tiles").iterdir())
    assert saved == sorted(f"x{r['x']}_y{r['y']}.png" for r in rows)
    assert Image.open(out / "tiles" / saved[0]).size == (224, 224)
    assert Image.open(out / "thumbnail.png").size == (766, 1024)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CMU-1-Small-Region"]  # nothing else, no temp dirs
    assert sorted(p.name for p in out.iterdir()) == ["qc.json", "thumbnail.png", "tiles", "tiles.csv"]


def test_tile_with_annotations_adds_label_columns(capsys, tmp_path, phantom):
    code, _, _ = run_cli(capsys, "tile", phantom.path, "--out", tmp_path, "--annotations", phantom.lesions_path,
                         "--workers", "2")
    assert code == 0
    rows = list(csv.DictReader(open(tmp_path / phantom.slide_id / "tiles.csv")))
    for finding in phantom.labels:
        assert any(r[finding] == "1" for r in rows), finding
    assert all(r["thrombosis"] in ("0", "1") for r in rows)


def test_tile_resolution_and_size_follow_the_options(capsys, tmp_path, phantom):
    code, _, _ = run_cli(capsys, "tile", phantom.path, "--out", tmp_path, "--mpp", "1.0", "--tile-px", "128",
                         "--save-tiles", "--workers", "0")
    assert code == 0
    rows = list(csv.DictReader(open(tmp_path / phantom.slide_id / "tiles.csv")))
    assert {r["w"] for r in rows} == {"256"}  # 128 px at 1 µm/px = 256 level-0 px at 0.5 µm/px
    first = next((tmp_path / phantom.slide_id / "tiles").iterdir())
    assert Image.open(first).size == (128, 128)


@pytest.mark.parametrize(
    "kind, extra, reason",
    [
        ("missing", [], "no such file"),
        ("empty", [], "is empty (0 bytes)"),
        ("text_named_svs", [], "not a readable slide"),
        ("directory", [], "is a directory"),
        ("truncated_tiff", [], "cannot decode"),
        ("no_tissue", ["--slide-mpp", "0.5"], "no tissue found"),
        ("no_mpp", [], "has no resolution (mpp)"),
        ("huge", [], "too large"),
    ],
)
@pytest.mark.parametrize("command", ["tile", "predict"])
def test_bad_input_gives_one_line_naming_the_file_and_no_output(capsys, tmp_path, bad_inputs, kind, extra, reason,
                                                                  command):
    path = bad_inputs[kind]
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(capsys, command, path, "--out", out, "--workers", "0", *extra)
    assert code == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("calciscope: error:") and str(path) in lines[0] and reason in lines[0]
    assert "Traceback" not in stderr
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize("command", ["tile", "predict"])
def test_a_bad_slide_in_a_list_does_not_stop_the_others(capsys, tmp_path, bad_inputs, cmu_svs, command):
    code, stdout, stderr = run_cli(capsys, command, bad_inputs["empty"], cmu_svs, "--out", tmp_path, "--workers", "0")
    assert code == 1
    assert "empty.svs" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CMU-1-Small-Region"]
    if command == "predict":  # the summary table lists the slide that was scored, the report path is printed
        assert "CMU-1-Small-Region" in stdout and "CUA pattern" in stdout and "1 of 2 slides failed" in stderr
        assert str(tmp_path / "CMU-1-Small-Region" / "report.html") in stdout


def test_predict_refuses_a_model_that_is_not_a_checkpoint(capsys, tmp_path, cmu_svs):
    not_a_model = tmp_path / "weights"
    not_a_model.mkdir()
    code, _, stderr = run_cli(capsys, "predict", cmu_svs, "--model", not_a_model, "--out", tmp_path / "out")
    assert code == 1 and len(stderr.strip().splitlines()) == 1
    assert str(not_a_model) in stderr and "not a calciscope checkpoint" in stderr
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_predict_refuses_an_output_folder_it_cannot_write(capsys, tmp_path, cmu_svs):
    blocker = tmp_path / "results.txt"
    blocker.write_text("a file, not a folder")
    code, _, stderr = run_cli(capsys, "predict", cmu_svs, "--out", blocker / "out")
    assert code == 1 and len(stderr.strip().splitlines()) == 1 and "output directory is not writable" in stderr


def test_demo_scores_a_phantom_with_the_shipped_model(capsys, tmp_path):
    code, stdout, _ = run_cli(capsys, "demo", "--out", tmp_path, "--size", "2048", "--workers", "0")
    assert code == 0
    report = tmp_path / "demo_slide" / "report.html"
    assert stdout.strip().splitlines()[-1] == str(report) and report.is_file()
    assert "synthetic demo, not for clinical use" in stdout and "CUA-pattern score" in stdout
    for finding in ("medial_calcification", "small_vessel_calcification", "thrombosis", "vasculitis"):
        assert finding in stdout
    result = json.loads((tmp_path / "demo_slide" / "result.json").read_text())
    assert f"{result['cua_pattern']['score']:.3f}" in stdout


def test_synth_writes_a_manifest_of_openable_slides(capsys, tmp_path):
    code, stdout, _ = run_cli(capsys, "synth", "--out", tmp_path, "--n-slides", "2", "--size", "1024", "--seed", "3",
                              "--prevalence", "thrombosis=1.0")
    assert code == 0
    manifest = tmp_path / "manifest.csv"
    assert str(manifest) in stdout
    rows = list(csv.DictReader(open(manifest)))
    assert len(rows) == 2 and all(r["thrombosis"] == "1" for r in rows)
    assert all((tmp_path / r["path"]).is_file() for r in rows)


def test_synth_rejects_a_malformed_prevalence(capsys, tmp_path):
    code, _, stderr = run_cli(capsys, "synth", "--out", tmp_path, "--prevalence", "thrombosis")
    assert code == 1 and "--prevalence" in stderr


def test_debug_shows_the_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "calciscope", "--debug", "tile", str(tmp_path / "nope.svs"), "--out", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "SlideError" in result.stderr and "nope.svs" in result.stderr


def test_predict_flags_calcium_artifacts_with_the_demo_artifact_classifier_unless_told_not_to(capsys, tmp_path):
    """``--artifact-classifier`` reaches predict: by default the demo's (in its segmenter's artifact_classifier/)
    judges every listed vessel; ``none`` turns it off."""
    from calciscope.data.synthetic import generate_slide

    slide = generate_slide(tmp_path, "arts", {"medial_calcification": 1, "small_vessel_calcification": 1},
                           size_px=2048, seed=8117, artifacts=False, calcium_artifacts=1.0)
    docs = {}
    for choice in ("auto", "none"):
        out = tmp_path / choice
        code, _, stderr = run_cli(capsys, "predict", slide.path, "--out", out, "--workers", "0", "--saliency", "none",
                                  "--top-k", "0", "--artifact-classifier", choice)
        assert code == 0, stderr
        docs[choice] = json.loads((out / "arts" / "result.json").read_text())["vessels"]
    from calciscope.model.demo import demo_model_dir
    from calciscope.model.vessel_classifier import load_classifier

    shipped = load_classifier(demo_model_dir() / "vessels" / "artifact_classifier")[1]
    judge = docs["auto"]["qc"]["calcium_artifact_judge"]
    assert judge["classifier"] == "artifact classifier" and judge["threshold"] == shipped.artifact_threshold
    assert judge["weights_sha256"] == shipped.weights_sha256
    assert docs["auto"]["vessels"] and all("calcium_artifact_probability" in v for v in docs["auto"]["vessels"])
    assert docs["none"]["qc"]["calcium_artifact_judge"] is None
    assert not any("calcium_artifact_probability" in v for v in docs["none"]["vessels"])
