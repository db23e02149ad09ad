"""Saving and loading the vessel networks (segmenter, classifier): ``<name>.safetensors`` plus a JSON card that
holds the weights' sha256. Never pickled; loading checks the files, the sha256, the tensor names and shapes first."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, TypeVar

from torch import nn

from calciscope.errors import CheckpointError
from calciscope.io import sha256_file, write_bytes_atomic

Card = TypeVar("Card")


def read_card(cls: type[Card], path: Path, what: str, schema_version: int) -> Card:
    """A card dataclass from its JSON file: an object with known keys only, of a schema this calciscope reads."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}")
        card = cls(**data)
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(path, f"not a {what} card: {exc}") from None
    if card.schema_version > schema_version:
        raise CheckpointError(path, f"schema version {card.schema_version} is newer than this calciscope reads")
    return card


def save_net(directory: str | Path, weights_file: str, card_file: str, model: nn.Module, card: Any,
             metadata: dict[str, str], **card_updates: Any) -> Path:
    """Write the weights, then the card (``card_updates`` and the weights' sha256 filled in) into ``directory``."""
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    blob = save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                metadata={"format": "pt", **metadata})
    write_bytes_atomic(directory / weights_file, blob)
    card = type(card)(**{**asdict(card), **card_updates, "weights_sha256": hashlib.sha256(blob).hexdigest()})
    write_bytes_atomic(directory / card_file, (json.dumps(asdict(card), indent=2) + "\n").encode("utf-8"))
    return directory


def load_net(directory: str | Path, weights_file: str, card_file: str, read_card: Callable[[Path], Card],
             build: Callable[[Card], nn.Module], what: str) -> tuple[nn.Module, Card]:
    """(model in eval mode on the CPU, card) from ``directory``; ``what`` names the kind of folder in errors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    weights, card_path = directory / weights_file, directory / card_file
    for p in (card_path, weights):
        if not p.is_file():
            raise CheckpointError(p, f"missing: a {what} folder holds {weights_file} and {card_file}")
    card = read_card(card_path)
    if getattr(card, "weights_sha256", "") and sha256_file(weights) != card.weights_sha256:
        raise CheckpointError(weights, f"sha256 differs from the one in {card_file} (corrupt or replaced file)")
    model = build(card)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(weights, f"unreadable safetensors file: {exc}") from None
    expected = model.state_dict()
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
        raise CheckpointError(weights, f"tensors do not match the architecture its {card_file} describes")
    model.load_state_dict(state)
    return model.eval(), card
