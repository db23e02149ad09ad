"""Score one slide: tissue → tiles at the model's mpp → calibrated tile probabilities → slide probabilities,
CUA-pattern score, top tiles with saliency. ``predict_slide`` is the Python API; ``Predictor`` keeps a loaded model
for many slides (``calciscope predict``, ``calciscope score``).

    result = calciscope.predict_slide("biopsy.svs", model="demo", out="results/")
    result.probabilities["thrombosis"], result.cua["score"], result.out_dir / "report.html"

Tiles stream from DataLoader workers in batches (no slide is ever held in memory); each tile's probability is
``sigmoid(logit / temperature)`` with the card's per-finding temperature. The forward pass runs in torch (a checkpoint
folder) or, with ``runtime="onnxruntime"``, in onnxruntime on an ONNX export (``calciscope export``; CPU, fp32, no
saliency: that needs gradients); everything before and after it is the same code. A tile model's slide probability
aggregates its tiles as the card prescribes (``inference.aggregate.slide_probabilities``); an attention-MIL model
pools tile embeddings with its attention head, and its attention weights take the place of tile probabilities in
heatmaps and top tiles.
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from calciscope._version import __version__
from calciscope.data.slides import SlideInfo, cached_slide, open_slide, safe_id
from calciscope.data.tiling import TileGrid, TilingConfig, make_grid
from calciscope.data.tissue import QCConfig, TissueConfig, detect_tissue, slide_qc, tile_qc
from calciscope.errors import CalciscopeError, CheckpointError, SlideError
from calciscope.inference import saliency as sal
from calciscope.io import sha256_file
from calciscope.model.aggregate import METHODS as AGGREGATIONS
from calciscope.model.aggregate import aggregation_settings, slide_probabilities
from calciscope.model.backbones import fold_batchnorm
from calciscope.model.card import ModelCard
from calciscope.model.checkpoint import WEIGHTS_FILE, load_checkpoint
from calciscope.model.cua import CUARule, explain
from calciscope.model.demo import resolve_model
from calciscope.model.precision import check_device, choose_precision, prepare_inputs, resolve_device
from calciscope.model.vessel_detection import VESSEL_POSITIVE  # the per-vessel call (export and report import it here)

RESULT_SCHEMA_VERSION = 1
RUNTIMES = ("torch", "onnxruntime")
SAMPLINGS = ("grid", "vessels", "both")
QC_COLUMNS = ("blur_var", "background_fraction", "pen_fraction", "dark_fraction")
NOTICE = ("Decision support, not a diagnosis: these scores show where a model trained on labelled slides sees the "
          "calciphylaxis pattern. The diagnosis rests with the pathologist and the clinical picture.")
Progress = Callable[[int, int], None]


def default_workers() -> int:
    return min(2, os.cpu_count() or 1)


@dataclass
class PredictConfig:
    """How to score: batching, decoding workers, aggregation (None = the card's), saliency and QC settings."""

    batch_size: int = 64
    workers: int = field(default_factory=default_workers)
    aggregation: str | None = None  # topk | max | quantile; None = as the model was validated
    k: int | None = None
    quantile: float | None = None
    top_k: int = 4  # top tiles per finding, each with a saliency map
    saliency: str | None = None  # guided-gradcam | gradcam | ig | none; None: guided-gradcam (torch), none (onnx)
    ig_steps: int = 32
    min_tissue: float = 0.5
    slide_mpp: float | None = None  # override the slide's own µm/px
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto | bf16 | fp16 | off
    runtime: str = "torch"  # torch (a checkpoint folder) | onnxruntime (an ONNX export, CPU, fp32)
    # vessel analysis: "auto" = the segmenter shipped beside the model (model folder's vessels/, or the demo's),
    # skipped when there is none; a segmenter folder; or "none"
    vessels: str = "auto"
    # per-vessel classifier: "auto" = the one in the segmenter's classifier/ folder (the demo has one), a folder, or
    # "none" (each vessel then gets its vessel tiles' highest tile-model probability, or the card's vessel head)
    vessel_classifier: str = "auto"
    # calcium-artifact classifier: "auto" = the one in the segmenter's artifact_classifier/ folder (the demo has one),
    # a folder, or "none"; it flags the listed vessels where calcium was lost in sectioning (a vessel classifier with
    # its own calcium_artifact output does this when there is none)
    artifact_classifier: str = "auto"
    # grid | vessels | both: the tiles slide probabilities aggregate; None = the card's, or, with a vessel
    # classifier, the vessels: each finding's highest vessel probability through the classifier's slide map
    sampling: str | None = None
    min_fat_vessels: int = 3  # small vessels in subcutaneous fat needed before the CUA pattern is judged

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise CalciscopeError(f"unknown runtime {self.runtime!r}; choose one of: {', '.join(RUNTIMES)}")
        onnx = self.runtime == "onnxruntime"
        if self.saliency is None:
            self.saliency = "none" if onnx else "guided-gradcam"
        if self.batch_size < 1:
            raise CalciscopeError(f"batch size must be at least 1, got {self.batch_size}")
        if self.workers < 0:
            raise CalciscopeError(f"workers must be 0 or more, got {self.workers}")
        if self.top_k < 0:
            raise CalciscopeError(f"top-k must be 0 or more, got {self.top_k}")
        if self.aggregation is not None and self.aggregation not in AGGREGATIONS:
            raise CalciscopeError(f"unknown aggregation {self.aggregation!r}; choose one of: {', '.join(AGGREGATIONS)}")
        if self.saliency not in sal.METHODS:
            raise CalciscopeError(f"unknown saliency {self.saliency!r}; choose one of: {', '.join(sal.METHODS)}")
        if not 0 <= self.min_tissue <= 1:
            raise CalciscopeError(f"min tissue must be within [0, 1], got {self.min_tissue}")
        if onnx and self.saliency != "none":
            raise CalciscopeError(f"saliency {self.saliency!r} needs gradients, which the onnxruntime runtime does not "
                                  f"compute; use saliency 'none' with it, or the torch runtime")
        if onnx and self.device not in ("auto", "cpu"):
            raise CalciscopeError(f"device {self.device!r}: the onnxruntime runtime runs on the CPU; use the torch "
                                  f"runtime for {self.device}")
        check_device(self.device)
        if self.sampling is not None and self.sampling not in SAMPLINGS:
            raise CalciscopeError(f"unknown sampling {self.sampling!r}; choose one of: {', '.join(SAMPLINGS)}")
        if self.min_fat_vessels < 0:
            raise CalciscopeError(f"min fat vessels must be 0 or more, got {self.min_fat_vessels}")
        if onnx and self.amp not in ("auto", "off"):
            raise CalciscopeError(f"amp {self.amp!r}: the onnxruntime runtime computes in fp32")


@dataclass
class TopTile:
    """One of the most suspicious tiles for a finding: level-0 square, its score, where the saliency peaks."""

    finding: str
    rank: int
    index: int  # row in tiles.csv
    x: int
    y: int
    size: int  # level-0 side in pixels
    score: float  # tile probability (tile models) or attention weight (MIL)
    probability: float | None
    saliency_peak: tuple[float, float] | None = None  # level-0 (x, y)
    saliency_file: str | None = None  # relative to the slide's output folder

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "tile_index": self.index, "x": self.x, "y": self.y, "w": self.size, "h": self.size,
                "score": round(self.score, 6),
                "probability": None if self.probability is None else round(self.probability, 6),
                "saliency_peak": None if self.saliency_peak is None else [round(v, 1) for v in self.saliency_peak],
                "saliency": self.saliency_file}


