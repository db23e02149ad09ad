"""The vessel segmenter: a small U-Net that maps H&E at ``mpp`` µm/px to per-pixel maps of vessel wall and of
sectioning artifacts around calcium, saved as ``segmenter.safetensors`` + ``segmenter.json`` (never pickled).

Outputs (sigmoid channels, in ``SegmenterCard.channels`` order): ``vessel`` (inside the outer outline, lumen
included), ``lumen`` (inside the lumen outline, thrombus included) and ``calcium_artifact`` (holes, tears and knife
chatter where calcium was cut). The wall map instances are cut from is vessel × (1 − lumen): a ring around each
lumen, so touching vessels split at their lumens (calciscope.data.vessels.instances), while a whole-vessel target is
what a network learns reliably for thin-walled, packed or occluded vessels.

A slide is segmented in overlapping windows of ``WINDOW_PX`` at ``card.mpp`` on one global grid (``plan_windows``);
only windows that touch tissue are run, and each keeps its centre (the margin only gives context), so the stitched
map does not depend on where the windows fall. Windows are decoded in a background thread while the previous batch
runs, in the precision the tile model runs in (``model.precision``: bf16 autocast on CPUs that have it,
channels_last, BatchNorm folded by ``for_inference``). ``segment_bands`` hands the maps over one row of windows at a
time (what ``predict`` uses: memory does not grow with the slide); ``segment_slide`` stitches them into whole-slide
maps (training, evaluation, tests). Maps are uint8 (probability × 255), one byte per pixel. ``predict`` cuts the
tile model's grid tiles out of the decoded windows (``on_windows``, ``tiles_in_windows``) where they are the same
pixels, so each region of the slide is decoded once for both networks.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import cv2
import numpy as np
import torch
from torch import nn

from calciscope.data.slides import Slide
from calciscope.data.tiling import TileGrid
from calciscope.data.tissue import TissueMask
from calciscope.data.vessels.instances import InstanceConfig
from calciscope.model.backbones import fold_batchnorm
from calciscope.model.card import CardBase
from calciscope.model.checkpoint import load_net, save_net
from calciscope.model.precision import Precision, choose_precision, device_of

WEIGHTS_FILE = "segmenter.safetensors"
CARD_FILE = "segmenter.json"
CHANNELS = ("vessel", "lumen", "calcium_artifact")
WINDOW_PX = 512
MARGIN_PX = 32
# decoded JPEG tiles the slide keeps while it is segmented: one row of windows across a slide 24,000 px wide, so the
# next row finds the tiles the two share (~30 % less decoding); bounded, so memory does not grow with the slide
TILE_CACHE_BYTES = 128 << 20
SCHEMA_VERSION = 2  # 2: the card base's fields (name, version, created, intended_use); 1 still reads


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class VesselUNet(nn.Module):
    """U-Net with ``len(widths) - 1`` poolings; input sides must be multiples of 2**(len(widths) - 1)."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 96), out_channels: int = len(CHANNELS)):
        super().__init__()
        self.widths = tuple(int(w) for w in widths)
        self.down = nn.ModuleList()
        cin = 3
        for w in self.widths:
            self.down.append(_block(cin, w))
            cin = w
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for w_skip, w_in in zip(self.widths[-2::-1], self.widths[:0:-1]):
            self.up.append(nn.ConvTranspose2d(w_in, w_skip, 2, stride=2))
            self.merge.append(_block(2 * w_skip, w_skip))
        self.out = nn.Conv2d(self.widths[0], out_channels, 1)

    @property
    def multiple(self) -> int:
        return 2 ** (len(self.widths) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else nn.functional.max_pool2d(x, 2))
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, skips[-2::-1]):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.out(x)


