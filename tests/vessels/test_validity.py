"""Vessel analysis validity on phantoms from seeds never used in training (the shipped demo segmenter and model).

Bars (issue 7): detection recall and precision ≥ 0.9 at IoU 0.5, median diameter error ≤ 15 %, vessel count within
± 10 % of truth, per-vessel AUROC ≥ 0.95 for each finding, and a biopsy without subcutaneous fat reported as
insufficient sampling rather than as "no vasculitis".
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from calciscope.inference.predict import PredictConfig, Predictor
from calciscope.vessels.match import match_vessels
from calciscope.vessels.measure import shape_of
from calciscope.vessels.truth import read_vessels

ALL = {"medial_calcification": 1, "small_vessel_calcification": 1, "thrombosis": 1, "vasculitis": 1}
NONE = {k: 0 for k in ALL}
SEEDS = (8101, 8102, 8103, 8104, 8105, 8106)  # never used for the demo model or segmenter


@pytest.fixture(scope="module")
def predictor():
    return Predictor("demo", PredictConfig(workers=0, saliency="none", top_k=0))


@pytest.fixture(scope="module")
def scored(tmp_path_factory, predictor):
    """Six 2048² phantoms (four with every finding, two with none): (result, true vessels) per slide."""
    from calciscope.data.synthetic import generate_slide

    root = tmp_path_factory.mktemp("vessel_validity")
    out = []
    for i, seed in enumerate(SEEDS):
        slide = generate_slide(root, f"v{seed}", ALL if i < 4 else NONE, size_px=2048, seed=seed, artifacts=False)
        out.append((predictor.predict(slide.path), read_vessels(slide.vessels_path), slide))
    return out


def _matches(scored):
    for result, truth, slide in scored:
        found = result.vessels.vessels
        yield result, truth, slide, found, match_vessels([v.polygon for v in found], [v.polygon for v in truth],
                                                         slide.mpp)


def test_vessels_are_found_counted_and_measured(scored):
    n_pairs = n_true = n_found = 0
    errors = []
    for _, truth, slide, found, m in _matches(scored):
        n_pairs, n_true, n_found = n_pairs + len(m.pairs), n_true + m.n_true, n_found + m.n_detected
        for d, t, _ in m.pairs:
            true_d = shape_of(truth[t].polygon, slide.mpp).minor_um
            errors.append(abs(found[d].geometry.outer_diameter_um - true_d) / true_d)
    recall, precision = n_pairs / n_true, n_pairs / n_found
    assert recall >= 0.9 and precision >= 0.9, (recall, precision)
    assert abs(n_found - n_true) / n_true <= 0.1
    assert np.median(errors) <= 0.15


def test_each_finding_is_judged_per_vessel(scored, predictor):
    probs, labels = [], []
    for _, truth, _, found, m in _matches(scored):
        for d, t, _ in m.pairs:
            probs.append([found[d].probabilities[k] for k in predictor.labels])
            labels.append([k in truth[t].findings for k in predictor.labels])
    probs, labels = np.array(probs), np.array(labels)
    aurocs = {k: roc_auc_score(labels[:, j], probs[:, j]) for j, k in enumerate(predictor.labels)}
    assert all(labels[:, j].sum() >= 5 for j in range(len(predictor.labels)))
    assert min(aurocs.values()) >= 0.95, aurocs


def test_a_biopsy_without_subcutaneous_fat_is_insufficient_not_negative(tmp_path, predictor, scored):
    from calciscope.data.synthetic import generate_slide

    shallow = generate_slide(tmp_path, "shave", NONE, size_px=2048, seed=8107, artifacts=False, subcutis=False)
    result = predictor.predict(shallow.path)
    assert result.vessels.adequacy["small_fat_vessels"] == 0
    assert result.vessels.adequacy["status"] == "insufficient"
    assert result.cua["status"] == "insufficient_sampling" and "subcutaneous fat" in result.cua["reason"]
    full = [r for r, truth, _ in scored if sum(v.compartment == "fat" for v in truth) >= 6]
    assert full and all(r.cua["status"] == "scored" for r in full)
