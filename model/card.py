"""Model cards: one base for every network calciscope saves, and the tile model's card.

A card is the JSON file that travels with a network's weights (``<name>.safetensors`` + ``<name>.json``): like timm's
``pretrained_cfg``, everything inference must know (input size and scale, mean/std, output names, thresholds,
calibration) goes with the weights and is never guessed. :class:`CardBase` holds what every card shares (schema
version, name, version, weights sha256, creation date, intended use, the synthetic-demo flag, the library version,
training provenance and metrics, the out-of-distribution reference of ``model.ood``) and reads a card strictly:
unknown keys refused, every field's type checked
(``calciscope.io.check_type`` plus the card's own checks), the schema version checked, each failure one
:class:`CheckpointError` line naming the file. A card kind names its files and rebuilds its network through
``build()``; saving and loading weights with their card is ``calciscope.model.checkpoint``.

Kinds: :class:`ModelCard` (tile CNN / attention-MIL, ``model.json``), ``SegmenterCard`` (vessel U-Net,
``segmenter.json``) and ``ClassifierCard`` (vessel and calcium-artifact classifiers, ``classifier.json``).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar

from torch import nn

from calciscope._version import __version__
from calciscope.errors import CalciscopeError, CheckpointError
from calciscope.io import check_type
from calciscope.model.backbones import BACKBONES, IMAGENET_MEAN, IMAGENET_STD
from calciscope.model.heads import HEAD_CONFIG_KEYS, HEADS, create_model
from calciscope.model.ood import OODReference, reference_problem

SCHEMA_VERSION = 1  # the tile model's card (ModelCard.SCHEMA_VERSION)
SYNTHETIC_DEMO_NOTICE = "synthetic demo, not for clinical use"
DEFAULT_INTENDED_USE = (
    "Research and decision support only: scores H&E slides for the histologic pattern of calciphylaxis "
    "for review by a pathologist. Not a diagnosis and not a medical device."
)


def _today() -> str:
    return _dt.datetime.now(_dt.timezone.utc).date().isoformat()


@dataclass(kw_only=True)
class CardBase:
    """The fields every card shares; a card kind subclasses it (a dataclass) and sets the class settings below.

    ``created`` is an ISO date ("" in cards written before the field existed: unknown). ``training`` says how the
    network was made (data, recipe, seed), ``metrics`` how it scored. A card marked ``synthetic_demo`` says so in
    its ``intended_use``. Fields missing from a card file take their defaults (older cards lack some), and a card
    read from an older schema is upgraded to the current one (written back, it says so).
    """

    KIND: ClassVar[str] = "card"  # what the network is, in messages
    WEIGHTS_FILE: ClassVar[str] = ""
    CARD_FILE: ClassVar[str] = ""
    SCHEMA_VERSION: ClassVar[int] = 1  # the newest schema this calciscope reads (and writes) for the kind
    # field name -> check returning None or what the value must be (on top of the type its annotation gives)
    FIELD_CHECKS: ClassVar[dict[str, Callable[[Any], str | None]]] = {}

    schema_version: int = 0  # 0: the kind's SCHEMA_VERSION
    name: str = ""
    version: str = "0.1.0"
    weights_sha256: str = ""
    created: str = field(default_factory=_today)
    intended_use: str = DEFAULT_INTENDED_USE
    synthetic_demo: bool = False
    calciscope_version: str = __version__
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    # what the network's training data looked like to it (model.ood.OODReference.to_dict()); {}: none
    ood_reference: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.schema_version = self.schema_version or self.SCHEMA_VERSION
        if self.synthetic_demo and SYNTHETIC_DEMO_NOTICE not in self.intended_use:
            self.intended_use = f"This model is a {SYNTHETIC_DEMO_NOTICE}. {self.intended_use}"

    # --- what a kind provides -------------------------------------------------------------------------------------
    def build(self) -> nn.Module:
        """The (untrained) network this card describes; its state dict is what the weights file must hold."""
        raise NotImplementedError

    def problem(self) -> str | None:
        """What is wrong with this card as a whole (fields that contradict each other), or None."""
        return None

    def weights_metadata(self) -> dict[str, str]:
        """Metadata stored in the safetensors header (``format: pt`` is added); checked against the card on load."""
        return {}

    def fitted_to(self, model: nn.Module) -> dict[str, Any]:
        """Fields to take from the network being saved (e.g. its widths); may refuse a network it does not describe
        with a CalciscopeError."""
        return {}

    def check_built(self, model: nn.Module) -> str | None:
        """What the built network contradicts in the card (beyond tensor names and shapes), or None."""
        return None

    def describe(self) -> str:
        """The architecture in a few words, for messages."""
        return self.KIND

    def ood(self) -> OODReference | None:
        """The card's out-of-distribution reference, or None when it has none."""
        return OODReference.from_dict(self.ood_reference) if self.ood_reference else None

    # --- reading and writing --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        """Strict JSON (NaN/inf metrics become null)."""
        return json.dumps(_finite_or_none(self.to_dict()), indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any, source: str | Path | None = None):
        """Validate a parsed card; any problem is a CheckpointError naming ``source`` and the field."""
        source = source if source is not None else cls.CARD_FILE

        def bad(reason: str) -> CheckpointError:
            return CheckpointError(source, f"not a valid {cls.KIND} card: {reason}")

        if not isinstance(data, dict):
            raise bad(f"expected a JSON object, got {type(data).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            hint = " (put custom metadata under 'extra')" if "extra" in known else ""
            raise bad(f"unknown keys {unknown}{hint}")
        required = ["schema_version", *(n for n, f in known.items()
                                        if f.default is MISSING and f.default_factory is MISSING)]
        missing = [k for k in required if k not in data]
        if missing:
            raise bad(f"missing field(s) {missing}")
        checks = {**_BASE_CHECKS, **cls.FIELD_CHECKS}
        hints = typing.get_type_hints(cls)
        values = {}
        for name, value in data.items():
            problem = checks[name](value) if name in checks else None
            if problem:
                raise bad(f"field '{name}' {problem}, got {value!r:.80}")
            try:
                values[name] = check_type(value, hints[name], f"field '{name}'")
            except CalciscopeError as exc:
                raise bad(str(exc)) from None
        if data["schema_version"] > cls.SCHEMA_VERSION:
            raise bad(f"schema_version {data['schema_version']} is newer than this calciscope reads "
                      f"({cls.SCHEMA_VERSION})")
        values.setdefault("created", "")  # a card from before the field: its date is unknown, not today
        values["schema_version"] = cls.SCHEMA_VERSION  # an older schema is read as the current one, defaults filled
        try:
            card = cls(**values)
            problem = card.problem()
        except (TypeError, ValueError) as exc:
            raise bad(str(exc)) from None
        if problem:
            raise bad(problem)
        return card

    @classmethod
    def from_json(cls, path: str | Path):
        """Read and validate a card file; a missing or unparsable file is a CheckpointError naming it."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(path, f"not a calciscope checkpoint ({path.name} not found; a {cls.KIND} folder "
                                        f"holds {cls.CARD_FILE} and {cls.WEIGHTS_FILE})")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(path, f"not a calciscope checkpoint ({path.name} is not valid JSON: {exc})") from None
        return cls.from_dict(data, source=path)


@dataclass
class ModelCard(CardBase):
    """The tile model's card, saved as ``model.json`` next to ``model.safetensors``.

    Units: ``tile_px`` is the tile edge in pixels at ``mpp`` micrometres per pixel.
    ``labels`` fixes the order of the model's outputs. ``thresholds`` / ``temperature`` are keyed by label
    (temperature defaults to 1.0). ``cua_rule`` is ``CUARule.to_dict()`` (empty = the default rule).
    ``head_config`` holds the head's shape-defining settings so ``create_model`` can rebuild it.
    ``slide_calibration`` is {label: {"a": slope > 0, "b": intercept}}: the logistic map from the aggregated tile
    probabilities to a calibrated slide probability (``model.aggregate.slide_probabilities``); empty (the
    default, and every card written before it existed) means the aggregate is used as it is.
    Anything not covered by a field goes in ``extra``; other unknown keys are rejected on load.
    """

    KIND: ClassVar[str] = "model"
    WEIGHTS_FILE: ClassVar[str] = "model.safetensors"
    CARD_FILE: ClassVar[str] = "model.json"
    SCHEMA_VERSION: ClassVar[int] = SCHEMA_VERSION

    name: str = field()  # required here (a bare annotation would inherit the base's default)
    labels: list[str]
    backbone: str
    tile_px: int
    mpp: float
    head: str = "tile"
    embed_dim: int | None = None
    head_config: dict[str, Any] = field(default_factory=dict)
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    thresholds: dict[str, float] = field(default_factory=dict)
    temperature: dict[str, float] = field(default_factory=dict)
    slide_calibration: dict[str, dict[str, float]] = field(default_factory=dict)
    cua_rule: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.labels = list(self.labels)
        self.temperature = {**{label: 1.0 for label in self.labels}, **self.temperature}
        self.slide_calibration = {label: {"a": float(v["a"]), "b": float(v["b"])}
                                  for label, v in self.slide_calibration.items()}

    def threshold(self, label: str, default: float = 0.5) -> float:
        """Decision threshold for ``label`` (``default`` when the card has none)."""
        return float(self.thresholds.get(label, default))

    def build(self) -> nn.Module:
        return create_model(self.backbone, self.labels, head=self.head, **self.head_config)

    def problem(self) -> str | None:
        labels = self.labels
        if len(set(labels)) != len(labels):
            return "field 'labels' has duplicates"
        if self.backbone not in BACKBONES:
            return f"field 'backbone' {self.backbone!r} is not one of {sorted(BACKBONES)}"
        if self.head not in HEADS:
            return f"field 'head' must be one of {list(HEADS)}, got {self.head!r}"
        for name in ("thresholds", "temperature", "slide_calibration"):
            stray = sorted(set(getattr(self, name)) - set(labels))
            if stray:
                return f"field '{name}' has keys {stray} that are not in labels"
        if any(t <= 0 for t in self.temperature.values()):
            return "field 'temperature' values must be > 0"
        stray = sorted(set(self.head_config) - set(HEAD_CONFIG_KEYS))
        if stray:
            return f"field 'head_config' has unknown keys {stray}; allowed: {list(HEAD_CONFIG_KEYS)}"
        return None

    def weights_metadata(self) -> dict[str, str]:
        return {"calciscope_labels": json.dumps(self.labels), "calciscope_backbone": self.backbone,
                "calciscope_head": self.head}

    def fitted_to(self, model: nn.Module) -> dict[str, Any]:
        for attr, card_value in (("labels", self.labels), ("backbone_name", self.backbone), ("head_kind", self.head)):
            model_value = getattr(model, attr, None)
            if model_value != card_value:
                raise CalciscopeError(
                    f"card does not describe the model: card has {card_value!r}, model {attr} is {model_value!r}"
                )
        return {"embed_dim": model.feature_dim, "head_config": dict(model.head_config), "labels": list(self.labels)}

    def check_built(self, model: nn.Module) -> str | None:
        if self.embed_dim is not None and self.embed_dim != model.feature_dim:
            return (f"embed_dim {self.embed_dim} does not match backbone {self.backbone} "
                    f"(feature dim {model.feature_dim})")
        return None

    def describe(self) -> str:
        return f"{len(self.labels)} labels, {self.backbone}/{self.head}"


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


def _iso_date_or_empty(v: Any) -> bool:
    return v == "" or _iso_date(v)


# every card's shared fields
_BASE_CHECKS = {
    "schema_version": _check(lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "name": _check(lambda v: isinstance(v, str) and v, "a non-empty string"),
    "version": _check(lambda v: isinstance(v, str), "a string"),
    "weights_sha256": _check(lambda v: isinstance(v, str), "a string"),
    "created": _check(_iso_date_or_empty, "an ISO date string"),
    "intended_use": _check(lambda v: isinstance(v, str) and v, "a non-empty string"),
    "synthetic_demo": _check(lambda v: isinstance(v, bool), "true or false"),
    "calciscope_version": _check(lambda v: isinstance(v, str), "a string"),
    "training": _check(lambda v: isinstance(v, dict), "an object"),
    "metrics": _check(lambda v: isinstance(v, dict), "an object"),
    "ood_reference": lambda v: (lambda problem: problem and f"is not an OOD reference ({problem})")(
        reference_problem(v)),
}

ModelCard.FIELD_CHECKS = {
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
    "extra": _check(lambda v: isinstance(v, dict), "an object"),
}