@dataclass(kw_only=True)
class SegmenterCard(CardBase):
    """``segmenter.json``: what the segmenter needs at inference (the card base's fields say how it was made)."""

    KIND: ClassVar[str] = "vessel segmenter"
    WEIGHTS_FILE: ClassVar[str] = WEIGHTS_FILE
    CARD_FILE: ClassVar[str] = CARD_FILE
    SCHEMA_VERSION: ClassVar[int] = SCHEMA_VERSION

    name: str = "vessel-segmenter"
    mpp: float = 1.0
    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 96])
    channels: list[str] = field(default_factory=lambda: list(CHANNELS))
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])
    thresholds: dict[str, float] = field(default_factory=lambda: {c: 0.5 for c in CHANNELS})
    # InstanceConfig settings tuned for this segmenter (e.g. {"min_mean_probability": 0.6}); the rest default
    instance: dict[str, Any] = field(default_factory=dict)

    def build(self) -> VesselUNet:
        return VesselUNet(tuple(self.widths), len(self.channels))

    def problem(self) -> str | None:
        if not self.mpp > 0 or not {"vessel", "lumen"} <= set(self.channels) or len(self.widths) < 2:
            return "needs mpp > 0, 'vessel' and 'lumen' channels and at least two widths"
        unknown = set(self.instance) - set(InstanceConfig.__dataclass_fields__)
        if unknown:
            return f"unknown instance settings {sorted(unknown)}"
        return None

    def weights_metadata(self) -> dict[str, str]:
        return {"calciscope_segmenter": json.dumps(self.channels)}

    def fitted_to(self, model: nn.Module) -> dict[str, Any]:
        return {"widths": list(model.widths)}

    def describe(self) -> str:
        return f"U-Net widths {list(self.widths)}, {len(self.channels)} channels"

    def instance_config(self) -> InstanceConfig:
        """The instance settings this segmenter was tuned with (card ``instance``), defaults elsewhere."""
        return InstanceConfig(**self.instance)


def save_segmenter(directory: str | Path, model: VesselUNet, card: SegmenterCard) -> Path:
    """Write ``segmenter.safetensors`` then ``segmenter.json`` (with the weights' sha256) into ``directory``."""
    return save_net(directory, model, card)


def load_segmenter(directory: str | Path) -> tuple[VesselUNet, SegmenterCard]:
    """Model (eval mode, CPU) and card from a segmenter folder; checks the sha256, key set and shapes first."""
    return load_net(SegmenterCard, directory)


def for_inference(model: VesselUNet) -> nn.Module:
    """The segmenter with BatchNorm folded into its convolutions, in channels_last: the same maps to ~1e-5, about
    10 % faster inside predict on 2 CPU cores."""
    return fold_batchnorm(model).to(memory_format=torch.channels_last)


def normalise(rgb: np.ndarray, card: SegmenterCard) -> torch.Tensor:
    """uint8 (..., H, W, 3) → float (..., 3, H, W) standardised with the card's mean/std."""
    x = torch.from_numpy(np.ascontiguousarray(rgb)).float().div_(255.0)
    x = x.movedim(-1, -3)
    mean = torch.tensor(card.mean).view(3, 1, 1)
    std = torch.tensor(card.std).view(3, 1, 1)
    return (x - mean) / std


@dataclass
class VesselMaps:
    """Segmenter output for one slide: uint8 maps (probability × 255) at ``downsample`` of level 0."""

    maps: dict[str, np.ndarray]
    downsample: float
    mpp: float  # µm per map pixel

    def probability(self, channel: str) -> np.ndarray:
        return self.maps[channel].astype(np.float32) / 255.0

    def wall(self) -> np.ndarray:
        """Vessel-wall probability: inside a vessel and not in its lumen."""
        return self.probability("vessel") * (1.0 - self.probability("lumen"))


@dataclass(frozen=True)
class WindowPlan:
    """Where the segmenter runs on one slide: the maps' size (map px at ``card.mpp``), how a window is read, and the
    windows by row of the global grid (every ``WINDOW_PX - 2 * MARGIN_PX`` map px; a row's ``xs`` are the windows
    that touch tissue, possibly none). Window (x, y) makes the map's ``[y, y + step) × [x, x + step)``."""

    downsample: float  # level-0 px per map px
    level: int  # the pyramid level windows are read from
    read_px: int  # side of a window at that level, before resizing to WINDOW_PX
    width: int
    height: int
    rows: tuple[tuple[int, tuple[int, ...]], ...]

    step = WINDOW_PX - 2 * MARGIN_PX

    @property
    def n_windows(self) -> int:
        return sum(len(xs) for _, xs in self.rows)

    def windows(self) -> list[tuple[int, int]]:
        """(x, y) of every window run, in the order they run (rows top to bottom, left to right)."""
        return [(x, y) for y, xs in self.rows for x in xs]


