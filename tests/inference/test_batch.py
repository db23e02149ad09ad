"""score: a batch with bad files mixed in, SIGKILL and resume, crashed workers, Ray, safe slide ids."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from calciscope.data.synthetic import generate_dataset
from calciscope.errors import CalciscopeError
from calciscope.inference.batch import FAULT_ENV, ScoreRun, read_jobs
from calciscope.inference.config import PredictConfig

CONFIG = PredictConfig(top_k=1, saliency="guided-gradcam")
VOLATILE = ("created", "seconds", "tiles_per_second")  # wall-clock facts; everything else must be identical


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """20 phantoms of 1024² (0.5 × 0.5 mm) plus five bad files, in one manifest; and a good-only manifest."""
    root = tmp_path_factory.mktemp("batch")
    good = generate_dataset(root / "phantoms", 20, size_px=1024, seed=2718, artifacts=False)
    rows = [{"slide_id": r["slide_id"], "path": str(good.parent / r["path"]), "mpp": ""}
            for r in csv.DictReader(open(good))]
    bad = root / "bad"
    bad.mkdir()
    (bad / "empty.svs").write_bytes(b"")
    (bad / "notes.svs").write_text("not a slide")
    data = Path(rows[0]["path"]).read_bytes()
    (bad / "truncated.tiff").write_bytes(data[: len(data) // 3])
    Image.fromarray(np.full((600, 600, 3), 244, np.uint8)).save(bad / "blank.png")
    bad_rows = [
        {"slide_id": "empty", "path": str(bad / "empty.svs"), "mpp": "", "reason": "is empty (0 bytes)"},
        {"slide_id": "notes", "path": str(bad / "notes.svs"), "mpp": "", "reason": "not a readable slide"},
        {"slide_id": "truncated", "path": str(bad / "truncated.tiff"), "mpp": "", "reason": "cannot decode"},
        {"slide_id": "blank", "path": str(bad / "blank.png"), "mpp": "0.5", "reason": "no tissue found"},
        {"slide_id": "gone", "path": str(bad / "gone.svs"), "mpp": "", "reason": "no such file"},
    ]
    mixed = root / "mixed.csv"
    _write_manifest(mixed, rows[:10] + bad_rows + rows[10:])
    good_only = root / "good.csv"
    _write_manifest(good_only, rows)
    return {"root": root, "mixed": mixed, "good": good_only, "good_ids": [r["slide_id"] for r in rows],
            "bad": {r["slide_id"]: r["reason"] for r in bad_rows}}


def _write_manifest(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["slide_id", "path", "mpp"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _summary(out):
    return {r["slide_id"]: r for r in csv.DictReader(open(out / "summary.csv", encoding="utf-8"))}


def _complete(out):
    """Finished result folders (a leading dot marks a write still in progress) → result.json mtime."""
    return {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/result.json") if not p.parent.name.startswith(".")}


def _stable_result(folder):
    doc = json.loads((folder / "result.json").read_text())
    for key in VOLATILE:
        doc.pop(key, None)
        (doc.get("vessels") or {}).pop(key, None)
    return doc


@pytest.fixture(scope="module")
def local_run(batch):
    out = batch["root"] / "local"
    outcomes = ScoreRun(batch["mixed"], "demo", out, config=CONFIG, workers=2).run()
    return out, outcomes


def test_every_good_slide_is_scored_and_every_bad_one_reported(batch, local_run):
    out, outcomes = local_run
    summary = _summary(out)
    assert [o.slide_id for o in outcomes] == list(summary)  # manifest order
    for sid in batch["good_ids"]:
        assert summary[sid]["status"] == "scored", summary[sid]
        assert 0 <= float(summary[sid]["p_thrombosis"]) <= 1 and summary[sid]["error"] == ""
        assert (out / sid / "report.html").is_file()
    for sid, reason in batch["bad"].items():
        assert summary[sid]["status"] == "failed" and reason in summary[sid]["error"], summary[sid]
        assert not (out / sid).exists()  # nothing written for a bad slide
    assert sorted(p.name for p in out.iterdir()) == sorted(batch["good_ids"] + ["run.json", "summary.csv"])
    run = json.loads((out / "run.json").read_text())
    assert run["counts"] == {"slides": 25, "scored": 20, "resumed": 0, "failed": 5, "not_run": 0}
    assert run["model"]["synthetic_demo"] and len(run["model"]["sha256"]) == 64 and not run["interrupted"]
    # each result is the one predict writes: same file hash, same numbers as the summary row
    doc = json.loads((out / batch["good_ids"][3] / "result.json").read_text())
    row = summary[batch["good_ids"][3]]
    assert doc["slide"]["sha256"] == row["sha256"]
    assert doc["findings"]["thrombosis"]["probability"] == pytest.approx(float(row["p_thrombosis"]), abs=1e-6)


def test_cli_exit_status_says_whether_every_slide_succeeded(batch, local_run, tmp_path):
    from calciscope.cli import main

    out, _ = local_run
    with pytest.raises(SystemExit) as exc:  # the mixed batch again: all good slides resume, the bad still fail
        main(["score", str(batch["mixed"]), "--out", str(out), "--top-k", "1"])
    assert exc.value.code == 1
    assert {r["status"] for sid, r in _summary(out).items() if sid in batch["good_ids"]} == {"resumed"}


def test_sigkill_mid_batch_then_rerun_equals_an_uninterrupted_run(batch, local_run, tmp_path):
    reference, _ = local_run
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "calciscope", "score", str(batch["good"]), "--out", str(out), "--workers", "2",
           "--top-k", "1"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        done = _complete(out) if out.exists() else {}
        if len(done) >= 5 or proc.poll() is not None:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the parent and its worker processes, mid-write or not
    proc.wait()
    complete_before = _complete(out)
    assert 5 <= len(complete_before) < 20, "the kill should land mid-batch"

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = _summary(out)
    for sid in batch["good_ids"]:  # no slide scored twice: finished ones resumed, untouched on disk
        expected = "resumed" if sid in complete_before else "scored"
        assert summary[sid]["status"] == expected, (sid, summary[sid]["status"])
    for sid, mtime in complete_before.items():
        assert (out / sid / "result.json").stat().st_mtime_ns == mtime
    assert not list(out.glob(".*"))  # leftovers of the killed writes are gone
    for sid in batch["good_ids"]:  # final outputs equal an uninterrupted run's
        assert _stable_result(out / sid) == _stable_result(reference / sid), sid
        for name in ("tiles.csv", "annotations.geojson", "heatmap_thrombosis.png"):
            assert (out / sid / name).read_bytes() == (reference / sid / name).read_bytes(), (sid, name)


def _foreground_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_the_batch_and_keeps_what_is_done(batch, tmp_path):
    out = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "calciscope", "score", str(batch["good"]), "--out", str(out), "--workers", "2",
           "--top-k", "1"]
    # A shell starts a foreground command with SIGINT at its default; one started as a background job (``pytest &``)
    # inherits SIGINT *ignored*, and Python then keeps ignoring it: the Ctrl-C this test sends would be lost and the
    # batch would run to its end (exit 0). Give the child the foreground disposition whatever this process has.
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_foreground_sigint)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and len(_complete(out) if out.exists() else {}) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends: the whole foreground process group
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    run = json.loads((out / "run.json").read_text())
    summary = _summary(out)
    done = {sid for sid, row in summary.items() if row["status"] == "scored"}
    complete = set(_complete(out))
    assert run["interrupted"] and run["counts"]["scored"] == len(done) >= 1 and run["counts"]["not_run"] > 0
    assert len(complete) >= 3 and done <= complete  # every slide the summary calls scored has its finished folder;
    # a worker may have renamed its folder into place when the Ctrl-C reached the parent before its message did: at
    # most one such slide per worker, not in the summary as scored (a rerun resumes it)
    assert len(complete - done) <= 2
    for sid in done:  # ... with a whole result (resuming from it is the SIGKILL test's business)
        assert json.loads((out / sid / "result.json").read_text())["slide"]["sha256"] == summary[sid]["sha256"]


def test_a_crashed_worker_is_replaced_and_its_slide_retried_once(batch, tmp_path, monkeypatch):
    ids = batch["good_ids"][:3]
    manifest = tmp_path / "three.csv"
    rows = list(csv.DictReader(open(batch["good"])))[:3]
    _write_manifest(manifest, rows)
    monkeypatch.setenv(FAULT_ENV, f"crash-once:{ids[0]},crash:{ids[1]}")
    outcomes = {o.slide_id: o for o in ScoreRun(manifest, "demo", tmp_path / "out", config=CONFIG).run()}
    assert outcomes[ids[0]].status == "scored", outcomes[ids[0]].error
    assert outcomes[ids[0]].attempts == 2  # died once, retried, done
    assert outcomes[ids[1]].status == "failed" and "died twice" in outcomes[ids[1]].error
    assert outcomes[ids[2]].status == "scored" and outcomes[ids[2]].attempts == 1
    assert (tmp_path / "out" / ids[0] / "result.json").is_file() and not (tmp_path / "out" / ids[1]).exists()


def test_ray_backend_on_a_local_cluster_gives_the_local_summary(batch, local_run):
    try:
        import ray
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("Ray is part of the test extra and must be installed in CI")
        pytest.skip("Ray not installed (pip install 'calciscope[ray]')")
    reference, _ = local_run
    out = batch["root"] / "ray"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ScoreRun(batch["mixed"], "demo", out, config=CONFIG, backend="ray").run()
    finally:
        ray.shutdown()
    local, remote = _summary(reference), _summary(out)
    assert list(local) == list(remote)
    for sid in local:  # the local run may since have been resumed (the CLI test): 'scored' there is 'resumed'
        assert remote[sid]["status"] == ("failed" if local[sid]["status"] == "failed" else "scored"), sid
        for column in local[sid]:
            if column not in ("seconds", "status"):
                assert remote[sid][column] == local[sid][column], (sid, column)
    assert json.loads((out / "run.json").read_text())["backend"] == "ray"


def test_slide_ids_never_escape_the_output_folder_or_collide(tmp_path, batch):
    src = Path(list(csv.DictReader(open(batch["good"])))[0]["path"])
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    shutil.copyfile(src, tmp_path / "x" / "S1.tiff")
    shutil.copyfile(src, tmp_path / "y" / "s1.tiff")  # same id, different case, different folder
    manifest = tmp_path / "m.csv"
    _write_manifest(manifest, [
        {"slide_id": "../../etc/passwd", "path": str(src), "mpp": ""},
        {"slide_id": "", "path": "x/S1.tiff", "mpp": ""},  # relative to the manifest
        {"slide_id": "", "path": "y/s1.tiff", "mpp": "0.5"},
        {"slide_id": "dup", "path": str(src), "mpp": ""},  # the same file again: scored once
    ])
    jobs = read_jobs(manifest)
    ids = [j.slide_id for j in jobs]
    assert len(jobs) == 3 and ids[0] == "etc_passwd"
    assert ids[1].startswith("S1-") and ids[2].startswith("s1-") and len({i.lower() for i in ids}) == 3
    assert jobs[1].path == str(tmp_path / "x" / "S1.tiff") and jobs[2].slide_mpp == 0.5
    assert all("/" not in i and not i.startswith(".") for i in ids)


def test_folders_globs_and_bad_sources(tmp_path, batch):
    src = Path(list(csv.DictReader(open(batch["good"])))[0]["path"])
    for name in ("b.tiff", "a.svs", "notes.txt"):
        shutil.copyfile(src, tmp_path / name)
    assert [j.slide_id for j in read_jobs(tmp_path)] == ["a", "b"]
    assert [j.slide_id for j in read_jobs(str(tmp_path / "*.tiff"))] == ["b"]
    assert [(j.slide_id, j.path) for j in read_jobs(tmp_path / "a.svs")] == [("a", str(tmp_path / "a.svs"))]
    with pytest.raises(CalciscopeError, match=r"notes\.txt: expected a manifest \.csv, a folder of slides"):
        read_jobs(tmp_path / "notes.txt")
    with pytest.raises(CalciscopeError, match=r"nothing\*\.svs: no such file or folder"):
        read_jobs(str(tmp_path / "nothing*.svs"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalciscopeError, match="no slide files in this folder"):
        read_jobs(tmp_path / "empty")
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\nx.svs,1\n")
    with pytest.raises(CalciscopeError, match=r"bad\.csv: a manifest needs a header with a 'path' column"):
        read_jobs(bad)
