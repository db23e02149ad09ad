"""Domain randomisation of the phantom (style "random"): one slide's *look*, drawn once per slide.

A look says which appearance each finding takes on this slide and how it is textured and coloured, so that a
model trained on many slides sees every finding in the several ways real tissue shows it (DESIGN.md, "The
phantom"), not one way of drawing it. Appearance families (names recorded in the GeoJSON ``appearance``
properties):

- calcium (medial and small-vessel): CALCIUM_TEXTURES x CALCIUM_SITES; extravascular: PERIADIPOCYTIC;
- thrombus: THROMBUS_LOOKS; vasculitis: VASCULITIS_LOOKS;
- confounders in every slide: ARTERIOLOSCLEROSIS (the Moenckeberg-like medial calcinosis only in slides without
  calcification), DEBRIS_LOOKS, CUFF_LOOKS, red-cell-packed venules.

A slide favours a few appearances (Dirichlet weights over each family), as one case tends to. The look comes from
a random stream of its own (LOOK_STREAM), so where vessels and lesions go is the same as in the classic style.
"""

from __future__ import annotations

import numpy as np

from calciscope.data.phantom.stain import E_OD, H_OD

STYLES = ("random", "classic")
LOOK_STREAM = 0x100C  # spawn-key word of the look's random stream (see scene.build_scene)

CALCIUM_TEXTURES = ("stippled", "granular", "plate", "ring", "nodular")
CALCIUM_SITES = ("medial", "intimal", "mural")  # media of arterioles; intima under fibroplasia; whole thin wall
PERIADIPOCYTIC = ("membrane", "beaded", "lacy")
THROMBUS_LOOKS = ("fresh", "layered", "organising", "fibrin")
VASCULITIS_LOOKS = ("leukocytoclastic", "fibrinoid", "lymphocytic")
ARTERIOLOSCLEROSIS = ("hyaline", "hypertrophic", "monckeberg")
DEBRIS_LOOKS = ("granular", "floater", "precipitate", "karyorrhectic")
CUFF_LOOKS = ("lymphocytic", "lymphoplasmacytic", "histiocytic")

# Spread of the Macenko stain vectors between 512 x 512 regions of the real scan tests/fixtures/CMU-1-Small-Region.svs
# (31 regions, data.stain.macenko_stains): sd per component H (0.044, 0.035, 0.024), E (0.051, 0.026, 0.063); of the
# 99th-percentile concentrations H 0.55 (16 %), E 0.67 (28 %). Between laboratories and scanners stains vary more
# than within one scan, so a slide's vectors are jittered by up to 1.5x that spread and its strengths by up to 45 %.
STAIN_SD = 0.05
# Calcium on H&E is haematoxyphilic but not haematoxylin: deep purple to blue-black, sometimes lilac. Part of a
# slide's calcium density is drawn with this vector (more red and green absorbed than haematoxylin: darker, bluer).
CALC_OD = np.array([0.70, 0.66, 0.27], dtype=np.float32) / np.linalg.norm([0.70, 0.66, 0.27])


def _weights(rng: np.random.Generator, names: tuple[str, ...], concentration: float) -> dict[str, float]:
    w = rng.dirichlet(np.full(len(names), concentration))
    return dict(zip(names, (float(x) for x in w)))


def pick(rng: np.random.Generator, weights: dict[str, float], allowed=None) -> str:
    """One name, drawn by the slide's weights (restricted to `allowed`, renormalised, when given)."""
    names = [k for k in weights if allowed is None or k in allowed]
    p = np.array([weights[k] for k in names]) + 1e-3
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.clip(v, 0.02, None)
    return (v / np.linalg.norm(v)).astype(np.float32)


def draw_look(rng: np.random.Generator) -> dict:
    """The appearance of one slide: family weights, texture scales (um), colours, stain and confounder rates."""
    return {
        "calcium": _weights(rng, CALCIUM_TEXTURES, 0.6),
        "calcium_intimal_p": float(rng.uniform(0.1, 0.45)),  # share of medial deposits placed in the intima
        "periadipocytic": _weights(rng, PERIADIPOCYTIC, 0.8),
        "thrombus": _weights(rng, THROMBUS_LOOKS, 0.7),
        "vasculitis": _weights(rng, VASCULITIS_LOOKS, 0.7),
        "arteriolosclerosis": _weights(rng, ARTERIOLOSCLEROSIS, 1.0),
        "debris": _weights(rng, DEBRIS_LOOKS, 1.0),
        "cuff": _weights(rng, CUFF_LOOKS, 1.0),
        "grain_um": float(rng.uniform(0.7, 1.5)),  # calcium granule size scale
        "calc_value": float(rng.uniform(0.65, 1.35)),  # calcium darkness scale
        "calc_mix": float(rng.uniform(0.0, 0.7)),  # share of calcium density drawn with the calcium vector
        "calc_e": float(rng.uniform(0.0, 0.35)),  # eosin taken up by calcium (lilac when high)
        "crack_um": float(rng.uniform(0.8, 2.5)),  # width of fracture lines in plates
        "sclerosis_p": float(rng.uniform(0.1, 0.45)),  # share of normal arterioles with arteriolosclerosis
        "monckeberg_p": float(rng.uniform(0.1, 0.6)),  # share of arteries >= 60 um, in slides without calcification
        "packed_p": float(rng.uniform(0.1, 0.45)),  # share of normal venules packed with red cells
        "cell_density": float(rng.uniform(0.6, 1.4)),  # inflammatory cell density scale
        "rbc_value": float(rng.uniform(1.3, 2.2)),  # red-cell eosin density
        "fibrin_value": float(rng.uniform(1.0, 1.9)),  # fibrin / fibrinoid eosin density
    }


def randomise_style(style: dict, look: dict, rng: np.random.Generator) -> dict:
    """The slide's stain style with wider, measured jitter (STAIN_SD) and the calcium colour of its look."""
    out = dict(style, calc_mix=look["calc_mix"], calc_e=look["calc_e"])
    out["h_vec"] = _unit(H_OD + rng.normal(0, STAIN_SD, 3))
    out["e_vec"] = _unit(E_OD + rng.normal(0, STAIN_SD, 3))
    out["h_scale"] = float(rng.uniform(0.6, 1.45))
    out["e_scale"] = float(rng.uniform(0.55, 1.45))
    out["calc_vec"] = _unit(CALC_OD + rng.normal(0, 0.06, 3))
    return out
