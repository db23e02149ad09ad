"""Batch scoring (``calciscope score``): many slides, resumable, one bad slide or one crashed worker never stops
the batch, on a local pool of worker processes or on a Ray cluster.

- Input: a manifest CSV (``path`` [, ``slide_id``, ``mpp``, anything else]) or a folder or glob of slides.
- Output: ``OUT/<slide_id>/`` per slide exactly as ``predict`` writes it (atomically: temporary name, then rename),
  ``OUT/summary.csv`` (one row per slide: status, probabilities, CUA-pattern score, QC flags, error, seconds) and
  ``OUT/run.json`` (model hash, settings, counts).
- Resume: a slide whose ``result.json`` is there for the same file sha256 and model sha256 is not scored again
  (status ``resumed``); anything else is (re)done. A kill at any moment leaves complete folders or none: leftovers of
  interrupted writes (``.<id>.*.partial``) are removed when the next run starts.
- Faults: a slide that cannot be scored is recorded with its error (``failed``) and the batch goes on; a worker
  process that dies (segfault, out of memory, killed) is replaced and its slide retried once.
"""

from __future__ import annotations

import csv
import datetime as _dt
import glob
import hashlib
import io
import json
import multiprocessing as mp
import os
import shutil
import signal
import time
from collections import deque
from dataclasses import dataclass, field, replace
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from calciscope._version import __version__
from calciscope.data.slides import SLIDE_SUFFIXES, find_slides, is_slide_path, safe_id, slide_id_from_path, slides_among
from calciscope.errors import CalciscopeError
from calciscope.inference.config import PredictConfig
from calciscope.inference.predict import Predictor, check_writable
from calciscope.io import sha256_file, write_bytes_atomic, write_json

BACKENDS = ("local", "ray")
STATUSES = ("scored", "resumed", "failed", "not_run")
FAULT_ENV = "CALCISCOPE_FAULT_INJECT"  # test hook, e.g. "crash-once:<slide_id>,crash:<slide_id>": kills the worker
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class SlideJob:
    """One slide to score: its output id (already safe and unique in the batch), file, optional mpp override."""

    slide_id: str
    path: str
    slide_mpp: float | None = None


@dataclass
class Outcome:
    """What happened to one slide; a row of summary.csv."""

    slide_id: str
    path: str
    status: str
    seconds: float = 0.0
    error: str = ""
    sha256: str = ""
    n_tiles: int | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    cua_pattern: float | None = None
    cua_status: str = ""  # scored | insufficient_sampling | not_assessable (out of distribution) | not_applicable
    n_vessels: int | None = None
    qc_flags: list[str] = field(default_factory=list)
    attempts: int = 1


# -- input ---------------------------------------------------------------------------------------------------------


def read_jobs(source: str | Path) -> list[SlideJob]:
    """Slides to score from a manifest CSV, a folder (its slide files and DICOM series: ``find_slides``), a glob
    pattern (``slides_among``) or one slide (a file, a DICOM file or a DICOM series folder).

    Ids come from the manifest's ``slide_id`` or the file name, sanitised so each names one folder inside the
    output; ids that collide (case-insensitively) get a short hash of the file path appended.
    """
    text = str(source)
    path = Path(text)
    if path.is_file() and path.suffix.lower() == ".csv":
        entries = _manifest_entries(path)
    elif path.is_dir():
        files = find_slides(path)
        if not files:
            raise CalciscopeError(f"{path}: no slide files in this folder ({', '.join(sorted(SLIDE_SUFFIXES))}) and "
                                  f"no DICOM series")
        entries = [(None, str(p), None) for p in files]
    elif is_slide_path(path):
        entries = [(None, text, None)]
    elif path.exists():
        raise CalciscopeError(f"{path}: expected a manifest .csv, a folder of slides, a glob pattern or a slide file "
                              f"({', '.join(sorted(SLIDE_SUFFIXES))}, .dcm)")
    else:
        matches = sorted(glob.glob(text, recursive=True))
        files = [str(p) for p in slides_among(matches)]
        if not files:
            raise CalciscopeError(f"{text}: no such file or folder, and no slide files match it as a pattern")
        entries = [(None, m, None) for m in files]
    return _assign_ids(entries)


