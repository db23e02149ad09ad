"""Tile scoring: the tile model loaded for inference, tiles streamed through it, top tiles and their saliency.

Tiles stream from DataLoader workers in batches (no slide is ever held in memory), or, with the vessel stage on, are
cut out of the segmenter's windows as they are decoded (``WindowTiles``); each tile's probability is
``sigmoid(logit / temperature)`` with the card's per-finding temperature. The forward pass runs in torch (a checkpoint
folder; BatchNorm folded into the convolutions, channels_last, bf16 autocast where the CPU has it) or in onnxruntime
on an ONNX export (``calciscope export``; CPU, fp32, no saliency: that needs gradients). An attention-MIL model gives
tile embeddings here; its attention head pools them (``mil_outputs``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from calciscope.data.datasets import GridTilesWithQC
from calciscope.data.slides import cached_slide, safe_id
from calciscope.data.stain import normalizer_from_spec
from calciscope.data.tiling import TileGrid
from calciscope.data.tissue import QC_COLUMNS, tile_qc
from calciscope.errors import CheckpointError
from calciscope.inference import saliency as sal
from calciscope.inference.config import PredictConfig
from calciscope.inference.onnx_runtime import OnnxTileRunner, resolve_onnx_model
from calciscope.inference.result import TopTile
from calciscope.io import sha256_file
from calciscope.model.backbones import fold_batchnorm
from calciscope.model.checkpoint import WEIGHTS_FILE, load_checkpoint
from calciscope.model.demo import resolve_model
from calciscope.model.precision import choose_precision, prepare_inputs, resolve_device
from calciscope.model.segmenter import WindowPlan, tiles_in_windows

Progress = Callable[[int, int], None]


def _collate(batch):
    """uint8 (B, 3, H, W) tiles, (B, 4) QC, (B,) indices. numpy's stack: torch.stack of uint8 tiles with several
    intra-op threads stalled for ~0.3 s per batch on a busy 2-core machine, numpy's takes ~1 ms."""
    tiles = np.stack([item[0] for item in batch]).transpose(0, 3, 1, 2)
    qc = np.array([[item[1][c] for c in QC_COLUMNS] for item in batch], np.float32)
    return (torch.from_numpy(np.ascontiguousarray(tiles)), torch.from_numpy(qc),
            torch.tensor([item[2] for item in batch]))