@dataclass
class SlideResult:
    """Everything ``predict`` found on one slide; ``to_dict()`` is result.json."""

    slide_id: str
    path: Path
    sha256: str
    slide: SlideInfo
    card: ModelCard
    model_sha256: str  # of the file that scored: model.safetensors (torch) or the .onnx export (onnxruntime)
    labels: list[str]
    probabilities: dict[str, float]
    thresholds: dict[str, float]
    cua: dict[str, Any]
    qc: dict[str, Any]
    grid: TileGrid
    tile_probs: np.ndarray  # (N, L) calibrated; NaN for MIL models (no tile-level output)
    tile_scores: np.ndarray  # (N, L) what heatmaps show: tile probabilities, or MIL attention scaled to max 1
    tile_qc: np.ndarray  # (N, 4) QC_COLUMNS
    top_tiles: dict[str, list[TopTile]]
    saliency_maps: dict[tuple[str, int], np.ndarray]  # (finding, rank) → (H, W) in [0, 1]
    top_tile_images: dict[tuple[str, int], np.ndarray]  # (finding, rank) → RGB tile
    thumbnail: np.ndarray  # RGB
    aggregation: dict[str, Any]
    saliency_method: str
    seconds: float
    created: str = ""
    out_dir: Path | None = None
    runtime: str = "torch"
    vessels: Any = None  # calciscope.inference.vessels.VesselAnalysis, when vessel analysis ran
    sampling: str = "grid"  # which tiles the slide probabilities aggregate: grid | vessels | both
    vessel_classifier: dict[str, Any] | None = None  # provenance of the per-vessel classifier, when one judged them

    @property
    def decisions(self) -> dict[str, bool]:
        return {label: self.probabilities[label] >= self.thresholds[label] for label in self.labels}

    @property
    def n_tiles(self) -> int:
        return len(self.grid)

    @property
    def score_kind(self) -> str:
        return "attention" if self.card.head == "mil" else "probability"

    def to_dict(self) -> dict[str, Any]:
        card = self.card
        return {
            "schema_version": RESULT_SCHEMA_VERSION,
            "calciscope_version": __version__,
            "created": self.created,
            "notice": NOTICE,
            "slide": {
                "id": self.slide_id,
                "file": self.path.name,
                "sha256": self.sha256,
                "backend": self.slide.backend,
                "vendor": self.slide.vendor,
                "dimensions": list(self.slide.level_dimensions[0]),
                "mpp": self.slide.mpp,
                "mpp_source": self.slide.mpp_source,
                "objective_power": self.slide.objective_power,
            },
            "model": {
                "name": card.name,
                "version": card.version,
                "sha256": self.model_sha256,
                "weights_sha256": card.weights_sha256 or (self.model_sha256 if self.runtime == "torch" else None),
                "runtime": self.runtime,
                "backbone": card.backbone,
                "head": card.head,
                "synthetic_demo": card.synthetic_demo,
                "intended_use": card.intended_use,
            },
            "tiling": {
                "mpp": card.mpp,
                "tile_px": card.tile_px,
                "tile_size_level0": self.grid.size0_px,
                "level": self.grid.level,
                "min_tissue": self.grid.config.min_tissue,
                "n_tiles": self.n_tiles,
            },
            "qc": self.qc,
            "aggregation": self.aggregation,
            "findings": {
                label: {"probability": round(self.probabilities[label], 6),
                        "threshold": round(self.thresholds[label], 6),
                        "decision": "positive" if self.decisions[label] else "negative"}
                for label in self.labels
            },
            "sampling": self.sampling,
            "vessel_classifier": self.vessel_classifier,
            "cua_pattern": self.cua,
            "vessels": None if self.vessels is None else self.vessels.to_dict({k: VESSEL_POSITIVE for k in self.labels}),
            "top_tiles": {
                "score": self.score_kind,
                "saliency_method": self.saliency_method,
                "by_finding": {f: [t.to_dict() for t in tiles] for f, tiles in self.top_tiles.items()},
            },
            "seconds": round(self.seconds, 3),
            "tiles_per_second": round(self.n_tiles / self.seconds, 1) if self.seconds > 0 else None,
        }


