"""Score one slide: tissue → tiles at the model's mpp → calibrated tile probabilities (``inference.tile_scoring``)
→ vessels (``inference.vessel_stage``) → slide probabilities, CUA-pattern score, top tiles with saliency.
``predict_slide`` is the Python API; ``Predictor`` keeps the loaded networks for many slides (``calciscope predict``,
``calciscope score``); ``inference.export`` writes a result's files.

    result = calciscope.predict_slide("biopsy.svs", model="demo", out="results/")
    result.probabilities["thrombosis"], result.cua["score"], result.out_dir / "report.html"

A tile model's slide probability aggregates its tiles as the card prescribes (``model.aggregate``), or, with a
vessel classifier, comes from the detected vessels; an attention-MIL model pools tile embeddings with its attention
head, and its attention weights take the place of tile probabilities in heatmaps and top tiles.
"""

from __future__ import annotations

import datetime as _dt
import gc
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from calciscope.data.slides import open_slide
from calciscope.data.tiling import TilingConfig, make_grid
from calciscope.data.tissue import QCConfig, TissueConfig, detect_tissue, slide_qc
from calciscope.errors import CalciscopeError, SlideError
from calciscope.inference.config import PredictConfig
from calciscope.inference.export import write_outputs
from calciscope.inference.progress import SlideProgress, forward_macs
from calciscope.inference.ood import OODCheck, OODMonitor
from calciscope.inference.result import SlideResult
from calciscope.inference.tile_scoring import TileScorer
from calciscope.inference.vessel_stage import VesselStage
from calciscope.io import sha256_file
from calciscope.model.aggregate import aggregation_settings
from calciscope.model.cua import CUARule, explain
from calciscope.model.segmenter import WINDOW_PX
from calciscope.model.vessel_classifier import N_EXTRA

__all__ = ["PredictConfig", "Predictor", "SlideResult", "check_writable", "predict_slide"]
Progress = Callable[[SlideProgress], None]  # called with where predict is on the slide, as it moves