class WindowTiles:
    """The grid tiles cut out of the vessel segmenter's windows as they are decoded (pass it as ``on_windows``) and
    scored in batches as they gather: the slide is decoded once for both networks, with the same pixels a tile read
    on its own gives (``model.segmenter.tiles_in_windows``). ``finish`` scores the rest, reading any tile no window
    held (streamed as ``TileScorer.stream`` streams them), and returns what ``stream`` does plus the tile model's OOD
    feature rows in grid order.

    ``take_rows()`` returns (and clears) the tile model's OOD feature rows since it was last called (None: no tap);
    it is called around each batch, so tiles scored in between (vessel tiles) do not mix in."""

    def __init__(self, scorer: TileScorer, grid: TileGrid, level_downsample: float,
                 take_rows: Callable[[], np.ndarray | None], progress: Progress | None):
        self.scorer, self.grid, self.level_downsample = scorer, grid, level_downsample
        self.take_rows, self.progress = take_rows, progress
        self.where: dict | None = None
        self.queue: list[tuple[int, np.ndarray]] = []
        self.out: np.ndarray | None = None
        self.qc = np.zeros((len(grid), len(QC_COLUMNS)), np.float32)
        self.rows: list[tuple[np.ndarray, np.ndarray]] = []
        self.scored = np.zeros(len(grid), bool)

    def __call__(self, plan: WindowPlan, windows: list[tuple[int, int]], rgb: np.ndarray) -> None:
        if self.where is None:
            self.where = tiles_in_windows(self.grid, plan, self.level_downsample)
        px = self.grid.config.tile_px
        for xy, image in zip(windows, rgb):
            for i, col, row in self.where.get(xy, ()):
                self.queue.append((i, image[row : row + px, col : col + px].copy()))
        size = self.scorer.config.batch_size
        while len(self.queue) >= size:
            self._score(size)

    def finish(self, path: Path, slide_mpp: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(calibrated probabilities or MIL embeddings, tile QC, OOD rows or None), all in grid order: the queued
        tiles scored, then the tiles no window held (a slide whose tiles are off the windows' pixel lattice: all of
        them) streamed from the slide at ``path`` as ``TileScorer.stream`` does (decoding workers, memory bounded)."""
        while self.queue:
            self._score(self.scorer.config.batch_size)
        rest = np.flatnonzero(~self.scored)
        if len(rest):
            sub = replace(self.grid, xy=self.grid.xy[rest], colrow=self.grid.colrow[rest],
                          tissue_fraction=self.grid.tissue_fraction[rest])
            done = len(self.grid) - len(rest)
            progress = None if self.progress is None else lambda n, _: self.progress(done + n, len(self.grid))
            self.take_rows()
            out, qc = self.scorer.stream(path, slide_mpp, sub, progress)
            self._keep(rest, out, qc, self.take_rows())
        rows = None
        if self.rows and all(r is not None for _, r in self.rows):
            rows = np.zeros((len(self.grid), self.rows[0][1].shape[1]), np.float32)
            for idx, r in self.rows:
                rows[idx] = r
        assert self.out is not None and self.scored.all()
        return self.out, self.qc, rows

    def _score(self, size: int) -> None:
        batch, self.queue = self.queue[:size], self.queue[size:]
        idx = np.array([i for i, _ in batch])
        tiles = np.stack([t for _, t in batch])
        self.take_rows()  # whatever the tile model scored since (vessel tiles) is not a grid tile's
        y = self.scorer.score_tiles(torch.from_numpy(np.ascontiguousarray(tiles.transpose(0, 3, 1, 2))))
        qc = np.array([[values[c] for c in QC_COLUMNS] for values in map(tile_qc, tiles)], np.float32)
        self._keep(idx, y, qc, self.take_rows())
        if self.progress is not None:
            self.progress(int(self.scored.sum()), len(self.grid))

    def _keep(self, idx: np.ndarray, y: np.ndarray, qc: np.ndarray, rows: np.ndarray | None) -> None:
        if self.out is None:
            self.out = np.zeros((len(self.grid), y.shape[1]), np.float32)
        self.out[idx], self.qc[idx] = y, qc
        self.rows.append((idx, rows))
        self.scored[idx] = True


def inference_backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The model's backbone with BatchNorm folded into the convolutions (torch.fx): same outputs, ~1.2-1.3× faster
    on CPU. Saliency keeps the original model (its hooks need the original layers). Untraceable backbones stay as
    they are."""
    return fold_batchnorm(model.backbone)


class TileScorer:
    """A tile model ready to score: ``model`` is a checkpoint folder or ``"demo"`` (runtime torch), or an ONNX export
    or a folder holding ``model.onnx`` (runtime onnxruntime). ``model_path`` is what was loaded, ``score_tiles`` the
    forward pass (uint8 (B, 3, H, W) → calibrated probabilities (B, L), or embeddings (B, D) for MIL), after the
    card's stain normalisation when it has one."""

    def __init__(self, model: str | Path, config: PredictConfig):
        self.config = config
        if config.runtime == "onnxruntime":
            self._load_onnx(model)
        else:
            self._load_torch(model)
        self.labels = list(self.card.labels)
        # a model trained on stain-normalised tiles (``data.stain_normalize``) sees them normalised to the same
        # target here: every tile it scores (grid, vessel tiles, saliency) passes through ``normalize``
        self.normalizer = normalizer_from_spec(self.card.extra.get("stain_normalize"))
        self.score_tiles = self._normalized(self._forward)

    def _normalized(self, forward: Callable[[torch.Tensor], np.ndarray]) -> Callable[[torch.Tensor], np.ndarray]:
        if self.normalizer is None:
            return forward
        return lambda images: forward(torch.from_numpy(self.normalize(images.numpy(), channels_first=True)))

    def normalize(self, tiles: np.ndarray, channels_first: bool = False) -> np.ndarray:
        """uint8 tiles (B, H, W, 3), or (B, 3, H, W) with ``channels_first``, stain-normalised as in training (the
        same array when the model was trained without)."""
        if self.normalizer is None:
            return tiles
        hwc = tiles.transpose(0, 2, 3, 1) if channels_first else tiles
        out = np.stack([self.normalizer.transform(np.ascontiguousarray(t)) for t in hwc])
        return np.ascontiguousarray(out.transpose(0, 3, 1, 2)) if channels_first else out

    def _load_torch(self, model: str | Path) -> None:
        self.model_path = resolve_model(model)
        if self.model_path.suffix.lower() == ".onnx" and self.model_path.is_file():
            raise CheckpointError(self.model_path, "an ONNX export, not a checkpoint folder: score it with the "
                                                   "onnxruntime runtime (--runtime onnxruntime)")
        self.precision = choose_precision(self.config.amp, channels_last=True,
                                          device=resolve_device(self.config.device))
        self.model, self.card = load_checkpoint(self.model_path, map_location=self.precision.device)
        self.model = self.model.to(memory_format=torch.channels_last)
        self.backbone = inference_backbone(self.model)
        self.model_sha256 = self.card.weights_sha256 or sha256_file(self.model_path / WEIGHTS_FILE)
        self.temperature = torch.tensor([self.card.temperature[label] for label in self.card.labels],
                                        dtype=torch.float32)
        self.mean = torch.tensor(self.card.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(self.card.std, dtype=torch.float32).view(1, 3, 1, 1)
        self.runner = None
        self._forward: Callable[[torch.Tensor], np.ndarray] = self._torch_tiles

    def _load_onnx(self, model: str | Path) -> None:
        self.model_path = resolve_onnx_model(model)
        # as many intra-op threads as torch would use here (``calciscope score`` sets torch's per worker process)
        self.runner = OnnxTileRunner(self.model_path, threads=torch.get_num_threads())
        if self.runner.output != "logits":
            raise CheckpointError(self.model_path, "an attention-MIL export gives tile embeddings only; its attention "
                                                   "head runs in torch: score with the checkpoint folder")
        self.card = self.runner.card
        self.model = self.backbone = self.precision = None  # no torch model on this path
        self.model_sha256 = sha256_file(self.model_path)
        self._forward = self._onnx_tiles

    @property
    def device(self) -> torch.device:
        """Where the networks run (the CPU beside an ONNX tile model)."""
        return self.precision.device if self.precision is not None else torch.device("cpu")

    def stream(self, path: Path, slide_mpp: float | None, grid: TileGrid,
               progress: Progress | None) -> tuple[np.ndarray, np.ndarray]:
        """Tiles through the model in batches: (calibrated probabilities or MIL embeddings, tile QC)."""
        cfg = self.config
        loader = DataLoader(GridTilesWithQC(path, slide_mpp, grid), batch_size=cfg.batch_size,
                            num_workers=cfg.workers, collate_fn=_collate,
                            prefetch_factor=4 if cfg.workers else None, persistent_workers=False)
        out: np.ndarray | None = None
        qc = np.zeros((len(grid), len(QC_COLUMNS)), np.float32)
        done = 0
        for images, tile_qc_values, index in loader:
            y = self.score_tiles(images)
            if out is None:
                out = np.zeros((len(grid), y.shape[1]), np.float32)
            idx = index.numpy()
            out[idx] = y
            qc[idx] = tile_qc_values.numpy()
            done += len(idx)
            if progress is not None:
                progress(done, len(grid))
        assert out is not None  # the grid is not empty
        return out, qc

    def window_tiles(self, grid: TileGrid, level_downsample: float, take_rows: Callable[[], np.ndarray | None],
                     progress: Progress | None) -> WindowTiles:
        """A ``WindowTiles`` for ``grid``: pass it to the vessel stage as ``on_windows``, then call its ``finish``."""
        return WindowTiles(self, grid, level_downsample, take_rows, progress)

    def _torch_tiles(self, images: torch.Tensor) -> np.ndarray:
        """uint8 tiles (B, 3, H, W) -> calibrated probabilities (B, L), or embeddings (B, D) for MIL, in torch."""
        mil = self.card.head == "mil"
        with torch.inference_mode():
            x = prepare_inputs(images, self.mean, self.std, self.precision)
            with self.precision.autocast():
                y = self.backbone(x)
                if not mil:
                    y = self.model.head(y)  # tile model: head(dropout(embed)); dropout is off in eval
            y = y.float().cpu()
            if not mil:
                y = torch.sigmoid(y / self.temperature)
        return y.numpy()

    def _onnx_tiles(self, images: torch.Tensor) -> np.ndarray:
        """uint8 tiles (B, 3, H, W) -> calibrated probabilities (B, L), in onnxruntime (the same sigmoid(z / T))."""
        return self.runner.probabilities(images.numpy())

    def mil_outputs(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(slide probabilities (L,), attention per tile scaled to a maximum of 1 (N, L)) of an attention-MIL model."""
        with torch.inference_mode():
            logits, attention = self.model.aggregate(torch.from_numpy(embeddings).to(self.precision.device))
        probs = torch.sigmoid(logits.float().cpu() / self.temperature).numpy()
        attention = attention.float().cpu().numpy()
        scores = attention / np.maximum(attention.max(axis=0, keepdims=True), 1e-12)
        return probs, scores.astype(np.float32)

    def top_tiles(self, grid: TileGrid, scores: np.ndarray, tile_probs: np.ndarray) -> dict[str, list[TopTile]]:
        """The ``top_k`` highest-scoring tiles per finding (ties: the earlier tile)."""
        k = min(self.config.top_k, len(grid))
        top: dict[str, list[TopTile]] = {}
        for j, label in enumerate(self.labels):
            order = np.argsort(-scores[:, j], kind="stable")[:k]
            top[label] = [
                TopTile(label, rank, int(i), int(grid.xy[i, 0]), int(grid.xy[i, 1]), grid.size0_px,
                        float(scores[i, j]), None if np.isnan(tile_probs[i, j]) else float(tile_probs[i, j]))
                for rank, i in enumerate(order, 1)
            ]
        return top

    def saliency(self, path: Path, slide_mpp: float | None, grid: TileGrid, top: dict[str, list[TopTile]]):
        """Saliency for every top tile (read again from the slide: a few tiles, not worth keeping the rest)."""
        maps: dict[tuple[str, int], np.ndarray] = {}
        images: dict[tuple[str, int], np.ndarray] = {}
        entries = [t for tiles in top.values() for t in tiles]
        if not entries:
            return maps, images
        slide = cached_slide(path, slide_mpp)
        tiles = np.stack([grid.read(slide, t.index) for t in entries])
        for t, tile in zip(entries, tiles):
            images[(t.finding, t.rank)] = tile
        if self.config.saliency == "none":
            return maps, images
        targets = np.array([self.labels.index(t.finding) for t in entries])
        scale = grid.size0_px / self.card.tile_px
        computed = sal.saliency_maps(self.model, self.normalize(tiles), targets, self.card.mean, self.card.std,
                                     method=self.config.saliency, ig_steps=self.config.ig_steps,
                                     device=self.precision.device)
        for t, m in zip(entries, computed):
            maps[(t.finding, t.rank)] = m
            px, py = sal.peak(m)
            t.saliency_peak = (t.x + px * scale, t.y + py * scale)
            t.saliency_file = f"saliency/{safe_id(t.finding)}/tile_{t.x}_{t.y}.png"
        return maps, images