def _manifest_entries(path: Path) -> list[tuple[str | None, str, float | None]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CalciscopeError(f"{path}: cannot read the manifest ({exc})") from None
    if not rows or "path" not in rows[0]:
        raise CalciscopeError(f"{path}: a manifest needs a header with a 'path' column (and optionally slide_id, mpp)")
    entries = []
    for line, row in enumerate(rows, start=2):
        if not (row.get("path") or "").strip():
            raise CalciscopeError(f"{path}: line {line} has an empty path")
        slide = Path(row["path"].strip())
        slide = slide if slide.is_absolute() else path.parent / slide
        mpp = (row.get("mpp") or row.get("slide_mpp") or "").strip()
        try:
            mpp_value = float(mpp) if mpp else None
        except ValueError:
            raise CalciscopeError(f"{path}: line {line}: mpp {mpp!r} is not a number") from None
        entries.append(((row.get("slide_id") or "").strip() or None, str(slide), mpp_value))
    return entries


def _assign_ids(entries: Iterable[tuple[str | None, str, float | None]]) -> list[SlideJob]:
    seen_paths: set[str] = set()
    unique = []
    for given, path, mpp in entries:
        key = os.path.realpath(path)
        if key in seen_paths:  # the same file listed twice is scored once
            continue
        seen_paths.add(key)
        unique.append((safe_id(given) if given else slide_id_from_path(path), path, mpp))
    counts: dict[str, int] = {}
    for sid, _, _ in unique:
        counts[sid.lower()] = counts.get(sid.lower(), 0) + 1
    jobs = []
    for sid, path, mpp in unique:
        if counts[sid.lower()] > 1:
            digest = hashlib.sha1(os.path.realpath(path).encode("utf-8")).hexdigest()[:8]
            sid = safe_id(f"{sid[:110]}-{digest}")
        jobs.append(SlideJob(sid, path, mpp))
    return jobs


# -- one slide (in a worker) -----------------------------------------------------------------------------------


def completed_result(out_root: Path, slide_id: str, sha256: str, model_sha256: str) -> dict | None:
    """The slide's result.json when a complete result exists for this file and this model, else None."""
    try:
        doc = json.loads((out_root / slide_id / "result.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if doc.get("slide", {}).get("sha256") != sha256 or doc.get("model", {}).get("sha256") != model_sha256:
        return None
    return doc


def _outcome_from_doc(job: SlideJob, doc: dict, status: str, seconds: float) -> Outcome:
    return Outcome(
        slide_id=job.slide_id, path=job.path, status=status, seconds=round(seconds, 3),
        sha256=doc["slide"]["sha256"], n_tiles=doc["tiling"]["n_tiles"],
        probabilities={k: v["probability"] for k, v in doc["findings"].items()},
        cua_pattern=doc["cua_pattern"].get("score"), cua_status=doc["cua_pattern"].get("status", ""),
        n_vessels=(doc.get("vessels") or {}).get("n_vessels"), qc_flags=list(doc["qc"].get("flags", [])),
    )


def score_one(predictor, job: SlideJob, out_root: str | Path, default_mpp: float | None = None) -> Outcome:
    """Score one slide unless a complete result for this file and model exists; never raises for a bad slide.

    The slide's mpp override is the job's (manifest ``mpp``), else ``default_mpp`` (the run's ``--slide-mpp``).
    """
    start = time.perf_counter()
    out_root = Path(out_root)
    _maybe_inject_fault(job, out_root)
    try:
        sha = sha256_file(job.path)
    except OSError as exc:
        reason = "no such file" if isinstance(exc, FileNotFoundError) else (exc.strerror or str(exc))
        return Outcome(job.slide_id, job.path, "failed", time.perf_counter() - start, f"{job.path}: {reason}")
    doc = completed_result(out_root, job.slide_id, sha, predictor.model_sha256)
    if doc is not None:
        return _outcome_from_doc(job, doc, "resumed", time.perf_counter() - start)
    try:
        result = predictor.predict_and_write(job.path, out_root, slide_id=job.slide_id, sha256=sha,
                                             slide_mpp=job.slide_mpp if job.slide_mpp is not None else default_mpp)
    except CalciscopeError as exc:
        return Outcome(job.slide_id, job.path, "failed", time.perf_counter() - start, str(exc), sha256=sha)
    except MemoryError:
        return Outcome(job.slide_id, job.path, "failed", time.perf_counter() - start, f"{job.path}: out of memory",
                       sha256=sha)
    except Exception as exc:  # noqa: BLE001 - an unforeseen failure on one slide must not stop the batch
        return Outcome(job.slide_id, job.path, "failed", time.perf_counter() - start,
                       f"{job.path}: internal error ({type(exc).__name__}: {exc})", sha256=sha)
    return _outcome_from_doc(job, result.to_dict(), "scored", time.perf_counter() - start)


def _maybe_inject_fault(job: SlideJob, out_root: Path) -> None:
    """Test hook: ``CALCISCOPE_FAULT_INJECT=crash-once:<id>`` kills the worker process the first time it starts that
    slide, ``crash:<id>`` every time (a real process death, as a segfault or the OOM killer would cause)."""
    specs = dict(reversed(item.split(":", 1)) for item in os.environ.get(FAULT_ENV, "").split(",") if ":" in item)
    mode = specs.get(job.slide_id)
    if mode not in ("crash", "crash-once"):
        return
    marker = out_root / f".fault-{job.slide_id}"
    if mode == "crash-once" and marker.exists():
        return
    marker.touch()
    os._exit(70)


# -- local pool ------------------------------------------------------------------------------------------------


def _worker_main(conn, model: str, config: PredictConfig, out_root: str, threads: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the workers
    torch.set_num_threads(threads)
    try:
        predictor = Predictor(model, config)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which stops the run
        conn.send(("fatal", f"{exc}"))
        return
    while True:
        try:
            job = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if job is None:
            return
        conn.send(("done", score_one(predictor, job, out_root, config.slide_mpp)))


class _Worker:
    def __init__(self, ctx, model: str, config: PredictConfig, out_root: Path, threads: int):
        self.conn, child = ctx.Pipe()
        # not a daemon: a daemonic process may not start the DataLoader workers that decode its tiles. The parent
        # kills its workers on every way out of run_local; one orphaned by a SIGKILL exits on its closed pipe.
        self.process = ctx.Process(target=_worker_main, args=(child, model, config, str(out_root), threads),
                                   daemon=False)
        self.process.start()
        child.close()
        self.job: SlideJob | None = None

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, BrokenPipeError):
            pass

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()


def run_local(jobs: list[SlideJob], model: str, config: PredictConfig, out_root: Path, workers: int,
              on_outcome: Callable[[Outcome], None]) -> None:
    """Score ``jobs`` on ``workers`` spawned processes, each with its own loaded model; a dead worker is replaced and
    its slide retried once."""
    ctx = mp.get_context("spawn")  # never fork a process that has torch's thread pools running
    threads = max(1, (os.cpu_count() or 1) // workers)
    pending = deque(jobs)
    attempts: dict[str, int] = {}
    pool: list[_Worker] = []
    try:
        pool = [_Worker(ctx, model, config, out_root, threads) for _ in range(min(workers, len(jobs)))]
        while pending or any(w.job is not None for w in pool):
            for w in pool:
                if w.job is None and pending:
                    w.job = pending.popleft()
                    attempts[w.job.slide_id] = attempts.get(w.job.slide_id, 0) + 1
                    w.conn.send(w.job)
            ready = wait([w.conn for w in pool] + [w.process.sentinel for w in pool], timeout=5)
            for i, w in enumerate(list(pool)):
                message = None
                if w.conn in ready:
                    try:
                        message = w.conn.recv()
                    except (EOFError, OSError):
                        message = None
                if message is not None:
                    kind, payload = message
                    if kind == "fatal":
                        raise CalciscopeError(payload)
                    payload.attempts = attempts.get(payload.slide_id, 1)
                    w.job = None
                    on_outcome(payload)
                    continue
                if w.process.is_alive():
                    continue
                # the worker died: replace it; its slide gets one more try
                w.kill()
                job, code = w.job, w.process.exitcode
                pool[i] = _Worker(ctx, model, config, out_root, threads)
                if job is None:
                    continue
                if attempts[job.slide_id] < 2:
                    pending.appendleft(job)
                else:
                    on_outcome(Outcome(job.slide_id, job.path, "failed",
                                       error=f"{job.path}: the worker process died twice scoring it (exit code {code})",
                                       attempts=attempts[job.slide_id]))
    except BaseException:  # Ctrl-C or a fatal error: stop now; interrupted writes leave only .partial folders
        for w in pool:  # outcomes already sent are recorded, so the summary lists every slide the parent heard of
            while w.job is not None and w.conn.poll(0):
                try:
                    kind, payload = w.conn.recv()
                except (EOFError, OSError):
                    break
                if kind == "done":
                    payload.attempts = attempts.get(payload.slide_id, 1)
                    w.job = None
                    on_outcome(payload)
        for w in pool:
            w.kill()
        raise
    for w in pool:
        w.stop()
    for w in pool:
        w.process.join(timeout=10)
        w.kill()


# -- Ray -------------------------------------------------------------------------------------------------------

_RAY_PREDICTORS: dict[str, Any] = {}


def _ray_score(model: str, config: PredictConfig, job: SlideJob, out_root: str) -> Outcome:
    """One Ray task: score one slide with a model kept loaded per worker process."""
    key = json.dumps([model, config.to_dict()], sort_keys=True)
    if key not in _RAY_PREDICTORS:
        _RAY_PREDICTORS.clear()
        _RAY_PREDICTORS[key] = Predictor(model, config)
    return score_one(_RAY_PREDICTORS[key], job, out_root, config.slide_mpp)


def run_ray(jobs: list[SlideJob], model: str, config: PredictConfig, out_root: Path, address: str | None,
            cpus_per_task: float, on_outcome: Callable[[Outcome], None]) -> None:
    """One Ray task per slide (``max_retries=1``: a task whose worker dies is retried once by Ray)."""
    try:
        import ray
    except ImportError:
        raise CalciscopeError("--backend ray needs Ray: pip install 'calciscope[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    task = ray.remote(num_cpus=cpus_per_task, max_retries=1)(_ray_score)
    refs = {task.remote(model, config, job, str(out_root)): job for job in jobs}
    try:
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            for ref in done:
                job = refs.pop(ref)
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    outcome = Outcome(job.slide_id, job.path, "failed", attempts=2,
                                      error=f"{job.path}: Ray task failed twice ({first})")
                on_outcome(outcome)
    finally:
        for ref in refs:
            ray.cancel(ref, force=True)


# -- the run ---------------------------------------------------------------------------------------------------


@dataclass
class ScoreRun:
    """A batch: the slides, the model, where results go and how to run; ``run()`` returns the outcomes."""

    source: str | Path
    model: str | Path
    out: str | Path
    config: PredictConfig | None = None  # how each slide is scored (None: the defaults)
    workers: int = 1
    backend: str = "local"
    ray_address: str | None = None
    progress: Progress | None = None

    def run(self) -> list[Outcome]:
        if self.backend not in BACKENDS:
            raise CalciscopeError(f"unknown backend {self.backend!r}; choose one of: {', '.join(BACKENDS)}")
        if self.workers < 1:
            raise CalciscopeError(f"workers must be at least 1, got {self.workers}")
        jobs = read_jobs(self.source)
        out_root = check_writable(self.out).resolve()
        config = self.config or PredictConfig()
        if self.backend == "ray" or self.workers > 1:
            config = replace(config, workers=0)  # slides run in parallel already: no decoding processes per slide
        probe = Predictor(self.model, replace(config, workers=0))  # a bad model fails here, once
        model_path = str(probe.model_path)  # a checkpoint folder, or an .onnx file (runtime onnxruntime)
        _remove_partials(out_root)

        started = _dt.datetime.now(_dt.timezone.utc)
        t0 = time.perf_counter()
        outcomes: dict[str, Outcome] = {}
        last_flush = time.perf_counter()

        def record(outcome: Outcome) -> None:
            nonlocal last_flush
            outcomes[outcome.slide_id] = outcome
            if self.progress is not None:
                self.progress(len(outcomes), len(jobs))
            if time.perf_counter() - last_flush > 10:
                self._write_summary(out_root, jobs, outcomes, probe.labels)
                last_flush = time.perf_counter()

        interrupted = False
        try:
            if self.backend == "local":
                run_local(jobs, model_path, config, out_root, self.workers, record)
            else:
                run_ray(jobs, model_path, config, out_root, self.ray_address, max(1, config.workers), record)
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            self._write_summary(out_root, jobs, outcomes, probe.labels)
            counts = {s: sum(1 for j in jobs if outcomes.get(j.slide_id, _NOT_RUN).status == s) for s in STATUSES}
            write_json(out_root / "run.json", {
                "schema_version": 1,
                "calciscope_version": __version__,
                "input": str(self.source),
                "model": {"path": model_path, "name": probe.card.name, "version": probe.card.version,
                          "sha256": probe.model_sha256, "runtime": config.runtime,
                          "synthetic_demo": probe.card.synthetic_demo},
                "backend": self.backend,
                "workers": self.workers,
                "settings": config.to_dict(),
                "counts": {"slides": len(jobs), **counts},
                "started": started.isoformat(timespec="seconds"),
                "seconds": round(time.perf_counter() - t0, 3),
                "interrupted": interrupted,
            })
        return [outcomes.get(j.slide_id) or Outcome(j.slide_id, j.path, "not_run") for j in jobs]

    @staticmethod
    def _write_summary(out_root: Path, jobs: list[SlideJob], outcomes: dict[str, Outcome], labels: list[str]) -> None:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["slide_id", "path", "status", *(f"p_{label}" for label in labels), "cua_pattern",
                         "cua_status", "n_vessels", "qc_flags", "n_tiles", "sha256", "seconds", "attempts", "error"])
        for job in jobs:
            o = outcomes.get(job.slide_id) or Outcome(job.slide_id, job.path, "not_run", attempts=0)
            probs = [("" if label not in o.probabilities else f"{o.probabilities[label]:.6f}") for label in labels]
            writer.writerow([o.slide_id, o.path, o.status, *probs,
                             "" if o.cua_pattern is None else f"{o.cua_pattern:.6f}", o.cua_status,
                             "" if o.n_vessels is None else o.n_vessels, ";".join(o.qc_flags),
                             "" if o.n_tiles is None else o.n_tiles, o.sha256, f"{o.seconds:.3f}", o.attempts,
                             o.error])
        write_bytes_atomic(out_root / "summary.csv", buf.getvalue().encode("utf-8"))


_NOT_RUN = Outcome("", "", "not_run")


def _remove_partials(out_root: Path) -> None:
    """Folders left by writes that were killed halfway (``.<id>.*.partial`` / ``.old``): never results."""
    for leftover in list(out_root.glob(".*.partial")) + list(out_root.glob(".*.old")):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
