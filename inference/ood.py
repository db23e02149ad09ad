"""Out-of-distribution checks of one slide: is it unlike the slides the networks that scored it were trained on?

Each network whose card carries an OOD reference (``model.ood``) is checked on the units it saw: the tile model on
the grid tiles, the vessel segmenter on its windows, the vessel and calcium-artifact classifiers on the vessel crops.
The features come from forward hooks while ``predict`` runs (``model.ood_features``): no extra forward pass, and no
score, probability or call of an in-distribution slide changes. A flagged slide gets:

- ``out_of_distribution`` in its QC flags (and so in ``summary.csv``), and the result's ``out_of_distribution``
  block: per network the slide score (fraction of OOD units), its threshold and the unit counts;
- a CUA-pattern status of ``not_assessable`` with the reason (never a bare negative), and the report's banner;
- its OOD tiles outlined on the heatmaps.

Vessels found on a segmenter window, or judged on a crop, farther from its network's training data than every
validation unit are flagged ``out_of_distribution`` and do not count towards sampling adequacy; a slide whose
segmenter is flagged cannot be judged for adequacy at all (``not_assessable``), so "sufficient" is never said from
vessels on tissue the segmenter does not know.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from calciscope.data.slides import Slide
from calciscope.data.tiling import TileGrid
from calciscope.data.tissue import TissueMask
from calciscope.inference.vessels import VesselAnalysis
from calciscope.model.ood import OODReference
from calciscope.model.ood_features import FeatureTap
from calciscope.model.segmenter import SegmenterCard, WindowPlan, plan_windows
from calciscope.model.vessel_classifier import calibrated

OOD_FLAG = "out_of_distribution"
BANNER = "this slide is unlike the slides the model was trained on; its scores are not reliable"
NETWORKS = ("tile_model", "segmenter", "vessel_classifier", "artifact_classifier")
WHAT = {"tile_model": "tile model", "segmenter": "vessel segmenter", "vessel_classifier": "vessel classifier",
        "artifact_classifier": "calcium-artifact classifier"}


@dataclass
class SlideFeatures:
    """The features each checked network computed on one slide, and where its units lie."""

    rows: dict[str, np.ndarray] = field(default_factory=dict)  # network -> (N, D)
    windows: np.ndarray | None = None  # (W, 2) segmenter window origins in map px, in run order
    window_step_level0: float | None = None  # a window's centre side in level-0 px
    vessel_rows: list[int] | None = None  # per listed vessel, its row of the vessel classifier's features (or -1)


@dataclass
class OODCheck:
    """The checks of one slide: per network its summary, which grid tiles and vessels are OOD, the verdict."""

    networks: dict[str, dict[str, Any]]
    tile_ood: np.ndarray | None  # (N,) bool per grid tile, None when the tile model was not checked
    flagged: bool
    details: str  # which networks flagged the slide, with their scores and thresholds ("" when none did)

    @property
    def reason(self) -> str:
        return f"{BANNER} ({self.details})" if self.flagged else ""

    def to_dict(self) -> dict[str, Any]:
        tiles = self.networks.get("tile_model", {})
        return {"status": OOD_FLAG if self.flagged else ("in_distribution" if self.checked else "not_checked"),
                "flagged": self.flagged, "reason": self.reason,
                "score": tiles.get("score"), "threshold": tiles.get("threshold"),
                "fraction_ood_tiles": tiles.get("score"), "n_ood_tiles": tiles.get("n_ood_units"),
                "networks": self.networks}

    def qc(self, qc: dict[str, Any]) -> dict[str, Any]:
        """The slide's QC values with ``out_of_distribution`` added to its flags when the slide is flagged."""
        return {**qc, "flags": [*qc.get("flags", []), OOD_FLAG]} if self.flagged else qc

    @property
    def checked(self) -> bool:
        return any("score" in s for s in self.networks.values())


