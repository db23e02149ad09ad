"""The model card (``model.json``): everything inference must know about a checkpoint, never guessed.

Like timm's ``pretrained_cfg``, the preprocessing facts (tile size in pixels, mpp in µm/px, mean/std)
travel with the weights, together with the label order, decision thresholds, per-label temperatures,
the CUA-pattern rule, and how the model was trained and evaluated.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from calciscope._version import __version__
from calciscope.errors import CheckpointError
from calciscope.model.backbones import BACKBONES, IMAGENET_MEAN, IMAGENET_STD
from calciscope.model.heads import HEAD_CONFIG_KEYS, HEADS

SCHEMA_VERSION = 1
SYNTHETIC_DEMO_NOTICE = "synthetic demo, not for clinical use"
DEFAULT_INTENDED_USE = (
    "Research and decision support only: scores H&E slides for the histologic pattern of calciphylaxis "
    "for review by a pathologist. Not a diagnosis and not a medical device."
)


def _today() -> str:
    return _dt.datetime.now(_dt.timezone.utc).date().isoformat()


@dataclass
class ModelCard:
    """Metadata saved as ``model.json`` next to ``model.safetensors``.

    Units: ``tile_px`` is the tile edge in pixels at ``mpp`` micrometres per pixel.
    ``labels`` fixes the order of the model's outputs. ``thresholds`` / ``temperature`` are keyed by label
    (temperature defaults to 1.0). ``cua_rule`` is ``CUARule.to_dict()`` (empty = the default rule).
    ``head_config`` holds the head's shape-defining settings so ``create_model`` can rebuild it.
    ``slide_calibration`` is {label: {"a": slope > 0, "b": intercept}}: the logistic map from the aggregated tile
    probabilities to a calibrated slide probability (``inference.aggregate.slide_probabilities``); empty (the
    default, and every card written before it existed) means the aggregate is used as it is.
    Anything not covered by a field goes in ``extra``; other unknown keys are rejected on load.
    """

    name: str
    labels: list[str]
    backbone: str
    tile_px: int
    mpp: float
    head: str = "tile"
    version: str = "0.1.0"
    embed_dim: int | None = None
    head_config: dict[str, Any] = field(default_factory=dict)
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    thresholds: dict[str, float] = field(default_factory=dict)
    temperature: dict[str, float] = field(default_factory=dict)
    slide_calibration: dict[str, dict[str, float]] = field(default_factory=dict)
    cua_rule: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    calciscope_version: str = __version__
    created: str = field(default_factory=_today)
    intended_use: str = DEFAULT_INTENDED_USE
    synthetic_demo: bool = False
    weights_sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        self.labels = list(self.labels)
        self.temperature = {**{label: 1.0 for label in self.labels}, **self.temperature}
        if self.synthetic_demo and SYNTHETIC_DEMO_NOTICE not in self.intended_use:
            self.intended_use = f"This model is a {SYNTHETIC_DEMO_NOTICE}. {self.intended_use}"

    def threshold(self, label: str, default: float = 0.5) -> float:
        """Decision threshold for ``label`` (``default`` when the card has none)."""
        return float(self.thresholds.get(label, default))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        """Strict JSON (NaN/inf metrics become null)."""
        return json.dumps(_finite_or_none(self.to_dict()), indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any, source: str | Path = "model.json") -> ModelCard:
        """Validate a parsed ``model.json``; any problem is a CheckpointError naming ``source`` and the field."""

        def bad(reason: str) -> CheckpointError:
            return CheckpointError(source, f"not a valid model card: {reason}")

        if not isinstance(data, dict):
            raise bad(f"expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise bad(f"unknown field(s) {unknown} (put custom metadata under 'extra')")
        no_default = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        required = ["schema_version", *no_default]
        missing = [k for k in required if k not in data]
        if missing:
            raise bad(f"missing field(s) {missing}")
        for name, value in data.items():
            problem = _FIELD_CHECKS[name](value)
            if problem:
                raise bad(f"field '{name}' {problem}, got {value!r:.80}")
        if data["schema_version"] > SCHEMA_VERSION:
            raise bad(f"schema_version {data['schema_version']} is newer than this calciscope reads ({SCHEMA_VERSION})")
        labels = data["labels"]
        if len(set(labels)) != len(labels):
            raise bad("field 'labels' has duplicates")
        if data["backbone"] not in BACKBONES:
            raise bad(f"field 'backbone' {data['backbone']!r} is not one of {sorted(BACKBONES)}")
        if data.get("head", "tile") not in HEADS:
            raise bad(f"field 'head' must be one of {list(HEADS)}, got {data['head']!r}")
        for name in ("thresholds", "temperature"):
            stray = sorted(set(data.get(name, {})) - set(labels))
            if stray:
                raise bad(f"field '{name}' has keys {stray} that are not in labels")
        if any(t <= 0 for t in data.get("temperature", {}).values()):
            raise bad("field 'temperature' values must be > 0")
        stray = sorted(set(data.get("slide_calibration", {})) - set(labels))
        if stray:
            raise bad(f"field 'slide_calibration' has keys {stray} that are not in labels")
        stray = sorted(set(data.get("head_config", {})) - set(HEAD_CONFIG_KEYS))
        if stray:
            raise bad(f"field 'head_config' has unknown keys {stray}; allowed: {list(HEAD_CONFIG_KEYS)}")
        values = {k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
                  for k, v in data.items()}
        values["mpp"] = float(values["mpp"])
        values["slide_calibration"] = {label: {"a": float(v["a"]), "b": float(v["b"])}
                                       for label, v in values.get("slide_calibration", {}).items()}
        for name in ("mean", "std"):
            if name in values:
                values[name] = [float(v) for v in values[name]]
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> ModelCard:
        """Read and validate ``model.json``; a missing or unparsable file is a CheckpointError."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(path, "not a calciscope checkpoint (model.json not found)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(path, f"not a calciscope checkpoint (model.json is not valid JSON: {exc})") from None
        return cls.from_dict(data, source=path)


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check(pred, expected: str):
    return lambda v: None if pred(v) else f"must be {expected}"