def plan_windows(slide: Slide, card: SegmenterCard, tissue: TissueMask | None = None) -> WindowPlan:
    """The segmenter's windows on ``slide``: those that touch tissue when ``tissue`` is given, else all."""
    downsample = card.mpp / slide.mpp
    level = slide.best_level_for_downsample(downsample)
    w0, h0 = slide.dimensions
    out_w, out_h = int(np.ceil(w0 / downsample)), int(np.ceil(h0 / downsample))
    step = WindowPlan.step
    rows = tuple((y, tuple(x for x in range(0, out_w, step)
                           if tissue is None or _touches_tissue(tissue, x, y, step, downsample)))
                 for y in range(0, out_h, step))
    read_px = int(np.ceil(WINDOW_PX * downsample / slide.level_downsamples[level]))
    return WindowPlan(downsample, level, read_px, out_w, out_h, rows)


def inference_precision(model: nn.Module, amp: str = "auto") -> Precision:
    """The precision a segmenter (or classifier) runs in on its device: the tile model's rule (``amp`` "auto": bf16
    autocast on CPUs with native bf16, fp16 on CUDA, else fp32), channels_last."""
    return choose_precision(amp, channels_last=True, device=device_of(model))


# called with the plan, a batch of windows ((x, y) map px of their centres) and their WINDOW_PX² RGB pixels
WindowsSeen = Callable[["WindowPlan", list[tuple[int, int]], np.ndarray], None]


@dataclass
class MapBand:
    """One row of windows' maps: uint8 (channels, rows, width) for map rows ``[y, y + rows)`` (zeros where no window
    ran)."""

    y: int
    maps: np.ndarray


def segment_bands(slide: Slide, model: nn.Module, card: SegmenterCard, plan: WindowPlan, *,
                  precision: Precision | None = None, batch_size: int = 8,
                  progress: Callable[[int, int], None] | None = None,
                  on_windows: WindowsSeen | None = None) -> Iterator[MapBand]:
    """The segmenter's maps of ``slide``, one band per row of ``plan``, top to bottom: windows are decoded one batch
    ahead in a thread (openslide and OpenCV release the GIL) and run ``batch_size`` at a time, across rows.
    ``progress(windows done, windows total)`` after each batch; ``on_windows(plan, windows, rgb)`` with each batch's
    decoded pixels before it runs (``predict`` cuts the tile model's grid tiles out of them: one decode for both)."""
    precision = precision or inference_precision(model)
    slide.enlarge_tile_cache(TILE_CACHE_BYTES)
    windows = plan.windows()
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    pending: dict[tuple[int, int], np.ndarray] = {}  # window -> its centre's maps, until its row is complete
    rows = list(plan.rows)
    r = done = 0

    def read(batch):
        return np.stack([read_window(slide, plan, x, y) for x, y in batch])

    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(read, batches[0]) if batches else None
        for b, batch in enumerate(batches):
            rgb = future.result()
            future = pool.submit(read, batches[b + 1]) if b + 1 < len(batches) else None
            if on_windows is not None:
                on_windows(plan, batch, rgb)
            pending.update(zip(batch, run_windows(model, card, rgb, precision)))
            done += len(batch)
            if progress is not None:
                progress(done, len(windows))
            next_y = windows[done][1] if done < len(windows) else plan.height
            while r < len(rows) and rows[r][0] < next_y:  # rows above the next window are complete
                yield _band(*rows[r], pending, plan, len(card.channels))
                r += 1
    for y, xs in rows[r:]:
        yield _band(y, xs, pending, plan, len(card.channels))


def _band(y: int, xs: tuple[int, ...], pending: dict, plan: WindowPlan, n_ch: int) -> MapBand:
    step = plan.step
    h = min(step, plan.height - y)
    maps = np.zeros((n_ch, h, plan.width), np.uint8)
    for x in xs:
        w = min(step, plan.width - x)
        maps[:, :, x : x + w] = pending.pop((x, y))[:, :h, :w]
    return MapBand(y, maps)


