"""Vessel analysis of one slide: find every vessel, measure it, place it, judge it, and count what was seen.

    segmenter (calciscope.model.segmenter) → wall map → instances (vessels.instances) → outline, lumen,
    diameters, wall thickness (vessels.measure) → dermis or subcutaneous fat (vessels.compartment)
    [``detect_vessels``] → per-vessel findings: the vessel classifier's calibrated probabilities on a crop scaled
    to the vessel (vessels.classifier), or, without one, the tile model's on tiles centred on the vessel
    (vessels.sampling), max over the vessel's tiles (or the card's vessel head); plus sampling adequacy and
    calcium-artifact QC.

Size bands (outer diameter = minor axis, µm): ``capillary`` < 20, ``arteriole`` 20–100, ``artery`` ≥ 100.
Adequacy: "small vessels in subcutaneous fat" are fat vessels below ``AdequacyConfig.small_max_um``; fewer than
``min_small_fat_vessels`` of them and the slide's CUA-pattern call carries status ``insufficient_sampling``, so
"no vasculitis" is never read off a biopsy whose subcutaneous vessels were not seen.
QC: calcium lost in sectioning (holes where a deposit fell out, tears it dragged, knife chatter). A vessel is
flagged ``calcium_artifact`` (calcium may have been lost there, so a negative call on that vessel is weaker) when
the calcium-artifact classifier (or, without one, a vessel classifier whose card has ``artifact_output``) gives it
a calcium-artifact probability of at least that card's ``artifact_threshold``, or when it lies within
``artifact_near_um`` of a connected region of the segmenter's ``calcium_artifact`` map (at the segmenter card's
threshold, of at least ``min_artifact_um2``).
Artifact regions are those map regions plus, for each vessel flagged by the classifier and by no map region, the
vessel's surroundings: its outline grown by ``artifact_near_um`` (where to look, not a traced artifact).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import cv2
import numpy as np
import torch

from calciscope.data.slides import Slide
from calciscope.data.tiling import TilingConfig
from calciscope.data.tissue import TissueMask
from calciscope.data.vessels.frames import level0_to_mask_px, mask_px_to_level0
from calciscope.data.vessels.match import near_artifact
from calciscope.data.vessels.sampling import vessel_grid
from calciscope.model.precision import Precision
from calciscope.model.segmenter import SegmenterCard, WindowsSeen
from calciscope.model.vessel_classifier import ARTIFACT, VESSEL, ClassifierCard, classify_vessels
from calciscope.model.vessel_detection import (
    COMPARTMENTS,
    SIZE_BANDS,
    VESSEL_POSITIVE,
    AdequacyConfig,
    VesselConfig,
    StreamedMaps,
    VesselRecord,
    detect_vessels,
)
from calciscope.model.vessel_head import VesselHead, vessel_features


VesselProgress = Callable[[str, int, int], None]  # (step: "windows" or "vessels", done, total)


@dataclass
class VesselAnalysis:
    vessels: list[VesselRecord]
    adequacy: dict[str, Any]
    qc: dict[str, Any]
    artifact_polygons: list[np.ndarray]  # level-0 outlines of calcium-artifact regions
    labels: list[str]
    seconds: float
    maps: StreamedMaps | None = None  # the maps' scale and calcium-artifact regions (no pixels are kept)
    tile_probs: np.ndarray | None = None  # (M, L) every vessel tile's probabilities


    def slide_scores(self) -> np.ndarray:
        """(L,) highest vessel probability per finding (0 without vessels)."""
        if not self.vessels:
            return np.zeros(len(self.labels), np.float32)
        return np.array([[v.probabilities[k] for k in self.labels] for v in self.vessels], np.float32).max(axis=0)

    def to_dict(self, thresholds: dict[str, float] | None = None) -> dict[str, Any]:
        return {"n_vessels": len(self.vessels), "adequacy": self.adequacy, "qc": self.qc,
                "seconds": round(self.seconds, 3),
                "vessels": [v.to_dict(thresholds) for v in self.vessels]}


def analyze_vessels(slide: Slide, tissue: TissueMask, segmenter: torch.nn.Module, seg_card: SegmenterCard,
                    classify: Callable[[np.ndarray], np.ndarray], tiling: TilingConfig, labels: list[str],
                    config: VesselConfig = VesselConfig(), head: VesselHead | None = None,
                    classifier: tuple[torch.nn.Module, ClassifierCard] | None = None,
                    artifact_classifier: tuple[torch.nn.Module, ClassifierCard] | None = None, *,
                    precision: Precision | None = None, progress: VesselProgress | None = None,
                    on_windows: WindowsSeen | None = None) -> VesselAnalysis:
    """Vessels of ``slide`` with their findings. With a vessel ``classifier`` (calciscope.model.vessel_classifier: model
    and card), each vessel's probabilities are its calibrated outputs and the tile model does not see vessel
    tiles; otherwise ``classify`` maps uint8 tiles (B, 3, H, W) to calibrated probabilities (B, L) and each vessel
    gets its tiles' highest, or ``head`` (calciscope.model.vessel_head) turns tile scores and shape into them. An
    ``artifact_classifier`` (a classifier card with a calcium_artifact output) judges the listed vessels for calcium
    artifacts; without one, ``classifier`` does when its card has that output.

    The networks run in ``precision`` (default: each as the tile model would on its device). ``progress(step, done,
    total)`` reports ``"windows"`` (segmenter windows run) and ``"vessels"`` (outlines judged by the classifiers, or
    vessels whose tiles were scored); ``on_windows`` sees the segmenter's decoded windows (``segment_bands``)."""
    start = time.perf_counter()
    report = progress or (lambda step, done, total: None)
    candidates_at = classifier[1].candidate_min_mean_probability if classifier is not None else None
    vessels, candidates, maps = detect_vessels(slide, tissue, segmenter, seg_card, config, candidates_at,
                                               precision=precision, on_windows=on_windows,
                                               progress=lambda done, total: report("windows", done, total))
    # crops judged: every outline by the vessel classifier (or every vessel by its tiles), then every listed vessel by
    # the artifact classifier (as many as the segmenter's vessels, until the listing says)
    outlines = len(vessels) + (len(candidates) if classifier is not None else 0)
    second = artifact_classifier is not None
    total = outlines + (len(vessels) if second else 0)
    report("vessels", 0, total)
    if classifier is not None:
        model, card = classifier
        everything = vessels + candidates
        probs = _judge(slide, everything, classifier, config.batch_size, precision,
                       lambda done, _: report("vessels", done, total))
        outputs = card.outputs
        lesioned = {}  # over every finding the classifier judges, as its training validated the listing
        for v, p in zip(everything, probs):
            v.probabilities = {k: float(p[outputs.index(k)]) for k in labels}
            lesioned[id(v)] = bool((p[: len(card.labels)] >= VESSEL_POSITIVE).any())
            if VESSEL in outputs:
                v.vessel_probability = float(p[outputs.index(VESSEL)])
            if ARTIFACT in outputs:
                v.artifact_probability = float(p[outputs.index(ARTIFACT)])
        vessels = listed_vessels(vessels, candidates, card.vessel_threshold, lambda v: lesioned[id(v)])
        tile_probs = np.zeros((0, len(labels)), np.float32)
    else:
        tile_probs = _classify(slide, vessels, classify, tiling, labels, config.batch_size)
    total = outlines + (len(vessels) if second else 0)
    report("vessels", outlines, total)
    if head is not None and classifier is None and vessels:
        probs = head.predict(features_of(vessels, labels))
        for v, p in zip(vessels, probs):
            v.probabilities = {k: float(x) for k, x in zip(labels, p)}
    artifact_polys = list(maps.artifact_polygons)
    _flag_artifacts(vessels, artifact_polys, slide.mpp, config.artifact_near_um)
    judge = artifact_classifier or (classifier if classifier is not None and classifier[1].artifact_output else None)
    if artifact_classifier is not None and vessels:
        column = artifact_classifier[1].outputs.index(ARTIFACT)
        judged = _judge(slide, vessels, artifact_classifier, config.batch_size, precision,
                        lambda done, _: report("vessels", outlines + done, total))
        for v, p in zip(vessels, judged):
            v.artifact_probability = float(p[column])
    if judge is not None:
        artifact_polys += flag_judged_artifacts(vessels, judge[1].artifact_threshold, maps.downsample,
                                                config.artifact_near_um / slide.mpp)
    qc = {"calcium_artifact_regions": len(artifact_polys),
          "calcium_artifact_area_mm2": round(sum(float(cv2.contourArea(p.astype(np.float32))) for p in artifact_polys)
                                             * (slide.mpp / 1000) ** 2, 6),
          "vessels_near_calcium_artifact": sum("calcium_artifact" in v.flags for v in vessels),
          "calcium_artifact_judge": None if judge is None else {
              "weights_sha256": judge[1].weights_sha256, "threshold": judge[1].artifact_threshold,
              "classifier": "artifact classifier" if judge is artifact_classifier else "vessel classifier"}}
    return VesselAnalysis(vessels, adequacy(vessels, config.adequacy), qc, artifact_polys, list(labels),
                          time.perf_counter() - start, maps, tile_probs)


