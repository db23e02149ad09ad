"""Backbones, heads, the card base and checkpoint I/O (one path for every network).

    model = create_model("resnet18", labels, weights="imagenet", head="tile")
    save_checkpoint("runs/x/best", model, card);  model, card = load_checkpoint("runs/x/best")
    save_net(folder, segmenter, SegmenterCard(...));  model, card = load_net(SegmenterCard, folder)
"""

from calciscope.model.backbones import BACKBONES, IMAGENET_MEAN, IMAGENET_STD, BackboneSpec, get_backbone_spec
from calciscope.model.card import DEFAULT_INTENDED_USE, SYNTHETIC_DEMO_NOTICE, CardBase, ModelCard
from calciscope.model.checkpoint import (
    CARD_FILE,
    WEIGHTS_FILE,
    load_card,
    load_checkpoint,
    load_net,
    read_card,
    save_checkpoint,
    save_net,
    update_card,
)
from calciscope.model.heads import GatedAttentionMIL, MILSlideModel, MultiLabelTileModel, create_model

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "CARD_FILE",
    "CardBase",
    "DEFAULT_INTENDED_USE",
    "GatedAttentionMIL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MILSlideModel",
    "ModelCard",
    "MultiLabelTileModel",
    "SYNTHETIC_DEMO_NOTICE",
    "WEIGHTS_FILE",
    "create_model",
    "get_backbone_spec",
    "load_card",
    "load_checkpoint",
    "load_net",
    "read_card",
    "save_checkpoint",
    "save_net",
    "update_card",
]