class Predictor:
    """The loaded networks plus scoring settings; ``predict(slide)`` scores one slide, ``write`` its outputs.

    ``model``: a checkpoint folder or ``"demo"`` (runtime torch), or an ONNX export or a folder holding
    ``model.onnx`` (runtime onnxruntime). ``tiles`` is the tile model, ``vessel_stage`` the vessel networks.
    """

    def __init__(self, model: str | Path = "demo", config: PredictConfig | None = None):
        self.config = config or PredictConfig()
        self.tiles = TileScorer(model, self.config)
        self.card, self.labels = self.tiles.card, self.tiles.labels
        self.model_path, self.model_sha256 = self.tiles.model_path, self.tiles.model_sha256
        self.precision, self.score_tiles = self.tiles.precision, self.tiles.score_tiles
        self.rule = CUARule.from_dict(self.card.cua_rule)
        self.rule_applies = all(label in self.labels for label in self.rule.labels)
        self.tiling = TilingConfig(mpp=self.card.mpp, tile_px=self.card.tile_px, min_tissue=self.config.min_tissue)
        agg = aggregation_settings(self.card)
        self.aggregation = {
            "method": self.config.aggregation or agg["method"],
            "k": agg["k"] if self.config.k is None else int(self.config.k),
            "quantile": agg["quantile"] if self.config.quantile is None else float(self.config.quantile),
        }
        if self.card.head == "mil":
            self.aggregation = {"method": "attention"}
        # the vessel networks run where the tile model runs (the CPU beside an ONNX tile model)
        self.vessel_stage = VesselStage(self.card, self.model_path, self.config, self.tiles.device)
        self.sampling = self.vessel_stage.sampling
        self.unit_costs = self._unit_costs()
        self.ood = OODMonitor(self.tiles.backbone, self.card, self.vessel_stage)  # hooks: outputs do not change
        _freeze_heap_once()

    def _unit_costs(self) -> tuple[float, float, float]:
        """Multiply-accumulates of one segmenter window, one vessel crop (both classifiers) and one tile: the weights
        of ``SlideProgress`` (ONNX tile model: a tile counts as its pixels)."""
        side = self.card.tile_px
        tile = (forward_macs(self.tiles.model, torch.zeros(1, 3, side, side)) if self.tiles.model is not None
                else float(side * side))
        window = vessel = 0.0
        stage = self.vessel_stage
        if stage.segmenter is not None:
            model, card = stage.segmenter
            small = 8 * 2 ** (len(card.widths) - 1)  # the U-Net's cost grows with the area: count it on a small one
            window = forward_macs(model, torch.zeros(1, 3, small, small)) * (WINDOW_PX / small) ** 2
        for pair in (stage.vessel_classifier, stage.artifact_classifier):
            if pair is not None:
                crop = pair[1].crop_config.crop_px
                vessel += forward_macs(pair[0], torch.zeros(1, 3, crop, crop), torch.zeros(1, N_EXTRA))
        return window, vessel or tile, tile

    def slide_thresholds(self) -> dict[str, float]:
        return self.vessel_stage.slide_thresholds()

    def predict(self, slide_path: str | Path, *, progress: Progress | None = None, slide_id: str | None = None,
                sha256: str | None = None, slide_mpp: float | None = None) -> SlideResult:
        """Score one slide (no files written); a slide that cannot be scored raises ``SlideError``.

        ``slide_id`` (already sanitised) replaces the id taken from the file name; ``sha256`` is the file's digest
        when the caller has it already; ``slide_mpp`` overrides the slide's µm/px for this slide (a manifest's
        ``mpp``), else ``config.slide_mpp`` does. ``progress`` is called with a ``SlideProgress`` (segmenter windows
        run, vessels judged, tiles scored, the share of the work done) each time one of them moves.
        """
        start = time.perf_counter()
        slide_path = Path(slide_path)
        cfg = self.config
        state = SlideProgress(costs=self.unit_costs)

        def report(what: str, done: int, total: int) -> None:
            nonlocal state
            state = state.step(what, done, total)
            if progress is not None:
                progress(state)

        mpp = slide_mpp if slide_mpp is not None else cfg.slide_mpp
        with open_slide(slide_path, mpp=mpp) as slide:
            info = slide.info(series_uid=cfg.record_series_uid)
            mask = detect_tissue(slide, TissueConfig())
            grid = make_grid(slide, mask, self.tiling)
            if len(grid) == 0:
                raise SlideError(slide_path, f"no tile has at least {cfg.min_tissue:.0%} tissue at "
                                             f"{self.card.mpp:g} µm/px ({self.card.tile_px} px tiles): nothing to score")
            report("tiles", 0, len(grid))
            thumbnail = slide.thumbnail(1024)
            vessels = shared = tile_rows = None
            self.ood.start()
            if self.vessel_stage.segmenter is not None:
                # the grid tiles are cut from the segmenter's windows as they are decoded: one decode for both
                shared = self.tiles.window_tiles(grid, slide.level_downsamples[grid.level], self.ood.take_tile_rows,
                                                 lambda done, total: report("tiles", done, total))
                vessels = self.vessel_stage.run(slide, mask, self.score_tiles, self.tiling, report, on_windows=shared)
            self.ood.vessels_done(slide, mask, vessels)
        sha = sha256 or sha256_file(slide_path)
        if shared is not None:
            logits_or_emb, qc_values, tile_rows = shared.finish(slide_path, mpp)
        else:
            self.ood.tiles_start()
            logits_or_emb, qc_values = self.tiles.stream(slide_path, mpp, grid,
                                                         lambda done, total: report("tiles", done, total))
        ood = self.ood.finish(grid, vessels, tile_rows)  # flags OOD vessels and restates adequacy without them
        qc = slide_qc(mask, QCConfig(), blurry_tile_fraction=float((qc_values[:, 0] < QCConfig().blur_laplacian_var).mean()))

        routes = {}
        if self.card.head == "mil":
            probs, scores = self.tiles.mil_outputs(logits_or_emb)
            tile_probs = np.full((len(grid), len(self.labels)), np.nan, np.float32)
        else:
            tile_probs = scores = logits_or_emb
            probs = self.vessel_stage.slide_probabilities(tile_probs, vessels, self.aggregation)
            routes = self.vessel_stage.routes(tile_probs, vessels)
        # 6 decimals everywhere (result.json, report, terminal), so no two outputs disagree in a shown digit
        probabilities = {label: round(float(p), 6) for label, p in zip(self.labels, probs)}
        top = self.tiles.top_tiles(grid, scores, tile_probs)
        maps, images = self.tiles.saliency(slide_path, mpp, grid, top)
        return SlideResult(
            slide_id=slide_id or info.slide_id, path=slide_path, sha256=sha, slide=info, card=self.card,
            model_sha256=self.model_sha256, labels=self.labels, probabilities=probabilities,
            thresholds=self.slide_thresholds(), cua=self._cua(probabilities, vessels, ood), qc=ood.qc(qc.to_dict()),
            grid=grid, tile_probs=tile_probs, tile_scores=scores, tile_qc=qc_values, top_tiles=top, saliency_maps=maps,
            top_tile_images=images, thumbnail=thumbnail, aggregation=self.aggregation, saliency_method=cfg.saliency,
            seconds=time.perf_counter() - start,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), runtime=cfg.runtime,
            vessels=vessels, sampling=self.sampling, vessel_classifier=self.vessel_stage.classifier_info(),
            settings=cfg.to_dict(), ood=ood, routes=routes,
        )

    def _cua(self, probabilities: dict[str, float], vessels=None, ood: OODCheck | None = None) -> dict[str, Any]:
        if not self.rule_applies:
            return {"score": None, "status": "not_applicable",
                    "reason": f"the model's labels {self.labels} do not include every finding the rule reads "
                              f"({list(self.rule.labels)})"}
        scored = _rounded(explain({label: probabilities[label] for label in self.rule.labels}, self.rule))
        if ood is not None and ood.flagged:  # never a bare negative on tissue the model has never seen
            return {"status": "not_assessable", "reason": ood.reason, **scored}
        if vessels is not None and vessels.adequacy["status"] != "sufficient":
            return {"status": "insufficient_sampling", "reason": vessels.adequacy["reason"], **scored}
        return {"status": "scored", **scored}

    def write(self, result: SlideResult, out_root: str | Path) -> Path:
        """Write ``OUT/<slide_id>/`` atomically (see ``inference.export``); returns the folder."""
        result.out_dir = write_outputs(result, out_root)
        return result.out_dir

    def predict_and_write(self, slide_path: str | Path, out_root: str | Path, *, progress: Progress | None = None,
                          slide_id: str | None = None, sha256: str | None = None,
                          slide_mpp: float | None = None) -> SlideResult:
        result = self.predict(slide_path, progress=progress, slide_id=slide_id, sha256=sha256, slide_mpp=slide_mpp)
        self.write(result, out_root)
        return result