class OODMonitor:
    """Taps on the networks of a ``Predictor`` that carry an OOD reference. Per slide: ``start()`` before the vessel
    stage, ``vessels_done(slide, tissue, vessels)`` after it, ``tiles_start()`` before the grid tiles stream,
    ``finish(grid, vessels)`` after them (or, with the grid tiles scored during the vessel stage,
    ``take_tile_rows()`` around each of their batches and ``finish(grid, vessels, tile_rows)``)."""

    def __init__(self, tile_backbone: torch.nn.Module | None, tile_card, vessel_stage, *, collect: bool = False):
        self.collect = collect  # tap every network, with a reference or not (to fit references: inference.fit_ood)
        self.refs: dict[str, OODReference | None] = {}
        self.taps: dict[str, FeatureTap] = {}
        self.missing: dict[str, str] = {}
        self._add("tile_model", tile_backbone, tile_card, "scored with an ONNX export, which gives no tile embeddings")
        self.seg_card: SegmenterCard | None = None
        if vessel_stage is not None and vessel_stage.segmenter is not None:
            self.seg_card = vessel_stage.segmenter[1]
            self._add("segmenter", *vessel_stage.segmenter)
        for name in ("vessel_classifier", "artifact_classifier"):
            pair = getattr(vessel_stage, name, None) if vessel_stage is not None else None
            if pair is not None:
                self._add(name, *pair, outputs=name == "vessel_classifier")
        self.features = SlideFeatures()

    def _add(self, name: str, network, card, why_not: str = "", outputs: bool = False) -> None:
        ref = card.ood() if card is not None else None
        self.refs[name] = ref
        if network is None:
            self.missing[name] = why_not
            return
        if ref is None:
            self.missing[name] = "its card has no OOD reference"
        if ref is not None or self.collect:
            self.taps[name] = FeatureTap(network, card, outputs=outputs)

    def start(self) -> None:
        for tap in self.taps.values():
            tap.clear()
        self.features = SlideFeatures()

    def vessels_done(self, slide: Slide, tissue: TissueMask, vessels: VesselAnalysis | None) -> None:
        """Keep the vessel networks' features of this slide and where their units lie."""
        f = self.features
        for name in ("segmenter", "vessel_classifier", "artifact_classifier"):
            if name in self.taps:
                f.rows[name] = self.taps[name].take()
        if self.seg_card is not None and vessels is not None:
            f.windows, step = segmenter_windows(slide, tissue, self.seg_card)
            f.window_step_level0 = step * self.seg_card.mpp / slide.mpp
        if "vessel_classifier" in self.taps and vessels is not None:
            card = self.taps["vessel_classifier"].card
            logits = self.taps["vessel_classifier"].take_outputs()
            probs = calibrated(logits, card) if len(logits) else logits
            f.vessel_rows = match_rows(vessels, probs, list(card.outputs))

    def tiles_start(self) -> None:
        """The grid tiles come next (the tile model may have scored vessel tiles before)."""
        if "tile_model" in self.taps:
            self.taps["tile_model"].clear()

    def take_tile_rows(self) -> np.ndarray | None:
        """The tile model's feature rows since the last call, cleared (None without a tap): for grid tiles scored in
        batches between the vessel networks' calls (``inference.tile_scoring.WindowTiles``)."""
        tap = self.taps.get("tile_model")
        if tap is None:
            return None
        rows = tap.take()
        tap.clear()
        return rows

    def finish(self, grid: TileGrid, vessels: VesselAnalysis | None, tile_rows: np.ndarray | None = None) -> OODCheck:
        """The slide's check; ``tile_rows``: the grid tiles' feature rows in grid order, when they were gathered
        apart (else the tile model's tap holds them, from ``tiles_start``)."""
        if tile_rows is not None:
            self.features.rows["tile_model"] = tile_rows
        elif "tile_model" in self.taps:
            self.features.rows["tile_model"] = self.taps["tile_model"].take()
        return check(self.refs, self.features, grid, vessels, self.missing)

    def close(self) -> None:
        for tap in self.taps.values():
            tap.close()


