"""Tile values drawn over the slide: heatmap images for the report and contours (level-0 polygons) for QuPath."""

from __future__ import annotations

import cv2
import numpy as np


def tile_raster(shape_hw: tuple[int, int], scale: float, xy: np.ndarray, size0: int,
                values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Paint each tile's value into a (h, w) map at ``scale`` image px per level-0 px (overlaps keep the maximum).

    Returns (values float32, covered bool).
    """
    h, w = shape_hw
    value_map = np.zeros((h, w), np.float32)
    covered = np.zeros((h, w), bool)
    side = max(1, int(round(size0 * scale)))
    for (x, y), v in zip(np.asarray(xy), np.asarray(values, dtype=np.float32)):
        x0, y0 = int(x * scale), int(y * scale)
        x1, y1 = min(w, x0 + side), min(h, y0 + side)
        if x1 <= x0 or y1 <= y0:
            continue
        np.maximum(value_map[y0:y1, x0:x1], v, out=value_map[y0:y1, x0:x1])
        covered[y0:y1, x0:x1] = True
    return value_map, covered


def heatmap_image(thumbnail: np.ndarray, slide_width: int, xy: np.ndarray, size0: int, values: np.ndarray, *,
                  title: str = "", highlight: np.ndarray | None = None, marked: np.ndarray | None = None,
                  alpha: float = 0.75) -> np.ndarray:
    """The thumbnail with tile values (0..1, inferno) blended where tiles are, a colour bar and a title: RGB.

    Opacity rises from 0.12 (value 0) to ``alpha`` (value 1). ``highlight`` (the top tiles' level-0 corners) are
    cyan squares; ``marked`` (tiles unlike the model's training data) white squares crossed by a diagonal.
    """
    th, tw = thumbnail.shape[:2]
    scale = tw / slide_width
    value_map, covered = tile_raster((th, tw), scale, xy, size0, values)
    colour = cv2.applyColorMap((np.clip(value_map, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_INFERNO)[..., ::-1]
    # opacity grows with the value, so low-scoring tissue stays readable and high scores stand out
    weight = np.where(covered, 0.12 + (alpha - 0.12) * np.clip(value_map, 0, 1) ** 0.5, 0.0)[..., None]
    image = (thumbnail * (1 - weight) + colour * weight).round().astype(np.uint8)
    side = max(2, int(round(size0 * scale)))
    for x, y in np.asarray(marked if marked is not None else []).reshape(-1, 2):  # out-of-distribution tiles
        x0, y0 = int(x * scale), int(y * scale)
        cv2.rectangle(image, (x0, y0), (x0 + side - 1, y0 + side - 1), (255, 255, 255), 1)
        cv2.line(image, (x0, y0), (x0 + side - 1, y0 + side - 1), (255, 255, 255), 1)
    if highlight is not None:  # the top tiles: cyan squares
        for x, y in np.asarray(highlight).reshape(-1, 2):
            x0, y0 = int(x * scale), int(y * scale)
            cv2.rectangle(image, (x0, y0), (x0 + side - 1, y0 + side - 1), (0, 230, 255), max(1, tw // 500))
    return np.concatenate([image, _colour_bar(tw, title)], axis=0)


def _colour_bar(width: int, title: str) -> np.ndarray:
    height = 44
    bar = np.full((height, width, 3), 255, np.uint8)
    x0, x1 = 40, max(60, width - 40)
    ramp = np.linspace(0, 255, x1 - x0).astype(np.uint8)[None, :]
    colours = cv2.applyColorMap(np.repeat(ramp, 12, axis=0), cv2.COLORMAP_INFERNO)[..., ::-1]
    bar[6:18, x0:x1] = colours
    font, scale, ink = cv2.FONT_HERSHEY_SIMPLEX, 0.45, (20, 20, 20)
    cv2.putText(bar, "0", (x0 - 14, 17), font, scale, ink, 1, cv2.LINE_AA)
    cv2.putText(bar, "1", (x1 + 5, 17), font, scale, ink, 1, cv2.LINE_AA)
    if title:
        cv2.putText(bar, title, (x0, 36), font, scale, ink, 1, cv2.LINE_AA)
    return bar


def contours_level0(xy: np.ndarray, size0: int, positive: np.ndarray, slide_dims: tuple[int, int], *,
                    cells_per_tile: int = 4) -> list[list[list[tuple[float, float]]]]:
    """Outlines of the union of the ``positive`` tiles as polygons [exterior, *holes] in level-0 pixels."""
    xy = np.asarray(xy)[np.asarray(positive, bool)]
    if len(xy) == 0:
        return []
    scale = cells_per_tile / size0
    w0, h0 = slide_dims
    shape = (int(np.ceil(h0 * scale)) + 2, int(np.ceil(w0 * scale)) + 2)
    mask = tile_raster(shape, scale, xy, size0, np.ones(len(xy), np.float32))[1].astype(np.uint8)
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    polygons: list[list[list[tuple[float, float]]]] = []
    if hierarchy is None:
        return polygons
    hierarchy = hierarchy[0]

    def ring(contour: np.ndarray) -> list[tuple[float, float]]:
        # through the centres of the boundary cells: within half a cell (1/8 tile) of the tiles' edges
        pts = [(float((px + 0.5) / scale), float((py + 0.5) / scale)) for px, py in contour[:, 0]]
        return pts + pts[:1]

    for i, contour in enumerate(contours):
        if hierarchy[i][3] != -1 or len(contour) < 3:  # holes are attached to their parent below
            continue
        rings = [ring(contour)]
        child = hierarchy[i][2]
        while child != -1:
            if len(contours[child]) >= 3:
                rings.append(ring(contours[child]))
            child = hierarchy[child][0]
        polygons.append(rings)
    return polygons