def _judge(slide: Slide, vessels: list[VesselRecord], classifier: tuple[torch.nn.Module, ClassifierCard],
           batch_size: int, precision: Precision | None = None, progress=None) -> np.ndarray:
    """(N, outputs) calibrated probabilities of a vessel classifier on ``vessels``' crops, calibres and compartments."""
    model, card = classifier
    return classify_vessels(slide, [v.polygon for v in vessels],
                            np.array([v.geometry.outer_diameter_um for v in vessels]),
                            np.array([v.compartment == "fat" for v in vessels]), model, card, batch_size,
                            precision=precision, progress=progress)


def listed_vessels(vessels: list[VesselRecord], candidates: list[VesselRecord], vessel_threshold: float | None = None,
                   lesioned: Callable[[VesselRecord], bool] | None = None) -> list[VesselRecord]:
    """The vessels a slide's result lists, renumbered from 1, once the classifier has judged them all.

    A vessel (it passed the segmenter's filter) is listed, unless the card has a vessel threshold: then only when
    its vessel probability reaches it or it has a lesion (some finding at or above VESSEL_POSITIVE). A candidate
    (faint outline) is listed when the classifier calls it a vessel (vessel probability at or above the vessel
    threshold, or VESSEL_POSITIVE without one; a classifier without that output always does) and, without a vessel
    threshold, finds a lesion in it (``lesioned``, default: some finding of ``probabilities`` at or above
    VESSEL_POSITIVE). Listed candidates are flagged ``faint_outline``."""
    lesion = lesioned or is_lesioned
    listed = [v for v in vessels if vessel_threshold is None or lesion(v) or _is_vessel(v, vessel_threshold)]
    faint = [v for v in candidates if _is_vessel(v, VESSEL_POSITIVE if vessel_threshold is None else vessel_threshold)
             and (vessel_threshold is not None or lesion(v))]
    for v in faint:
        v.flags.append("faint_outline")
    for i, v in enumerate(listed + faint, start=1):
        v.vessel_id = i
    return listed + faint


