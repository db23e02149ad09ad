"""Checkpoint I/O, the one path for every network: a folder holding ``<name>.safetensors`` (weights) and
``<name>.json`` (its card, a :class:`~calciscope.model.card.CardBase`).

Nothing is ever unpickled. Saving writes the weights, then the card with the weights' sha256, each through a
temporary name and a rename. Loading reads the card strictly (``CardBase.from_json``), then checks, before trusting
the weights: the sha256 recorded in the card, the metadata stored in the safetensors header against the card, and
the tensor names and shapes against the network the card describes (``card.build()``). Each failure is one
CheckpointError line that names the offending file.

The tile model's folder is ``model.safetensors`` + ``model.json`` (:func:`save_checkpoint`, :func:`load_checkpoint`,
:func:`load_card`); the vessel networks use the same functions through ``model.segmenter`` and
``model.vessel_classifier``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from calciscope.errors import CalciscopeError, CheckpointError
from calciscope.io import sha256_file, write_bytes_atomic
from calciscope.model.card import CardBase, ModelCard

WEIGHTS_FILE = ModelCard.WEIGHTS_FILE
CARD_FILE = ModelCard.CARD_FILE

Card = TypeVar("Card", bound=CardBase)


def save_net(directory: str | Path, model: nn.Module, card: Card) -> Path:
    """Write ``card.WEIGHTS_FILE`` then ``card.CARD_FILE`` into ``directory`` (created if needed); returns it.

    The card written is ``card`` with the weights' sha256 and what it takes from the model (``card.fitted_to``)
    filled in; ``card`` itself is not modified.
    """
    directory = Path(directory)
    updates = card.fitted_to(model)  # refuses a model the card does not describe, before anything is written
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    blob = save(tensors, metadata={"format": "pt", **card.weights_metadata()})
    write_bytes_atomic(directory / card.WEIGHTS_FILE, blob)
    final = dataclasses.replace(card, **updates, weights_sha256=hashlib.sha256(blob).hexdigest())
    write_card(directory / card.CARD_FILE, final)
    return directory


def write_card(path: str | Path, card: CardBase) -> Path:
    """Write a card as strict JSON, atomically (e.g. after changing a field that does not touch the weights)."""
    return write_bytes_atomic(path, card.to_json().encode("utf-8"))


def card_paths(card_cls: type[CardBase], path: str | Path) -> tuple[Path, Path]:
    """(card file, weights file) of a checkpoint given as its folder or its card file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, f"checkpoint not found (expected a directory with {card_cls.CARD_FILE} and "
                                    f"{card_cls.WEIGHTS_FILE})")
    card_path = path / card_cls.CARD_FILE if path.is_dir() else path
    return card_path, card_path.with_name(card_cls.WEIGHTS_FILE)


def read_card(card_cls: type[Card], path: str | Path) -> Card:
    """The validated card of a checkpoint (its folder or its card file), without loading the weights."""
    return card_cls.from_json(card_paths(card_cls, path)[0])


def update_card(card_cls: type[Card], path: str | Path, **changes: Any) -> Card:
    """Change fields of a checkpoint's card that do not touch the weights (thresholds, calibration, metrics ...):
    the checkpoint must load before and after; returns the new card."""
    card_path, _ = card_paths(card_cls, path)
    _, card = load_net(card_cls, path)
    new = dataclasses.replace(card, **changes)
    write_card(card_path, new)
    load_net(card_cls, path)
    return new


def load_net(card_cls: type[Card], path: str | Path, *,
             map_location: str | torch.device = "cpu") -> tuple[nn.Module, Card]:
    """Rebuild the network a card describes and load its verified weights; returns (model in eval mode, card)."""
    card_path, weights_path = card_paths(card_cls, path)
    card = card_cls.from_json(card_path)
    if not weights_path.is_file():
        raise CheckpointError(weights_path, f"weights file missing ({card_path.name} has no {weights_path.name} "
                                            f"beside it)")
    if card.weights_sha256:
        actual = sha256_file(weights_path)
        if actual != card.weights_sha256:
            raise CheckpointError(
                weights_path,
                f"sha256 {actual[:12]}… does not match {card_path.name}'s weights_sha256 {card.weights_sha256[:12]}… "
                "(file truncated, corrupted or replaced)",
            )
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(weights_path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for bad headers / short files
        raise CheckpointError(weights_path, f"not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    for key, expected in card.weights_metadata().items():
        if key in metadata and metadata[key] != expected:
            name = key.removeprefix("calciscope_")
            raise CheckpointError(card_path, f"card says {name} = {expected}, but the weights "
                                             f"were saved with {name} = {metadata[key]}")
    try:
        model = card.build()
    except (CalciscopeError, TypeError, ValueError) as exc:
        raise CheckpointError(card_path, f"cannot build the model the card describes ({exc})") from None
    problem = card.check_built(model)
    if problem:
        raise CheckpointError(card_path, problem)
    _check_tensors(state, model.state_dict(), weights_path, card_path.name, card.describe())
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval(), card


def _check_tensors(state: dict[str, torch.Tensor], want: dict[str, torch.Tensor], weights_path: Path,
                   card_name: str, described: str) -> None:
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or unexpected:
        raise CheckpointError(weights_path, f"tensors do not match the architecture its {card_name} describes "
                                            f"({described}: missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key, tensor in want.items():
        if state[key].shape != tensor.shape:
            raise CheckpointError(
                weights_path,
                f"tensors do not match the architecture its {card_name} describes: '{key}' has shape "
                f"{tuple(state[key].shape)} but {described} needs {tuple(tensor.shape)}",
            )


def save_checkpoint(directory: str | Path, model: nn.Module, card: ModelCard) -> Path:
    """Write a tile model's ``model.safetensors`` then ``model.json`` into ``directory``; returns it.

    The card written is ``card`` with ``weights_sha256``, ``embed_dim`` and ``head_config`` filled in from the
    model (``card`` is not modified). The card's labels, backbone and head must be the model's.
    """
    return save_net(directory, model, card)


def load_card(path: str | Path) -> ModelCard:
    """The validated card of a tile-model checkpoint (directory or its model.json), without loading weights."""
    return read_card(ModelCard, path)


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> tuple[nn.Module, ModelCard]:
    """Rebuild the tile model described by the card and load its verified weights; returns (model in eval mode,
    card)."""
    return load_net(ModelCard, path, map_location=map_location)
