"""Checkpoint I/O: a directory holding ``model.safetensors`` (weights) and ``model.json`` (the card).

Nothing is ever unpickled. Loading rebuilds the model from the card through ``create_model`` and
checks, before trusting the weights: the sha256 recorded in the card, the labels/backbone/head stored
in the safetensors metadata, the key set and every tensor shape. Each failure is one CheckpointError
line that names the offending file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from calciscope.errors import CalciscopeError, CheckpointError
from calciscope.io import sha256_file, write_bytes_atomic
from calciscope.model.card import ModelCard
from calciscope.model.heads import create_model

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"


def _weights_metadata(labels: list[str], backbone: str, head: str) -> dict[str, str]:
    return {"format": "pt", "calciscope_labels": json.dumps(labels), "calciscope_backbone": backbone,
            "calciscope_head": head}


def save_checkpoint(directory: str | Path, model: nn.Module, card: ModelCard) -> Path:
    """Write ``model.safetensors`` then ``model.json`` into ``directory`` (created if needed); returns it.

    Each file is written under a temporary name and renamed into place. The card written is ``card`` with
    ``weights_sha256``, ``embed_dim`` and ``head_config`` filled in from the model (``card`` is not modified).
    The card's labels, backbone and head must be the model's.
    """
    from safetensors.torch import save

    directory = Path(directory)
    for attr, card_value in (("labels", card.labels), ("backbone_name", card.backbone), ("head_kind", card.head)):
        model_value = getattr(model, attr, None)
        if model_value != card_value:
            raise CalciscopeError(
                f"card does not describe the model: card has {card_value!r}, model {attr} is {model_value!r}"
            )
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    blob = save(tensors, metadata=_weights_metadata(card.labels, card.backbone, card.head))
    write_bytes_atomic(directory / WEIGHTS_FILE, blob)
    final = dataclasses.replace(
        card,
        weights_sha256=hashlib.sha256(blob).hexdigest(),
        embed_dim=model.feature_dim,
        head_config=dict(model.head_config),
        labels=list(card.labels),
    )
    write_bytes_atomic(directory / CARD_FILE, final.to_json().encode("utf-8"))
    return directory


def _resolve(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "checkpoint not found (expected a directory with model.json and model.safetensors)")
    card_path = path / CARD_FILE if path.is_dir() else path
    return card_path, card_path.with_name(WEIGHTS_FILE)


def load_card(path: str | Path) -> ModelCard:
    """The validated card of a checkpoint (directory or its model.json), without loading weights."""
    return ModelCard.from_json(_resolve(path)[0])


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> tuple[nn.Module, ModelCard]:
    """Rebuild the model described by the card and load its verified weights; returns (model in eval mode, card)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    card_path, weights_path = _resolve(path)
    card = ModelCard.from_json(card_path)
    if not weights_path.is_file():
        raise CheckpointError(weights_path, "weights file missing (model.json has no model.safetensors beside it)")
    if card.weights_sha256:
        actual = sha256_file(weights_path)
        if actual != card.weights_sha256:
            raise CheckpointError(
                weights_path,
                f"sha256 {actual[:12]}… does not match model.json's weights_sha256 {card.weights_sha256[:12]}… "
                "(file truncated, corrupted or replaced)",
            )
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(weights_path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for bad headers / short files
        raise CheckpointError(weights_path, f"not a readable safetensors file ({type(exc).__name__}: {exc})") from None

    expected = _weights_metadata(card.labels, card.backbone, card.head)
    for key in ("calciscope_labels", "calciscope_backbone", "calciscope_head"):
        if key in metadata and metadata[key] != expected[key]:
            name = key.removeprefix("calciscope_")
            raise CheckpointError(card_path, f"card says {name} = {expected[key]}, but the weights "
                                             f"were saved with {name} = {metadata[key]}")

    try:
        model = create_model(card.backbone, card.labels, head=card.head, **card.head_config)
    except (CalciscopeError, TypeError, ValueError) as exc:
        raise CheckpointError(card_path, f"cannot build the model the card describes ({exc})") from None
    if card.embed_dim is not None and card.embed_dim != model.feature_dim:
        raise CheckpointError(card_path, f"embed_dim {card.embed_dim} does not match backbone {card.backbone} "
                                         f"(feature dim {model.feature_dim})")

    want = model.state_dict()
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or unexpected:
        raise CheckpointError(weights_path, f"weights do not fit the card's {card.backbone}/{card.head} model "
                                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key, tensor in want.items():
        if state[key].shape != tensor.shape:
            raise CheckpointError(
                weights_path,
                f"tensor '{key}' has shape {tuple(state[key].shape)} but model.json ({len(card.labels)} labels, "
                f"{card.backbone}/{card.head}) needs {tuple(tensor.shape)}",
            )
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval(), card