def is_lesioned(v: VesselRecord) -> bool:
    return any(p >= VESSEL_POSITIVE for p in v.probabilities.values())


def _is_vessel(v: VesselRecord, threshold: float) -> bool:
    return v.vessel_probability is None or v.vessel_probability >= threshold


def adequacy(vessels: list[VesselRecord], config: AdequacyConfig = AdequacyConfig()) -> dict[str, Any]:
    """Vessel counts by compartment and size band, and whether enough small subcutaneous vessels were seen."""
    counts = {c: {b: 0 for b, _, _ in SIZE_BANDS} for c in COMPARTMENTS}
    for v in vessels:
        counts[v.compartment if v.compartment in counts else "unknown"][v.size_band] += 1
    small_fat = sum(1 for v in vessels if v.compartment == "fat" and v.geometry.outer_diameter_um < config.small_max_um)
    sufficient = small_fat >= config.min_small_fat_vessels
    return {"n_vessels": len(vessels), "by_compartment": counts, "small_fat_vessels": small_fat,
            "min_small_fat_vessels": config.min_small_fat_vessels, "small_max_um": config.small_max_um,
            "status": "sufficient" if sufficient else "insufficient",
            "reason": (f"{small_fat} small vessel(s) (< {config.small_max_um:g} µm) in subcutaneous fat seen; "
                       f"at least {config.min_small_fat_vessels} are needed to judge the small vessels "
                       f"(and to call vasculitis absent)")}