def check(refs: dict[str, OODReference | None], features: SlideFeatures, grid: TileGrid | None,
          vessels: VesselAnalysis | None, missing: dict[str, str]) -> OODCheck:
    """Score each network's units against its reference, flag the OOD vessels, and give the slide's verdict."""
    networks: dict[str, dict[str, Any]] = {}
    unit_ood: dict[str, np.ndarray] = {}  # beyond the unit threshold (1 % of validation units): counted, drawn
    unit_far: dict[str, np.ndarray] = {}  # beyond every validation unit: what flags a vessel
    for name in NETWORKS:
        ref = refs.get(name)
        rows = features.rows.get(name)
        if name not in refs:
            continue
        if ref is None or rows is None:
            networks[name] = {"status": "not_checked", "reason": missing.get(name, "it did not run on this slide")}
            continue
        if len(rows) and rows.shape[1] != ref.dim:
            networks[name] = {"status": "not_checked", "reason": f"its features have {rows.shape[1]} dimensions, "
                                                                 f"its reference {ref.dim}"}
            continue
        distances = ref.distances(rows) if len(rows) else np.zeros(0)
        unit_ood[name] = distances > ref.unit_threshold
        unit_far[name] = distances > ref.farthest
        summary = ref.summary(distances)
        networks[name] = {"status": OOD_FLAG if summary["flagged"] else "in_distribution", **summary}
    tile_ood = unit_ood.get("tile_model")
    if tile_ood is not None and grid is not None and len(tile_ood) != len(grid):
        networks["tile_model"] = {"status": "not_checked",
                                  "reason": f"{len(tile_ood)} tile embeddings for {len(grid)} tiles"}
        tile_ood = None
    if vessels is not None:
        _flag_vessels(vessels, features, unit_far, networks)
    flagged_by = [n for n, s in networks.items() if s.get("flagged")]
    details = "; ".join(f"{WHAT[n]}: {networks[n]['score']:.0%} of its {networks[n]['unit']}s unlike its training "
                        f"data, threshold {networks[n]['threshold']:.0%}" for n in flagged_by)
    return OODCheck(networks, tile_ood, bool(flagged_by), details)


def _flag_vessels(vessels: VesselAnalysis, features: SlideFeatures, unit_far: dict[str, np.ndarray],
                  networks: dict[str, dict[str, Any]]) -> None:
    """Flag the vessels whose segmenter window or classifier crop is farther from the network's training data than
    every validation unit (so an in-distribution slide almost never has one: 0.2-0.5 % of vessels on unseen phantoms);
    restate adequacy without them."""
    on_unknown = np.zeros(len(vessels.vessels), bool)
    windows = unit_far.get("segmenter")
    if windows is not None and features.windows is not None:
        if len(features.windows) == len(windows):
            on_unknown |= _on_windows(vessels, features.windows, windows, features.window_step_level0)
        else:
            networks["segmenter"]["vessels_attributed"] = False
    crops = unit_far.get("vessel_classifier")
    if crops is not None and features.vessel_rows is not None:
        rows = np.asarray(features.vessel_rows, int)
        known = rows >= 0
        on_unknown[known] |= crops[rows[known]]
    artifact = unit_far.get("artifact_classifier")
    if artifact is not None and len(artifact) == len(vessels.vessels):
        on_unknown |= artifact
    for v, bad in zip(vessels.vessels, on_unknown):
        if bad and OOD_FLAG not in v.flags:
            v.flags.append(OOD_FLAG)
    seg = networks.get("segmenter", {})
    if seg.get("flagged") or (on_unknown & _small_fat(vessels)).any():  # else the statement stands as it is
        vessels.adequacy = restate_adequacy(vessels, on_unknown, seg)


def _small_fat(vessels: VesselAnalysis) -> np.ndarray:
    """Per vessel, whether adequacy counts it: a small vessel of the subcutaneous fat."""
    small_max = vessels.adequacy["small_max_um"]
    return np.array([v.compartment == "fat" and v.geometry.outer_diameter_um < small_max for v in vessels.vessels],
                    bool)