class _PredictTiles(Dataset):
    """(uint8 CHW tile, QC values, index) per tile; decoded in DataLoader workers with their own slide handle."""

    def __init__(self, path: Path, mpp: float | None, grid: TileGrid):
        self.path, self.mpp, self.grid = path, mpp, grid

    def __len__(self) -> int:
        return len(self.grid)

    def __getitem__(self, i: int):
        tile = self.grid.read(cached_slide(self.path, self.mpp), i)
        qc = tile_qc(tile)
        return tile, np.array([qc[c] for c in QC_COLUMNS], np.float32), i


def _collate(batch):
    """uint8 (B, 3, H, W) tiles, (B, 4) QC, (B,) indices. numpy's stack: torch.stack of uint8 tiles with several
    intra-op threads stalled for ~0.3 s per batch on a busy 2-core machine, numpy's takes ~1 ms."""
    tiles = np.stack([item[0] for item in batch]).transpose(0, 3, 1, 2)
    return (torch.from_numpy(np.ascontiguousarray(tiles)), torch.from_numpy(np.stack([item[1] for item in batch])),
            torch.tensor([item[2] for item in batch]))


def inference_backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The model's backbone with BatchNorm folded into the convolutions (torch.fx): same outputs, ~1.2-1.3× faster
    on CPU. Saliency keeps the original model (its hooks need the original layers). Untraceable backbones stay as
    they are."""
    return fold_batchnorm(model.backbone)


class Predictor:
    """A loaded model plus scoring settings; ``predict(slide)`` scores one slide, ``write`` its outputs.

    ``model``: a checkpoint folder or ``"demo"`` (runtime torch), or an ONNX export or a folder holding
    ``model.onnx`` (runtime onnxruntime). ``model_path`` is what was loaded; ``score_tiles`` is the forward pass.
    """

    def __init__(self, model: str | Path = "demo", config: PredictConfig | None = None):
        self.config = config or PredictConfig()
        if self.config.runtime == "onnxruntime":
            self._load_onnx(model)
        else:
            self._load_torch(model)
        self.labels = list(self.card.labels)
        self.rule = CUARule.from_dict(self.card.cua_rule)
        missing = [label for label in self.rule.labels if label not in self.labels]
        self.rule_applies = not missing
        self.tiling = TilingConfig(mpp=self.card.mpp, tile_px=self.card.tile_px, min_tissue=self.config.min_tissue)
        agg = aggregation_settings(self.card)
        self.aggregation = {
            "method": self.config.aggregation or agg["method"],
            "k": agg["k"] if self.config.k is None else int(self.config.k),
            "quantile": agg["quantile"] if self.config.quantile is None else float(self.config.quantile),
        }
        if self.card.head == "mil":
            self.aggregation = {"method": "attention"}
        self._load_segmenter()

    def _load_segmenter(self) -> None:
        """The vessel segmenter ``config.vessels`` names (see PredictConfig), and where slide scores come from."""
        from calciscope.model.segmenter import for_inference, load_segmenter
        from calciscope.model.vessel_detection import AdequacyConfig, VesselConfig
        from calciscope.model.vessel_head import VesselHead

        cfg = self.config
        spec = cfg.vessels
        folder: Path | None = None
        if spec not in ("auto", "none"):
            if self.card.head == "mil":
                raise CalciscopeError("vessel analysis scores tiles centred on vessels, which needs a tile model; "
                                      "this is an attention-MIL model (use --vessels none)")
            folder = Path(spec)
        elif spec == "auto" and self.card.head != "mil":
            beside = self.model_path.parent if self.model_path.is_file() else self.model_path
            folder = beside / "vessels" if (beside / "vessels" / "segmenter.json").is_file() else None
        self.segmenter = None
        # the vessel networks run where the tile model runs (the CPU beside an ONNX tile model)
        device = self.precision.device if self.precision is not None else torch.device("cpu")
        if folder is not None:
            model, seg_card = load_segmenter(folder)
            self.segmenter = (for_inference(model).to(device), seg_card)
        self.vessel_classifier = self._on(device, self._load_vessel_classifier(folder))
        self.artifact_classifier = self._on(device, self._load_artifact_classifier(folder))
        head = self.card.extra.get("vessel_head")
        self.vessel_head = VesselHead.from_dict(head, self.labels) if head else None
        self.segmenter_path = folder
        self.vessel_config = VesselConfig(adequacy=AdequacyConfig(min_small_fat_vessels=cfg.min_fat_vessels))
        default = "vessels" if self.vessel_classifier is not None else str(self.card.extra.get("sampling", "grid"))
        self.sampling = cfg.sampling or default
        if self.sampling == "both" and self.vessel_classifier is not None:
            raise CalciscopeError("sampling 'both' aggregates grid and vessel tiles, and a vessel classifier judges the "
                                  "vessels instead of their tiles: use sampling 'vessels' or 'grid', or "
                                  "--vessel-classifier none")
        if self.sampling not in SAMPLINGS or self.card.head == "mil":
            self.sampling = "grid"
        if self.sampling != "grid" and self.segmenter is None:
            if cfg.sampling is not None:
                raise CalciscopeError(f"sampling {self.sampling!r} needs vessel analysis, and no vessel segmenter was "
                                      f"found (give one with --vessels PATH)")
            self.sampling = "grid"  # the card asks for vessel tiles, but vessel analysis is off: the grid alone

    def vessel_classifier_info(self) -> dict[str, Any] | None:
        """What result.json records of the vessel classifier: its weights' sha256, whether slide probabilities come
        from it, and whether it is the synthetic demo."""
        if self.vessel_classifier is None:
            return None
        card = self.vessel_classifier[1]
        return {"weights_sha256": card.weights_sha256, "slide_probabilities": self.sampling == "vessels",
                "synthetic_demo": card.synthetic_demo}

    def slide_thresholds(self) -> dict[str, float]:
        """Per-finding slide thresholds: the vessel classifier card's when slide probabilities come from it, else the
        model card's."""
        if self.sampling == "vessels" and self.vessel_classifier is not None:
            card = self.vessel_classifier[1]
            return {label: float(card.slide_thresholds.get(label, 0.5)) for label in self.labels}
        return {label: self.card.threshold(label) for label in self.labels}

    @staticmethod
    def _on(device: torch.device, found):
        """A (model, card) pair with the model moved to ``device`` (None stays None)."""
        return None if found is None else (found[0].to(device), found[1])

    def _classifier_folder(self, segmenter: Path | None, spec: str, subfolder: str, what: str):
        """(model, card) of the classifier ``spec`` names ("auto": ``<segmenter>/<subfolder>/`` when present, a
        folder, or "none"), or None."""
        from calciscope.model.vessel_classifier import CARD_FILE as CLASSIFIER_CARD
        from calciscope.model.vessel_classifier import load_classifier

        if spec == "none" or segmenter is None:
            if spec not in ("auto", "none"):
                raise CalciscopeError(f"{what} {spec}: it judges detected vessels, and vessel analysis is off (no "
                                      f"segmenter; give one with --vessels PATH)")
            return None
        folder = segmenter / subfolder if spec == "auto" else Path(spec)
        if spec == "auto" and not (folder / CLASSIFIER_CARD).is_file():
            return None
        return load_classifier(folder), folder

    def _load_vessel_classifier(self, segmenter: Path | None):
        """(model, card) of the vessel classifier ``config.vessel_classifier`` names, or None."""
        found = self._classifier_folder(segmenter, self.config.vessel_classifier, "classifier", "vessel classifier")
        if found is None:
            return None
        (model, card), folder = found
        missing = [k for k in self.labels if k not in card.labels]
        if missing:
            raise CalciscopeError(f"vessel classifier {folder}: it does not judge {', '.join(missing)}, which the model "
                                  f"{self.model_path.name} reports (its labels: {', '.join(card.labels)})")
        return model, card

    def _load_artifact_classifier(self, segmenter: Path | None):
        """(model, card) of the calcium-artifact classifier ``config.artifact_classifier`` names, or None."""
        found = self._classifier_folder(segmenter, self.config.artifact_classifier, "artifact_classifier",
                                        "artifact classifier")
        if found is None:
            return None
        (model, card), folder = found
        if not card.artifact_output:
            raise CalciscopeError(f"artifact classifier {folder}: it has no calcium_artifact output (train it with "
                                  f"judge_artifacts: true)")
        return model, card

    def _load_torch(self, model: str | Path) -> None:
        self.model_path = resolve_model(model)
        if self.model_path.suffix.lower() == ".onnx" and self.model_path.is_file():
            raise CheckpointError(self.model_path, "an ONNX export, not a checkpoint folder: score it with the "
                                                   "onnxruntime runtime (--runtime onnxruntime)")
        self.precision = choose_precision(self.config.amp, channels_last=True,
                                          device=resolve_device(self.config.device))
        self.model, self.card = load_checkpoint(self.model_path, map_location=self.precision.device)
        self.model = self.model.to(memory_format=torch.channels_last)
        self.backbone = inference_backbone(self.model)
        self.model_sha256 = self.card.weights_sha256 or sha256_file(self.model_path / WEIGHTS_FILE)
        self.temperature = torch.tensor([self.card.temperature[label] for label in self.card.labels],
                                        dtype=torch.float32)
        self.mean = torch.tensor(self.card.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(self.card.std, dtype=torch.float32).view(1, 3, 1, 1)
        self.score_tiles: Callable[[torch.Tensor], np.ndarray] = self._torch_tiles

    def _load_onnx(self, model: str | Path) -> None:
        from calciscope.inference.onnx_runtime import OnnxTileRunner, resolve_onnx_model

        self.model_path = resolve_onnx_model(model)
        # as many intra-op threads as torch would use here (``calciscope score`` sets torch's per worker process)
        self.runner = OnnxTileRunner(self.model_path, threads=torch.get_num_threads())
        if self.runner.output != "logits":
            raise CheckpointError(self.model_path, "an attention-MIL export gives tile embeddings only; its attention "
                                                   "head runs in torch: score with the checkpoint folder")
        self.card = self.runner.card
        self.model = self.backbone = self.precision = None  # no torch model on this path
        self.model_sha256 = sha256_file(self.model_path)
        self.score_tiles = self._onnx_tiles

    # -- scoring ------------------------------------------------------------------------------------------------

    def predict(self, slide_path: str | Path, *, progress: Progress | None = None, slide_id: str | None = None,
                sha256: str | None = None) -> SlideResult:
        """Score one slide (no files written); a slide that cannot be scored raises ``SlideError``.

        ``slide_id`` (already sanitised) replaces the id taken from the file name; ``sha256`` is the file's digest
        when the caller has it already.
        """
        start = time.perf_counter()
        slide_path = Path(slide_path)
        cfg = self.config
        with open_slide(slide_path, mpp=cfg.slide_mpp) as slide:
            info = slide.info()
            mask = detect_tissue(slide, TissueConfig())
            grid = make_grid(slide, mask, self.tiling)
            if len(grid) == 0:
                raise SlideError(slide_path, f"no tile has at least {cfg.min_tissue:.0%} tissue at "
                                             f"{self.card.mpp:g} µm/px ({self.card.tile_px} px tiles): nothing to score")
            thumbnail = slide.thumbnail(1024)
            vessels = self._vessels(slide, mask) if self.segmenter is not None else None
        sha = sha256 or sha256_file(slide_path)
        logits_or_emb, qc_values = self._stream(slide_path, grid, progress)
        qc = slide_qc(mask, QCConfig(), blurry_tile_fraction=float((qc_values[:, 0] < QCConfig().blur_laplacian_var).mean()))

        if self.card.head == "mil":
            probs, scores = self._mil_outputs(logits_or_emb)
            tile_probs = np.full((len(grid), len(self.labels)), np.nan, np.float32)
        else:
            tile_probs = logits_or_emb
            scores = tile_probs
            probs = self._slide_probabilities(tile_probs, vessels)
        # 6 decimals everywhere (result.json, report, terminal), so no two outputs disagree in a shown digit
        probabilities = {label: round(float(p), 6) for label, p in zip(self.labels, probs)}
        thresholds = self.slide_thresholds()
        cua = self._cua(probabilities, vessels)

        top = self._top_tiles(grid, scores, tile_probs)
        maps, images = self._saliency(slide_path, grid, top)
        return SlideResult(
            slide_id=slide_id or info.slide_id, path=slide_path, sha256=sha, slide=info, card=self.card,
            model_sha256=self.model_sha256, labels=self.labels, probabilities=probabilities, thresholds=thresholds,
            cua=cua, qc=qc.to_dict(), grid=grid, tile_probs=tile_probs, tile_scores=scores, tile_qc=qc_values,
            top_tiles=top, saliency_maps=maps, top_tile_images=images, thumbnail=thumbnail,
            aggregation=self.aggregation, saliency_method=cfg.saliency, seconds=time.perf_counter() - start,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), runtime=cfg.runtime,
            vessels=vessels, sampling=self.sampling, vessel_classifier=self.vessel_classifier_info(),
        )

    def _vessels(self, slide, mask):
        from calciscope.inference.vessels import analyze_vessels

        model, card = self.segmenter
        return analyze_vessels(slide, mask, model, card, lambda tiles: self.score_tiles(torch.from_numpy(tiles)),
                               self.tiling, self.labels, self.vessel_config, self.vessel_head, self.vessel_classifier,
                               self.artifact_classifier)

    def _slide_probabilities(self, tile_probs: np.ndarray, vessels) -> np.ndarray:
        """Slide probabilities: the card's aggregation and calibration over the grid tiles ("grid"), the tiles centred
        on the detected vessels ("vessels"; none found: every finding 0) or both sets together ("both"). With a
        vessel classifier (or else a vessel head in the card), "vessels" is its slide map instead: the highest
        per-vessel probability, calibrated."""
        agg = self.aggregation
        vessel_tiles = vessels.tile_probs if vessels is not None else np.zeros((0, len(self.labels)), np.float32)
        if self.sampling == "vessels" and self.vessel_classifier is not None:
            from calciscope.model.vessel_classifier import slide_probabilities as from_vessels

            found = np.array([[v.probabilities[k] for k in self.labels] for v in vessels.vessels], np.float64)
            return from_vessels(found.reshape(-1, len(self.labels)), self.vessel_classifier[1], self.labels)
        if self.sampling == "vessels" and self.vessel_head is not None:
            return self.vessel_head.slide_probabilities(
                np.array([[v.probabilities[k] for k in self.labels] for v in vessels.vessels], np.float32))
        if self.sampling == "vessels":
            if len(vessel_tiles) == 0:
                return np.zeros(len(self.labels), np.float32)
            tile_probs = vessel_tiles
        elif self.sampling == "both":
            tile_probs = np.vstack([tile_probs, vessel_tiles])
        return slide_probabilities(tile_probs, self.card, method=agg["method"], k=agg["k"], quantile=agg["quantile"])

    def _stream(self, path: Path, grid: TileGrid, progress: Progress | None) -> tuple[np.ndarray, np.ndarray]:
        """Tiles through the model in batches: (calibrated probabilities or MIL embeddings, tile QC)."""
        cfg = self.config
        loader = DataLoader(
            _PredictTiles(path, cfg.slide_mpp, grid),
            batch_size=cfg.batch_size,
            num_workers=cfg.workers,
            collate_fn=_collate,
            prefetch_factor=4 if cfg.workers else None,
            persistent_workers=False,
        )
        out: np.ndarray | None = None
        qc = np.zeros((len(grid), len(QC_COLUMNS)), np.float32)
        done = 0
        for images, tile_qc_values, index in loader:
            y = self.score_tiles(images)
            if out is None:
                out = np.zeros((len(grid), y.shape[1]), np.float32)
            idx = index.numpy()
            out[idx] = y
            qc[idx] = tile_qc_values.numpy()
            done += len(idx)
            if progress is not None:
                progress(done, len(grid))
        assert out is not None  # the grid is not empty
        return out, qc

    def _torch_tiles(self, images: torch.Tensor) -> np.ndarray:
        """uint8 tiles (B, 3, H, W) -> calibrated probabilities (B, L), or embeddings (B, D) for MIL, in torch."""
        mil = self.card.head == "mil"
        with torch.inference_mode():
            x = prepare_inputs(images, self.mean, self.std, self.precision)
            with self.precision.autocast():
                y = self.backbone(x)
                if not mil:
                    y = self.model.head(y)  # tile model: head(dropout(embed)); dropout is off in eval
            y = y.float().cpu()
            if not mil:
                y = torch.sigmoid(y / self.temperature)
        return y.numpy()

    def _onnx_tiles(self, images: torch.Tensor) -> np.ndarray:
        """uint8 tiles (B, 3, H, W) -> calibrated probabilities (B, L), in onnxruntime (the same sigmoid(z / T))."""
        return self.runner.probabilities(images.numpy())

    def _mil_outputs(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            logits, attention = self.model.aggregate(torch.from_numpy(embeddings).to(self.precision.device))
        probs = torch.sigmoid(logits.float().cpu() / self.temperature).numpy()
        attention = attention.float().cpu().numpy()
        scores = attention / np.maximum(attention.max(axis=0, keepdims=True), 1e-12)
        return probs, scores.astype(np.float32)

    def _cua(self, probabilities: dict[str, float], vessels=None) -> dict[str, Any]:
        if not self.rule_applies:
            return {"score": None, "status": "not_applicable",
                    "reason": f"the model's labels {self.labels} do not include every finding the rule reads "
                              f"({list(self.rule.labels)})"}
        scored = _rounded(explain({label: probabilities[label] for label in self.rule.labels}, self.rule))
        if vessels is not None and vessels.adequacy["status"] != "sufficient":
            return {"status": "insufficient_sampling", "reason": vessels.adequacy["reason"], **scored}
        return {"status": "scored", **scored}

    def _top_tiles(self, grid: TileGrid, scores: np.ndarray, tile_probs: np.ndarray) -> dict[str, list[TopTile]]:
        k = min(self.config.top_k, len(grid))
        top: dict[str, list[TopTile]] = {}
        for j, label in enumerate(self.labels):
            order = np.argsort(-scores[:, j], kind="stable")[:k]
            top[label] = [
                TopTile(label, rank, int(i), int(grid.xy[i, 0]), int(grid.xy[i, 1]), grid.size0_px,
                        float(scores[i, j]), None if np.isnan(tile_probs[i, j]) else float(tile_probs[i, j]))
                for rank, i in enumerate(order, 1)
            ]
        return top

    def _saliency(self, path: Path, grid: TileGrid, top: dict[str, list[TopTile]]):
        """Saliency for every top tile (read again from the slide: a few tiles, not worth keeping the rest)."""
        maps: dict[tuple[str, int], np.ndarray] = {}
        images: dict[tuple[str, int], np.ndarray] = {}
        entries = [t for tiles in top.values() for t in tiles]
        if not entries:
            return maps, images
        slide = cached_slide(path, self.config.slide_mpp)
        tiles = np.stack([grid.read(slide, t.index) for t in entries])
        for t, tile in zip(entries, tiles):
            images[(t.finding, t.rank)] = tile
        if self.config.saliency == "none":
            return maps, images
        targets = np.array([self.labels.index(t.finding) for t in entries])
        scale = grid.size0_px / self.card.tile_px
        computed = sal.saliency_maps(self.model, tiles, targets, self.card.mean, self.card.std,
                                     method=self.config.saliency, ig_steps=self.config.ig_steps,
                                     device=self.precision.device)
        for t, m in zip(entries, computed):
            maps[(t.finding, t.rank)] = m
            px, py = sal.peak(m)
            t.saliency_peak = (t.x + px * scale, t.y + py * scale)
            t.saliency_file = f"saliency/{safe_id(t.finding)}/tile_{t.x}_{t.y}.png"
        return maps, images

    # -- outputs ------------------------------------------------------------------------------------------------

    def write(self, result: SlideResult, out_root: str | Path) -> Path:
        """Write ``OUT/<slide_id>/`` atomically (see ``inference.export``); returns the folder."""
        from calciscope.inference.export import write_outputs

        result.out_dir = write_outputs(result, out_root)
        return result.out_dir

    def predict_and_write(self, slide_path: str | Path, out_root: str | Path, *, progress: Progress | None = None,
                          slide_id: str | None = None, sha256: str | None = None) -> SlideResult:
        result = self.predict(slide_path, progress=progress, slide_id=slide_id, sha256=sha256)
        self.write(result, out_root)
        return result


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
