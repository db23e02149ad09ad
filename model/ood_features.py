"""The features a network's OOD reference (``model.ood``) is fit on and scored with, taken by a forward hook while
the network runs, so checking a slide costs no extra forward pass and changes no output:

- tile model: the backbone's output, the embedding the head reads (one row per tile);
- vessel segmenter: the bottleneck (the deepest encoder block) averaged over each window's centre, the part the
  stitched maps keep (one row per window, in the order the windows run);
- vessel and calcium-artifact classifiers: the pooled convolutional features, before the vessel's calibre and
  compartment join them (one row per vessel crop).

Training (``training.ood_reference``) and inference (``inference.ood``) take them through the same taps.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from calciscope.model.card import CardBase, ModelCard
from calciscope.model.segmenter import MARGIN_PX, SegmenterCard
from calciscope.model.vessel_classifier import ClassifierCard

FEATURES = {
    ModelCard.KIND: "tile embedding (the backbone's output, before the head)",
    SegmenterCard.KIND: "U-Net bottleneck, averaged over each window's centre",
    ClassifierCard.KIND: "pooled convolutional features of the vessel crop",
}
UNITS = {ModelCard.KIND: "tile", SegmenterCard.KIND: "window", ClassifierCard.KIND: "vessel"}


class FeatureTap:
    """Collects one row of features per input of ``network`` on each forward pass (a forward hook on the module that
    computes them); ``take()`` returns the rows since the last ``clear()``. With ``outputs``, the network's own
    outputs are kept too (``take_outputs()``), so rows can be matched to what the network said about them.

    ``network`` is the module that runs: the tile model's backbone (its inference copy, BatchNorm folded, when that is
    what runs), the segmenter or the classifier, folded or not (the hook sits on a leaf module, which folding keeps).
    """

    def __init__(self, network: nn.Module, card: CardBase, *, outputs: bool = False):
        if card.KIND not in FEATURES:
            raise ValueError(f"no OOD features are defined for a {card.KIND}")
        self.card = card
        self._rows: list[np.ndarray] = []
        self._outputs: list[np.ndarray] = []
        self._margin = 0
        if isinstance(card, SegmenterCard):
            module = _last_leaf(network, f"down.{len(card.widths) - 1}")
            self._margin = MARGIN_PX // 2 ** (len(card.widths) - 1)
        elif isinstance(card, ClassifierCard):
            module = _last_leaf(network, "features")
        else:
            module = network
        self._handles = [module.register_forward_hook(self._keep)]
        if outputs:
            self._handles.append(network.register_forward_hook(self._keep_output))

    def _keep(self, module, inputs, output) -> None:
        x = output.detach()
        if x.ndim == 4:
            m = self._margin
            x = x[:, :, m : x.shape[2] - m, m : x.shape[3] - m] if m and min(x.shape[2:]) > 2 * m else x
            x = x.float().mean(dim=(2, 3))
        self._rows.append(x.float().cpu().numpy().reshape(len(x), -1))

    def _keep_output(self, module, inputs, output) -> None:
        self._outputs.append(output.detach().float().cpu().numpy())

    def clear(self) -> None:
        self._rows, self._outputs = [], []

    def take(self) -> np.ndarray:
        """(N, D) float32 rows since the last ``clear()`` (D from the first row; (0, 0) when none)."""
        return np.concatenate(self._rows).astype(np.float32) if self._rows else np.zeros((0, 0), np.float32)

    def take_outputs(self) -> np.ndarray:
        return np.concatenate(self._outputs) if self._outputs else np.zeros((0, 0), np.float32)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _last_leaf(network: nn.Module, prefix: str) -> nn.Module:
    """The last leaf module under ``prefix`` (in a Sequential block, the one whose output is the block's): hooks on a
    leaf fire in the network and in its torch.fx-folded copy alike."""
    leaves = [m for name, m in network.named_modules()
              if (name == prefix or name.startswith(prefix + ".")) and not list(m.children())]
    if not leaves:
        raise ValueError(f"the network has no module {prefix!r} to take OOD features from")
    return leaves[-1]


@torch.inference_mode()
def pooled_features(network: nn.Module, card: CardBase, run) -> np.ndarray:
    """The features ``run()`` (a function that calls ``network``) computes, as (N, D) rows."""
    tap = FeatureTap(network, card)
    try:
        run()
        return tap.take()
    finally:
        tap.close()