_heap_frozen = False


def _freeze_heap_once() -> None:
    """Move every object alive now (the imported libraries, the first predictor's networks) out of the cyclic
    collector's reach, once per process: a slide's thousands of small records (outlines, GeoJSON rings) otherwise
    set off full collections that walk all of torch's objects, ~0.1-0.2 s each. Objects made later are collected
    as usual; only what is frozen here is never searched for cycles again (it lives as long as the process)."""
    global _heap_frozen
    if not _heap_frozen:
        gc.collect()
        gc.freeze()
        _heap_frozen = True


def _rounded(obj: Any, places: int = 6) -> Any:
    if isinstance(obj, float):
        return round(obj, places)
    if isinstance(obj, dict):
        return {k: _rounded(v, places) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v, places) for v in obj]
    return obj


def predict_slide(path: str | Path, model: str | Path = "demo", out: str | Path | None = None, *,
                  progress: Progress | None = None, **settings: Any) -> SlideResult:
    """Score one slide with a checkpoint directory (or ``"demo"``); with ``out``, also write ``out/<slide_id>/``.

    ``settings`` are ``PredictConfig`` fields, e.g. ``saliency="ig"``, ``workers=0``, ``slide_mpp=0.25``.
    """
    predictor = Predictor(model, PredictConfig(**settings))
    if out is not None:
        check_writable(out)
        return predictor.predict_and_write(path, out, progress=progress)
    return predictor.predict(path, progress=progress)


def check_writable(out_root: str | Path) -> Path:
    """Fail early, with one line, when ``out_root`` cannot hold results (before any slide is scored)."""
    out_root = Path(out_root)
    try:
        out_root.mkdir(parents=True, exist_ok=True)
        probe = out_root / f".calciscope-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise CalciscopeError(f"{out_root}: output directory is not writable ({reason})") from None
    return out_root