def run_windows(model: nn.Module, card: SegmenterCard, rgb: np.ndarray, precision: Precision) -> np.ndarray:
    """uint8 (B, channels, step, step): the centre of each window's sigmoid maps (probability × 255, rounded) of
    WINDOW_PX² RGB windows (B, WINDOW_PX, WINDOW_PX, 3)."""
    device = device_of(model)
    with torch.inference_mode():
        x = normalise(rgb, card).to(device).contiguous(memory_format=torch.channels_last)
        with precision.autocast():
            logits = model(x)
        prob = torch.sigmoid(logits.float())
        centre = prob[:, :, MARGIN_PX : WINDOW_PX - MARGIN_PX, MARGIN_PX : WINDOW_PX - MARGIN_PX]
        return torch.round(centre * 255).to(torch.uint8).cpu().numpy()


def segment_slide(slide: Slide, model: nn.Module, card: SegmenterCard, tissue: TissueMask | None = None, *,
                  batch_size: int = 8, precision: Precision | None = None) -> VesselMaps:
    """Whole-slide maps of the segmenter (windows touching tissue only, when ``tissue`` is given), on the device the
    model is on, in ``precision`` (default: ``inference_precision``, as ``predict``). Memory grows with the slide:
    ``predict`` streams ``segment_bands`` instead."""
    plan = plan_windows(slide, card, tissue)
    maps = np.zeros((len(card.channels), plan.height, plan.width), np.uint8)
    for band in segment_bands(slide, model, card, plan, precision=precision, batch_size=batch_size):
        maps[:, band.y : band.y + band.maps.shape[1]] = band.maps
    return VesselMaps({c: maps[k] for k, c in enumerate(card.channels)}, plan.downsample, card.mpp)


def read_window(slide: Slide, plan: WindowPlan, x: int, y: int) -> np.ndarray:
    """WINDOW_PX² RGB at the map's scale whose centre starts at map pixel (x, y); outside the slide = glass."""
    x0, y0 = int(round((x - MARGIN_PX) * plan.downsample)), int(round((y - MARGIN_PX) * plan.downsample))
    region = slide.read_region((x0, y0), plan.level, (plan.read_px, plan.read_px))
    return cv2.resize(region, (WINDOW_PX, WINDOW_PX), interpolation=cv2.INTER_AREA)


def tiles_in_windows(grid: TileGrid, plan: WindowPlan, level_downsample: float) -> dict[tuple[int, int], list]:
    """Per window the plan runs, the grid tiles whose pixels it holds exactly, as [(tile index, column, row of the
    tile's top-left in the window's WINDOW_PX² pixels)]; every tile in at most one window. Exactly: both are read
    from the same level and shrunk by the same whole factor with the area filter (a block average), from blocks that
    line up; otherwise (another level, a fractional factor, tiles off the windows' pixel lattice) no tile is listed
    and the tiles are read on their own. ``level_downsample``: the downsample of ``plan.level``."""
    factor = plan.read_px / WINDOW_PX
    tile_px = grid.config.tile_px
    if (grid.level != plan.level or factor != int(factor) or grid.read_px != int(factor) * tile_px
            or plan.downsample != factor * level_downsample):
        return {}
    factor = int(factor)
    run = set(plan.windows())
    step = plan.step
    found: dict[tuple[int, int], list] = {}
    for i, (x0, y0) in enumerate(np.asarray(grid.xy, np.float64)):
        if x0 % plan.downsample or y0 % plan.downsample:  # not on the windows' pixel lattice
            continue
        mx, my = int(x0 // plan.downsample), int(y0 // plan.downsample)  # the tile's top-left in map px
        for wy in (my // step * step, my // step * step - step):
            for wx in (mx // step * step, mx // step * step - step):
                col, row = mx - wx + MARGIN_PX, my - wy + MARGIN_PX
                if (wx, wy) in run and 0 <= col <= WINDOW_PX - tile_px and 0 <= row <= WINDOW_PX - tile_px:
                    found.setdefault((wx, wy), []).append((i, col, row))
                    break
            else:
                continue
            break
    return found


def _touches_tissue(tissue: TissueMask, x: int, y: int, step: int, downsample: float) -> bool:
    scale = downsample / tissue.downsample  # map px → tissue-mask px
    r0, c0 = int(y * scale), int(x * scale)
    r1, c1 = int(np.ceil((y + step) * scale)) + 1, int(np.ceil((x + step) * scale)) + 1
    return bool(tissue.tissue[r0:r1, c0:c1].any())