def _iso_date(v: Any) -> bool:
    if not isinstance(v, str):
        return False
    try:
        _dt.datetime.fromisoformat(v)
    except ValueError:
        return False
    return True


_FIELD_CHECKS = {
    "schema_version": _check(lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "name": _check(lambda v: isinstance(v, str) and v, "a non-empty string"),
    "version": _check(lambda v: isinstance(v, str), "a string"),
    "labels": _check(lambda v: isinstance(v, list) and v and all(isinstance(s, str) and s for s in v),
                     "a non-empty list of strings"),
    "backbone": _check(lambda v: isinstance(v, str), "a string"),
    "head": _check(lambda v: isinstance(v, str), "a string"),
    "embed_dim": _check(lambda v: v is None or (_is_int(v) and v > 0), "a positive integer or null"),
    "head_config": _check(lambda v: isinstance(v, dict), "an object"),
    "tile_px": _check(lambda v: _is_int(v) and v > 0, "a positive integer (pixels)"),
    "mpp": _check(lambda v: _is_num(v) and v > 0, "a positive number (µm per pixel)"),
    "mean": _check(lambda v: isinstance(v, list) and len(v) == 3 and all(_is_num(x) for x in v), "a list of 3 numbers"),
    "std": _check(lambda v: isinstance(v, list) and len(v) == 3 and all(_is_num(x) and x > 0 for x in v),
                  "a list of 3 positive numbers"),
    "thresholds": _check(lambda v: isinstance(v, dict) and all(_is_num(x) and 0 <= x <= 1 for x in v.values()),
                         "an object of label -> number in [0, 1]"),
    "temperature": _check(lambda v: isinstance(v, dict) and all(_is_num(x) for x in v.values()),
                          "an object of label -> number"),
    "slide_calibration": _check(
        lambda v: isinstance(v, dict) and all(
            isinstance(p, dict) and set(p) == {"a", "b"} and _is_num(p["a"]) and p["a"] > 0 and _is_num(p["b"])
            for p in v.values()),
        'an object of label -> {"a": number > 0, "b": number}'),
    "cua_rule": _check(lambda v: isinstance(v, dict), "an object"),
    "training": _check(lambda v: isinstance(v, dict), "an object"),
    "metrics": _check(lambda v: isinstance(v, dict), "an object"),
    "calciscope_version": _check(lambda v: isinstance(v, str), "a string"),
    "created": _check(_iso_date, "an ISO date string"),
    "intended_use": _check(lambda v: isinstance(v, str) and v, "a non-empty string"),
    "synthetic_demo": _check(lambda v: isinstance(v, bool), "true or false"),
    "weights_sha256": _check(lambda v: isinstance(v, str), "a string"),
    "extra": _check(lambda v: isinstance(v, dict), "an object"),
}
