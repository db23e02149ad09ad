"""Heads on a backbone, and ``create_model``, the one factory for every model calciscope uses.

- ``MultiLabelTileModel``: tile -> one logit per finding (multi-label: sigmoid per finding, never softmax).
- ``GatedAttentionMIL``: bag of tile embeddings -> slide logits + attention weights per tile
  (Ilse, Tomczak & Welling, "Attention-based Deep Multiple Instance Learning", ICML 2018, gated variant).
- ``MILSlideModel``: a backbone that embeds tiles plus a ``GatedAttentionMIL`` that pools them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from calciscope.errors import CalciscopeError
from calciscope.model.backbones import build_backbone, get_backbone_spec

HEADS = ("tile", "mil")
# encoder_weights: a foundation encoder's local weights (model.encoders; not in the checkpoint, named by the card)
HEAD_CONFIG_KEYS = ("dropout", "mil_hidden_dim", "mil_multi_branch", "encoder_weights", "tile_hidden_dim")


class MultiLabelTileModel(nn.Module):
    """backbone (global pool included) -> dropout -> Linear(feature_dim, n_labels), or with ``hidden_dim`` an MLP
    head Linear -> ReLU -> dropout -> Linear (e.g. on a frozen foundation encoder)."""

    head_kind = "tile"

    def __init__(self, backbone: str, labels: Sequence[str], *, weights: str | Path | None = None,
                 dropout: float = 0.0, encoder_weights: str | None = None, hidden_dim: int = 0):
        super().__init__()
        spec = get_backbone_spec(backbone)
        self.backbone_name = backbone
        self.labels = list(labels)
        self.feature_dim = spec.feature_dim
        self.gradcam_layer = f"backbone.{spec.gradcam_layer}"
        self.head_config = {"dropout": float(dropout), **_encoder_config(encoder_weights)}
        if hidden_dim:
            self.head_config["tile_hidden_dim"] = int(hidden_dim)
        self.backbone = build_backbone(backbone, encoder_weights or weights)
        self.dropout = nn.Dropout(dropout)
        n = len(self.labels)
        self.head = (nn.Sequential(nn.Linear(spec.feature_dim, hidden_dim), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                   nn.Linear(hidden_dim, n)) if hidden_dim else nn.Linear(spec.feature_dim, n))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Tiles (N, 3, H, W) -> embeddings (N, D)."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tiles (N, 3, H, W) -> logits (N, L), one per finding in ``self.labels`` order; embeddings (N, D) already
        computed by this backbone (a frozen encoder's cache) go straight to the head."""
        return self.head(self.dropout(x if x.dim() == 2 else self.embed(x)))


class GatedAttentionMIL(nn.Module):
    """Gated attention pooling over a bag of tile embeddings (Ilse et al. 2018).

    h_i = ReLU(W_f x_i);  a_i = w^T (tanh(V h_i) * sigmoid(U h_i));  A = softmax_i(a_i);  z = sum_i A_i h_i.
    With ``multi_branch`` each label has its own attention branch w_l and its own slide embedding z_l
    (a thrombus and a calcified media need not sit in the same tiles); otherwise one branch is shared.

    forward(x (N, D) or (B, N, D), mask (N,) / (B, N) bool, True = real tile) returns
    logits (L,) / (B, L) and attention (N, L) / (B, N, L): per label, it sums to 1 over the real tiles
    and is 0 at masked positions (a shared branch is repeated for every label). A bag with no real
    tile gets attention 0 everywhere and the logits of an empty embedding.
    """

    def __init__(self, in_dim: int, n_labels: int, *, hidden_dim: int = 128, attn_dim: int | None = None,
                 multi_branch: bool = True, dropout: float = 0.0):
        super().__init__()
        attn_dim = attn_dim or hidden_dim
        self.n_labels = n_labels
        self.multi_branch = multi_branch
        n_branches = n_labels if multi_branch else 1
        self.feature = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.attention_v = nn.Linear(hidden_dim, attn_dim)
        self.attention_u = nn.Linear(hidden_dim, attn_dim)
        self.attention_w = nn.Linear(attn_dim, n_branches)
        self.classifier = nn.Linear(hidden_dim, n_labels)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        single = x.dim() == 2
        if single:
            x = x.unsqueeze(0)
            mask = None if mask is None else mask.unsqueeze(0)
        if x.dim() != 3:
            raise ValueError(f"expected embeddings (N, D) or (B, N, D), got shape {tuple(x.shape)}")
        h = self.feature(x)  # (B, N, H)
        scores = self.attention_w(torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h)))  # (B, N, K)
        scores = scores.float()
        if mask is not None:
            scores = scores.masked_fill(~mask.bool().unsqueeze(-1), float("-inf"))
        attention = torch.softmax(scores, dim=1).nan_to_num(0.0)  # all-masked bag: NaN -> 0
        pooled = torch.einsum("bnk,bnh->bkh", attention.to(h.dtype), h)  # (B, K, H)
        if self.multi_branch:  # label l reads its own pooled embedding
            logits = (pooled * self.classifier.weight.to(pooled.dtype)).sum(-1) + self.classifier.bias.to(pooled.dtype)
        else:
            logits = self.classifier(pooled[:, 0])
            attention = attention.expand(-1, -1, self.n_labels)
        if single:
            return logits[0], attention[0]
        return logits, attention