def _classify(slide: Slide, vessels: list[VesselRecord], classify, tiling: TilingConfig, labels: list[str],
              batch_size: int) -> np.ndarray:
    if not vessels:
        return np.zeros((0, len(labels)), np.float32)
    grid, owner = vessel_grid(slide, [v.polygon for v in vessels], tiling)
    probs = np.zeros((len(grid), len(labels)), np.float32)
    for i in range(0, len(grid), batch_size):
        idx = range(i, min(i + batch_size, len(grid)))
        tiles = np.stack([grid.read(slide, j) for j in idx]).transpose(0, 3, 1, 2)
        probs[i : i + len(idx)] = classify(np.ascontiguousarray(tiles))
    for k, v in enumerate(vessels):
        mine = probs[owner == k]
        v.n_tiles = len(mine)
        v.tile_probabilities = {label: float(mine[:, j].max()) for j, label in enumerate(labels)}
        v.probabilities = dict(v.tile_probabilities)
    return probs


def features_of(vessels: list[VesselRecord], labels: list[str]) -> np.ndarray:
    """The vessel head's features (calciscope.model.vessel_head.vessel_features) of analysed vessels."""
    return vessel_features(np.array([[v.tile_probabilities[k] for k in labels] for v in vessels]),
                           np.array([v.geometry.outer_diameter_um for v in vessels]),
                           np.array([np.nan if v.geometry.lumen_diameter_um is None else v.geometry.lumen_diameter_um
                                     for v in vessels]),
                           np.array([v.compartment == "fat" for v in vessels]))


def flag_judged_artifacts(vessels: list[VesselRecord], threshold: float, downsample: float,
                          grow_px: float) -> list[np.ndarray]:
    """Flag ``calcium_artifact`` each vessel whose classifier artifact probability reaches ``threshold``; return the
    surroundings (outline grown by ``grow_px`` level-0 px) of those a segmenter artifact region had not flagged."""
    regions = []
    for v in vessels:
        if v.artifact_probability is None or v.artifact_probability < threshold or "calcium_artifact" in v.flags:
            continue
        v.flags.append("calcium_artifact")
        regions.append(surroundings(v.polygon, downsample, grow_px))
    return regions


def surroundings(polygon: np.ndarray, downsample: float, grow_px: float) -> np.ndarray:
    """A level-0 outline grown by ``grow_px`` (level-0 px), traced on a grid of ``downsample`` level-0 px."""
    margin = grow_px / downsample + 2
    origin = np.floor(polygon.min(axis=0) / downsample - margin)
    local = level0_to_mask_px(polygon, downsample, origin * downsample)
    h, w = (np.ceil(local.max(axis=0)) + margin + 1).astype(int)[::-1]
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [np.round(local).astype(np.int32)], 1)
    k = max(int(round(2 * grow_px / downsample)), 1) | 1
    mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return mask_px_to_level0(max(contours, key=cv2.contourArea).reshape(-1, 2), downsample, origin * downsample)


def _flag_artifacts(vessels: list[VesselRecord], artifacts: list[np.ndarray], mpp: float, near_um: float) -> None:
    for v in vessels:
        if artifacts and near_artifact(v.polygon, artifacts, mpp, near_um):
            v.flags.append("calcium_artifact")