def restate_adequacy(vessels: VesselAnalysis, on_unknown: np.ndarray, segmenter: dict[str, Any]) -> dict[str, Any]:
    """The adequacy statement without the vessels on tissue the vessel networks do not know."""
    a = dict(vessels.adequacy)
    small = _small_fat(vessels)
    excluded = int((small & on_unknown).sum())
    a["small_fat_vessels"] = int((small & ~on_unknown).sum())
    a["small_fat_vessels_out_of_distribution"] = excluded
    if segmenter.get("flagged"):
        a["status"] = "not_assessable"
        a["reason"] = (f"the vessel segmenter does not know this tissue ({segmenter['score']:.0%} of its windows are "
                       f"unlike its training data, threshold {segmenter['threshold']:.0%}): the vessels it found here "
                       f"cannot show whether the small vessels of the subcutaneous fat were sampled")
        return a
    sufficient = a["small_fat_vessels"] >= a["min_small_fat_vessels"]
    a["status"] = "sufficient" if sufficient else "insufficient"
    a["reason"] = (f"{a['small_fat_vessels']} small vessel(s) (< {a['small_max_um']:g} µm) in subcutaneous fat seen on "
                   f"tissue the vessel networks know ({excluded} more on tissue they do not know, not counted); at "
                   f"least {a['min_small_fat_vessels']} are needed to judge the small vessels (and to call vasculitis "
                   f"absent)")
    return a


def _on_windows(vessels: VesselAnalysis, origins: np.ndarray, ood: np.ndarray, step0: float) -> np.ndarray:
    """Per vessel, whether its centroid lies in an OOD window's centre (the part of the maps the window made)."""
    cells = {(int(x), int(y)): bool(bad) for (x, y), bad in zip(np.asarray(origins), ood)}
    step = WindowPlan.step
    out = np.zeros(len(vessels.vessels), bool)
    for i, v in enumerate(vessels.vessels):
        cx, cy = v.centroid
        key = (int(cx // step0) * step, int(cy // step0) * step)
        out[i] = cells.get(key, False)
    return out


def segmenter_windows(slide: Slide, tissue: TissueMask | None, card: SegmenterCard) -> tuple[np.ndarray, int]:
    """((W, 2) origins in map px of the windows the segmenter runs on ``slide``, in the order it runs them; the step
    between windows in map px): ``model.segmenter.plan_windows``, the one plan the segmenter follows."""
    plan = plan_windows(slide, card, tissue)
    return np.array(plan.windows(), np.int64).reshape(-1, 2), plan.step


def match_rows(vessels: VesselAnalysis, probabilities: np.ndarray, outputs: list[str]) -> list[int]:
    """Per listed vessel, the row of the vessel classifier's (N, outputs) calibrated probabilities it was judged
    with (-1: not found).

    The classifier judges every outline (vessels, then candidates) and the listing keeps a subsequence of them in
    order, so each listed vessel is the next row whose probabilities are the ones it carries."""
    out, row = [], 0
    labels = list(vessels.labels)
    if not set(labels) <= set(outputs):
        return [-1] * len(vessels.vessels)
    columns = [outputs.index(k) for k in labels]
    for v in vessels.vessels:
        want = np.array([v.probabilities.get(k, np.nan) for k in labels])
        while row < len(probabilities) and not np.array_equal(probabilities[row, columns], want):
            row += 1
        out.append(row if row < len(probabilities) else -1)
        row += 1
    return out


def ood_section(check: OODCheck | None) -> dict[str, Any]:
    """The report's plain values: the banner, and a row per network with what its check found."""
    if check is None:
        return {"flagged": False, "rows": [], "marked": False}
    rows, rates = [], []
    for name, s in check.networks.items():
        if "score" not in s:
            rows.append({"network": WHAT[name], "units": "-", "score": "-", "threshold": "-", "flagged": False,
                         "status": f"not checked: {s.get('reason', '')}"})
            continue
        rates.append(s["unit_false_alarm"])
        rows.append({"network": WHAT[name], "units": f"{s['n_units']} {s['unit']}s",
                     "score": f"{s['n_ood_units']} ({s['score']:.0%})", "threshold": f"{s['threshold']:.0%}",
                     "flagged": s["flagged"], "status": "out of distribution" if s["flagged"] else "in distribution"})
    return {"flagged": check.flagged, "banner": BANNER, "details": check.details, "rows": rows,
            "unit_false_alarm": f"{max(rates):.0%}" if rates else "-",
            "marked": check.tile_ood is not None and bool(check.tile_ood.any())}