class MILSlideModel(nn.Module):
    """Slide model: backbone embeds tiles; ``GatedAttentionMIL`` pools a bag into slide logits.

    Slides hold thousands of tiles, so the usual path is ``embed`` in batches then ``aggregate``;
    ``forward`` does both for a bag small enough to fit at once.
    """

    head_kind = "mil"

    def __init__(self, backbone: str, labels: Sequence[str], *, weights: str | Path | None = None,
                 dropout: float = 0.0, hidden_dim: int = 128, multi_branch: bool = True,
                 encoder_weights: str | None = None):
        super().__init__()
        spec = get_backbone_spec(backbone)
        self.backbone_name = backbone
        self.labels = list(labels)
        self.feature_dim = spec.feature_dim
        self.gradcam_layer = f"backbone.{spec.gradcam_layer}"
        self.head_config = {"dropout": float(dropout), "mil_hidden_dim": int(hidden_dim),
                            "mil_multi_branch": bool(multi_branch), **_encoder_config(encoder_weights)}
        self.backbone = build_backbone(backbone, encoder_weights or weights)
        self.mil = GatedAttentionMIL(spec.feature_dim, len(self.labels), hidden_dim=hidden_dim,
                                     multi_branch=multi_branch, dropout=dropout)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Tiles (N, 3, H, W) -> embeddings (N, D)."""
        return self.backbone(x)

    def aggregate(self, embeddings: torch.Tensor,
                  mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (N, D) / (B, N, D) -> slide logits (L,) / (B, L), attention (N, L) / (B, N, L)."""
        return self.mil(embeddings, mask)

    def forward(self, tiles: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A bag of tiles (N, 3, H, W) or bags (B, N, 3, H, W) -> (slide logits, attention).

        Embeddings already computed ((N, D) or (B, N, D), e.g. from the embedding cache) go straight to the head.
        """
        if tiles.dim() <= 3:
            return self.aggregate(tiles, mask)
        if tiles.dim() == 5:
            b, n = tiles.shape[:2]
            emb = self.embed(tiles.flatten(0, 1)).unflatten(0, (b, n))
        else:
            emb = self.embed(tiles)
        return self.aggregate(emb, mask)


def _encoder_config(encoder_weights: str | Path | None) -> dict:
    """The head_config entry that names a foundation encoder's weights file (absolute), if any."""
    return {"encoder_weights": str(Path(encoder_weights).expanduser().resolve())} if encoder_weights else {}


def create_model(
    backbone: str,
    labels: Sequence[str],
    *,
    weights: str | Path | None = None,
    head: Literal["tile", "mil"] = "tile",
    dropout: float = 0.0,
    mil_hidden_dim: int = 128,
    mil_multi_branch: bool = True,
    encoder_weights: str | None = None,
    tile_hidden_dim: int = 0,
) -> MultiLabelTileModel | MILSlideModel:
    """Build a model by backbone name (see ``BACKBONES``) with one output per label.

    weights: None (random init), a local .pth/.pt/.safetensors file with that backbone's ImageNet
    weights, or "imagenet" (torchvision's file in ``torch.hub.get_dir()/checkpoints/``; never downloaded).
    encoder_weights: a foundation encoder's (``model.encoders``) publisher file or folder; it goes into the
    ``head_config`` (the card), not into the checkpoint. tile_hidden_dim > 0: an MLP tile head.
    head: "tile" (multi-label tile classifier) or "mil" (attention-MIL slide model).
    """
    labels = list(labels)
    if not labels or not all(isinstance(l, str) and l for l in labels) or len(set(labels)) != len(labels):
        raise CalciscopeError(f"labels must be distinct non-empty strings, got {labels!r}")
    if head == "tile":
        return MultiLabelTileModel(backbone, labels, weights=weights, dropout=dropout,
                                   encoder_weights=encoder_weights, hidden_dim=tile_hidden_dim)
    if head == "mil":
        return MILSlideModel(backbone, labels, weights=weights, dropout=dropout, hidden_dim=mil_hidden_dim,
                             multi_branch=mil_multi_branch, encoder_weights=encoder_weights)
    raise CalciscopeError(f"unknown head {head!r}; choose one of: {', '.join(HEADS)}")
