"""The vessel stage of ``predict``: which vessel networks run (segmenter, vessel classifier, calcium-artifact
classifier, or the card's vessel head), where slide probabilities come from (``sampling``), and running them on a
slide (``inference.vessels.analyze_vessels``).

``PredictConfig.vessels`` "auto" takes the segmenter shipped beside the model (the model folder's ``vessels/``);
the classifiers default to the ``classifier/`` and ``artifact_classifier/`` folders inside the segmenter's. With a
vessel classifier, slide probabilities are each finding's highest vessel probability through its slide map.
The vessel networks run where the tile model runs and in its precision (``PredictConfig.amp``: bf16 autocast on
CPUs that have it, channels_last; the segmenter with BatchNorm folded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from calciscope.data.slides import Slide
from calciscope.data.tiling import TilingConfig
from calciscope.data.tissue import TissueMask
from calciscope.errors import CalciscopeError
from calciscope.inference.config import SAMPLINGS, PredictConfig
from calciscope.inference.vessels import VesselAnalysis, VesselProgress, analyze_vessels
from calciscope.model.aggregate import slide_probabilities
from calciscope.model.card import ModelCard
from calciscope.model.precision import choose_precision
from calciscope.model.segmenter import WindowsSeen, for_inference, load_segmenter
from calciscope.model.vessel_classifier import CARD_FILE as CLASSIFIER_CARD
from calciscope.model.vessel_classifier import load_classifier
from calciscope.model.vessel_classifier import slide_probabilities as from_vessels
from calciscope.model.vessel_detection import AdequacyConfig, VesselConfig
from calciscope.model.vessel_head import VesselHead


class VesselStage:
    """The vessel networks a tile model scores with, on ``device``; ``segmenter`` is None when vessel analysis is
    off (``run`` must not be called then)."""

    def __init__(self, card: ModelCard, model_path: Path, config: PredictConfig, device: torch.device):
        self.card, self.config, self.labels = card, config, list(card.labels)
        self.precision = choose_precision(config.amp, channels_last=True, device=device)
        folder = self._segmenter_folder(model_path)
        self.segmenter = None
        if folder is not None:
            model, seg_card = load_segmenter(folder)
            self.segmenter = (for_inference(model).to(device), seg_card)
        self.vessel_classifier = _on(device, self._load_vessel_classifier(folder, model_path))
        self.artifact_classifier = _on(device, self._load_artifact_classifier(folder))
        head = card.extra.get("vessel_head")
        self.vessel_head = VesselHead.from_dict(head, self.labels) if head else None
        self.segmenter_path = folder
        self.vessel_config = VesselConfig(adequacy=AdequacyConfig(min_small_fat_vessels=config.min_fat_vessels))
        self.sampling = self._sampling()

    def _segmenter_folder(self, model_path: Path) -> Path | None:
        spec = self.config.vessels
        if spec not in ("auto", "none"):
            if self.card.head == "mil":
                raise CalciscopeError("vessel analysis scores tiles centred on vessels, which needs a tile model; "
                                      "this is an attention-MIL model (use --vessels none)")
            return Path(spec)
        if spec == "auto" and self.card.head != "mil":
            beside = model_path.parent if model_path.is_file() else model_path
            return beside / "vessels" if (beside / "vessels" / "segmenter.json").is_file() else None
        return None

    def _sampling(self) -> str:
        """Which tiles the slide probabilities aggregate: the config's, else the vessels with a vessel classifier,
        else the card's."""
        cfg = self.config
        default = "vessels" if self.vessel_classifier is not None else str(self.card.extra.get("sampling", "grid"))
        sampling = cfg.sampling or default
        if sampling == "both" and self.vessel_classifier is not None:
            raise CalciscopeError("sampling 'both' aggregates grid and vessel tiles, and a vessel classifier judges the "
                                  "vessels instead of their tiles: use sampling 'vessels' or 'grid', or "
                                  "--vessel-classifier none")
        if sampling not in SAMPLINGS or self.card.head == "mil":
            sampling = "grid"
        if sampling != "grid" and self.segmenter is None:
            if cfg.sampling is not None:
                raise CalciscopeError(f"sampling {sampling!r} needs vessel analysis, and no vessel segmenter was "
                                      f"found (give one with --vessels PATH)")
            sampling = "grid"  # the card asks for vessel tiles, but vessel analysis is off: the grid alone
        return sampling

    def _classifier_folder(self, segmenter: Path | None, spec: str, subfolder: str, what: str):
        """(model, card) of the classifier ``spec`` names ("auto": ``<segmenter>/<subfolder>/`` when present, a
        folder, or "none") with its folder, or None."""
        if spec == "none" or segmenter is None:
            if spec not in ("auto", "none"):
                raise CalciscopeError(f"{what} {spec}: it judges detected vessels, and vessel analysis is off (no "
                                      f"segmenter; give one with --vessels PATH)")
            return None
        folder = segmenter / subfolder if spec == "auto" else Path(spec)
        if spec == "auto" and not (folder / CLASSIFIER_CARD).is_file():
            return None
        return load_classifier(folder), folder

    def _load_vessel_classifier(self, segmenter: Path | None, model_path: Path):
        """(model, card) of the vessel classifier ``config.vessel_classifier`` names, or None."""
        found = self._classifier_folder(segmenter, self.config.vessel_classifier, "classifier", "vessel classifier")
        if found is None:
            return None
        (model, card), folder = found
        missing = [k for k in self.labels if k not in card.labels]
        if missing:
            raise CalciscopeError(f"vessel classifier {folder}: it does not judge {', '.join(missing)}, which the model "
                                  f"{model_path.name} reports (its labels: {', '.join(card.labels)})")
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

    def classifier_info(self) -> dict[str, Any] | None:
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

    def run(self, slide: Slide, tissue: TissueMask, score_tiles: Callable[[torch.Tensor], np.ndarray],
            tiling: TilingConfig, progress: VesselProgress | None = None,
            on_windows: WindowsSeen | None = None) -> VesselAnalysis:
        """Every vessel of ``slide`` found, measured, placed and judged (``score_tiles``: the tile model, for vessel
        tiles when there is no vessel classifier); ``progress(step, done, total)`` as ``analyze_vessels`` reports;
        ``on_windows`` sees the segmenter's decoded windows."""
        model, card = self.segmenter
        return analyze_vessels(slide, tissue, model, card, lambda tiles: score_tiles(torch.from_numpy(tiles)),
                               tiling, self.labels, self.vessel_config, self.vessel_head, self.vessel_classifier,
                               self.artifact_classifier, precision=self.precision, progress=progress,
                               on_windows=on_windows)

    def grid_route(self, tile_probs: np.ndarray) -> np.ndarray | None:
        """The tile model's slide probabilities over the grid tiles, by its card's own aggregation and slide map, when
        the vessel classifier's slide map takes them (a finding with a grid route: see calibrate-slides)."""
        classifier = self.vessel_classifier[1] if self.vessel_classifier is not None else None
        if classifier is None or not any(m.get("grid") for m in classifier.slide_calibration.values()):
            return None
        return slide_probabilities(tile_probs, self.card)

    def routes(self, tile_probs: np.ndarray, vessels: VesselAnalysis | None) -> dict[str, dict[str, float]]:
        """Per finding with a grid route, what its slide probability combined: the highest listed vessel's probability
        and the tile model's grid-tile slide probability (result.json ``findings.<finding>.routes``)."""
        grid = self.grid_route(tile_probs) if self.sampling == "vessels" else None
        if grid is None or vessels is None:
            return {}
        maps = self.vessel_classifier[1].slide_calibration
        out = {}
        for j, label in enumerate(self.labels):
            if maps.get(label, {}).get("grid"):
                top = max((v.probabilities[label] for v in vessels.vessels), default=0.0)
                out[label] = {"vessels": round(float(top), 6), "grid": round(float(grid[j]), 6)}
        return out

    def slide_probabilities(self, tile_probs: np.ndarray, vessels: VesselAnalysis | None,
                            aggregation: dict[str, Any]) -> np.ndarray:
        """Slide probabilities: the card's aggregation and calibration over the grid tiles ("grid"), the tiles centred
        on the detected vessels ("vessels"; none found: every finding 0) or both sets together ("both"). With a
        vessel classifier (or else a vessel head in the card), "vessels" is its slide map instead: the highest
        per-vessel probability, calibrated."""
        labels = self.labels
        vessel_tiles = vessels.tile_probs if vessels is not None else np.zeros((0, len(labels)), np.float32)
        if self.sampling == "vessels" and self.vessel_classifier is not None:
            found = np.array([[v.probabilities[k] for k in labels] for v in vessels.vessels], np.float64)
            return from_vessels(found.reshape(-1, len(labels)), self.vessel_classifier[1], labels,
                                self.grid_route(tile_probs))
        if self.sampling == "vessels" and self.vessel_head is not None:
            return self.vessel_head.slide_probabilities(
                np.array([[v.probabilities[k] for k in labels] for v in vessels.vessels], np.float32))
        if self.sampling == "vessels":
            if len(vessel_tiles) == 0:
                return np.zeros(len(labels), np.float32)
            tile_probs = vessel_tiles
        elif self.sampling == "both":
            tile_probs = np.vstack([tile_probs, vessel_tiles])
        return slide_probabilities(tile_probs, self.card, method=aggregation["method"], k=aggregation["k"],
                                   quantile=aggregation["quantile"])


def _on(device: torch.device, found):
    """A (model, card) pair with the model moved to ``device`` (None stays None)."""
    return None if found is None else (found[0].to(device), found[1])
