"""How ``predict`` and ``score`` score a slide: one dataclass, read from YAML (``--config``) or built from the CLI,
whose resolved form goes whole into ``result.json`` and ``run.json``.

Each field carries its command-line flag and help in its metadata, so the CLI builds the option set of ``predict``
and ``score`` from this class: an option and its default are written once, here. The module stays light (no torch
at import) because the CLI reads it when it starts.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from calciscope.errors import CalciscopeError
from calciscope.io import from_dict, read_yaml_mapping

RUNTIMES = ("torch", "onnxruntime")
SAMPLINGS = ("grid", "vessels", "both")
SALIENCY_METHODS = ("guided-gradcam", "gradcam", "ig", "none")


def default_workers() -> int:
    return min(2, os.cpu_count() or 1)


def _opt(default: Any = None, help: str = "", flag: str | None = None, factory=None):
    """A PredictConfig field with its CLI flag (default ``--<name-with-dashes>``) and help."""
    metadata = {"help": help, **({"flag": flag} if flag else {})}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class PredictConfig:
    """How to score: batching, decoding workers, aggregation (None = the card's), saliency, vessels and QC."""

    batch_size: int = _opt(64, "Tiles per forward pass.")
    workers: int = _opt(help="Tile decoding processes (0: none).", factory=default_workers)
    aggregation: str | None = _opt(None, "topk, max or quantile (default: the model's).", flag="--aggregate")
    k: int | None = _opt(None, "Tiles averaged by --aggregate topk (default: the model's).")
    quantile: float | None = _opt(None, "Quantile of --aggregate quantile (default: the model's).")
    top_k: int = _opt(4, "Top tiles per finding, each with a saliency map.")
    saliency: str | None = _opt(None, "guided-gradcam (Grad-CAM sharpened by guided backprop), gradcam (coarse), ig "
                                      "(integrated gradients) or none; default guided-gradcam with torch, none with "
                                      "onnxruntime.")
    ig_steps: int = _opt(32, "Integration steps of --saliency ig.")
    min_tissue: float = _opt(0.5, "Score tiles with at least this tissue fraction.")
    slide_mpp: float | None = _opt(None, "Override the slide's level-0 µm/px (score: for slides whose file has none; "
                                         "a manifest 'mpp' wins).")
    record_series_uid: bool = _opt(False, "Record a DICOM slide's Series Instance UID in result.json "
                                          "(slide.dicom_series_uid), to find the slide in the PACS again; off by "
                                          "default, as the UID can lead back to the patient's study.")
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N.")
    amp: str = _opt("auto", "Autocast: auto (bf16 on CPUs that have it, fp16 on CUDA), bf16, fp16 or off.")
    runtime: str = _opt("torch", "torch (a checkpoint) or onnxruntime (an ONNX export: CPU, fp32, no saliency).")
    vessels: str = _opt("auto", "Vessel analysis: 'auto' (the segmenter shipped in the model folder's vessels/, as the "
                                "demo model has; skipped without one), a segmenter folder from 'train-vessels', or "
                                "'none'.")
    vessel_classifier: str = _opt("auto", "Per-vessel classifier: 'auto' (the one in the segmenter's classifier/ "
                                          "folder, as the demo has), a folder from 'train-vessel-classifier', or "
                                          "'none' (vessels then get their tiles' highest tile-model probability).")
    artifact_classifier: str = _opt("auto", "Calcium-artifact classifier: 'auto' (the one in the segmenter's "
                                            "artifact_classifier/ folder, as the demo has), a folder from "
                                            "'train-vessel-classifier' with judge_artifacts, or 'none'. It flags "
                                            "vessels where calcium was lost in sectioning (holes, tears, chatter).")
    sampling: str | None = _opt(None, "Where slide probabilities come from: 'grid' (the tissue grid's tiles), "
                                      "'vessels' (the detected vessels: the vessel classifier's slide map, or tiles "
                                      "centred on them) or 'both' (grid and vessel tiles); default: 'vessels' with a "
                                      "vessel classifier, else as the model was trained (its card).")
    min_fat_vessels: int = _opt(3, "Small vessels in subcutaneous fat needed to judge the CUA pattern; fewer and the "
                                   "call is marked insufficient_sampling.")

    def __post_init__(self) -> None:
        # imported here, not at the top: calciscope.model imports torch, and the CLI reads this module when it starts
        from calciscope.model.aggregate import METHODS as AGGREGATIONS
        from calciscope.model.precision import check_device

        if self.runtime not in RUNTIMES:
            raise CalciscopeError(f"unknown runtime {self.runtime!r}; choose one of: {', '.join(RUNTIMES)}")
        onnx = self.runtime == "onnxruntime"
        if self.saliency is None:
            self.saliency = "none" if onnx else "guided-gradcam"
        checks = [
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (self.workers >= 0, f"workers must be 0 or more, got {self.workers}"),
            (self.top_k >= 0, f"top-k must be 0 or more, got {self.top_k}"),
            (self.aggregation is None or self.aggregation in AGGREGATIONS,
             f"unknown aggregation {self.aggregation!r}; choose one of: {', '.join(AGGREGATIONS)}"),
            (self.saliency in SALIENCY_METHODS,
             f"unknown saliency {self.saliency!r}; choose one of: {', '.join(SALIENCY_METHODS)}"),
            (0 <= self.min_tissue <= 1, f"min tissue must be within [0, 1], got {self.min_tissue}"),
            (not (onnx and self.saliency != "none"),
             f"saliency {self.saliency!r} needs gradients, which the onnxruntime runtime does not compute; use "
             f"saliency 'none' with it, or the torch runtime"),
            (not (onnx and self.device not in ("auto", "cpu")),
             f"device {self.device!r}: the onnxruntime runtime runs on the CPU; use the torch runtime for "
             f"{self.device}"),
            (self.sampling is None or self.sampling in SAMPLINGS,
             f"unknown sampling {self.sampling!r}; choose one of: {', '.join(SAMPLINGS)}"),
            (self.min_fat_vessels >= 0, f"min fat vessels must be 0 or more, got {self.min_fat_vessels}"),
            (not (onnx and self.amp not in ("auto", "off")), f"amp {self.amp!r}: the onnxruntime runtime computes in fp32"),
            (self.amp in ("auto", "bf16", "fp16", "off"), f"amp must be auto, bf16, fp16 or off, got {self.amp!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise CalciscopeError(message)
        check_device(self.device)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> PredictConfig:
        """A config file's settings (unknown keys and wrong types are one line naming the file), then ``overrides``."""
        path = Path(path)
        return from_dict(cls, {**read_yaml_mapping(path), **(overrides or {})}, str(path))


def cli_fields(exclude: tuple[str, ...] = ()) -> list:
    """The PredictConfig fields a command offers as options, in declaration order."""
    return [f for f in fields(PredictConfig) if f.name not in exclude]
