"""What ``predict`` found on one slide (``SlideResult``; ``to_dict()`` is result.json) and its most suspicious tiles.

Plain records: the scoring code fills them, the output writers (``inference.export``, ``inference.report``) read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calciscope._version import __version__
from calciscope.data.slides import SlideInfo
from calciscope.data.tiling import TileGrid
from calciscope.model.card import ModelCard
from calciscope.model.vessel_detection import VESSEL_POSITIVE

RESULT_SCHEMA_VERSION = 1
NOTICE = ("Decision support, not a diagnosis: these scores show where a model trained on labelled slides sees the "
          "calciphylaxis pattern. The diagnosis rests with the pathologist and the clinical picture.")


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
    tile_qc: np.ndarray  # (N, 4) data.tissue.QC_COLUMNS
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
    settings: dict[str, Any] | None = None  # the resolved PredictConfig it was scored with
    ood: Any = None  # calciscope.inference.ood.OODCheck: is the slide unlike the networks' training data
    # per finding whose slide map has a grid route: {"vessels": highest vessel probability, "grid": grid-tile slide
    # probability} (inference.vessel_stage.VesselStage.routes)
    routes: dict[str, dict[str, float]] = field(default_factory=dict)

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
                **({"dicom_series_uid": self.slide.dicom_series_uid} if self.slide.dicom_series_uid else {}),
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
                "training_warnings": list(card.extra.get("warnings", [])),  # e.g. calibration not checked
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
            "settings": self.settings,
            "findings": {
                label: {"probability": round(self.probabilities[label], 6),
                        "threshold": round(self.thresholds[label], 6),
                        "decision": "positive" if self.decisions[label] else "negative",
                        **({"routes": self.routes[label]} if label in self.routes else {})}
                for label in self.labels
            },
            "sampling": self.sampling,
            "vessel_classifier": self.vessel_classifier,
            "out_of_distribution": None if self.ood is None else self.ood.to_dict(),
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


def positive_findings(probabilities: dict[str, float]) -> list[str]:
    """The findings a vessel counts as positive for (probability ≥ ``VESSEL_POSITIVE``), in label order."""
    return [k for k, v in probabilities.items() if v >= VESSEL_POSITIVE]
