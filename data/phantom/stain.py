"""Stain and ink absorbance vectors, and the random stain / scanner style of one phantom slide.

Measured numbers live here so the renderer and the tests share them (Beer-Lambert: RGB = white * exp(-OD)).
"""

from __future__ import annotations

import numpy as np

# Stain optical-density unit vectors (R, G, B), estimated here with Macenko's method (Macenko et al. 2009:
# OD threshold 0.15 on every channel, 1st/99th percentile angles in the plane of the two main eigenvectors)
# on all of level 0 of the real Aperio scan shared/fixtures/CMU-1-Small-Region.svs (0.499 um/px), after
# dropping green-ink pixels (G > R). Concentrations there: median H 0.63, E 0.69; 99th percentile H 3.5, E 2.3.
H_OD = np.array([0.6284, 0.6900, 0.3591], dtype=np.float32)
E_OD = np.array([0.1841, 0.9105, 0.3704], dtype=np.float32)
# Mean residual of those pixels off the H-E plane per unit of total stain (H + E): real tissue absorbs a
# little more blue than the two vectors explain.
RESID_OD = np.array([-0.0136, -0.0318, 0.0848], dtype=np.float32)
# Marker inks (absorbance per unit density), from typical RGB of green / blue / black ink on glass.
INK_OD = {
    "green": np.array([1.45, 0.55, 0.95], dtype=np.float32),
    "blue": np.array([1.60, 1.20, 0.45], dtype=np.float32),
    "black": np.array([1.70, 1.70, 1.60], dtype=np.float32),
}


def draw_style(rng: np.random.Generator) -> dict:
    """One slide's stain and scanner style: jittered stain vectors, stain strengths, white point, glass
    absorbance, fold darkening, marker ink and JPEG quality."""

    def jitter(vec):
        v = np.clip(vec + rng.normal(0, 0.025, 3), 0.02, None)
        return (v / np.linalg.norm(v)).astype(np.float32)

    white = np.clip(255 * rng.uniform(0.93, 1.0) * (1 + rng.normal(0, 0.012, 3)), 200, 255)
    ink = ("green", "blue", "black")[int(rng.choice(3, p=[0.45, 0.35, 0.2]))]
    return {"h_vec": jitter(H_OD), "e_vec": jitter(E_OD), "h_scale": rng.uniform(0.75, 1.3),
            "e_scale": rng.uniform(0.7, 1.3), "white": white.astype(np.float32),
            "glass_od": np.clip(rng.uniform(0.01, 0.05) + rng.normal(0, 0.008, 3), 0, None).astype(np.float32),
            "fold_gain": rng.uniform(0.7, 1.0), "ink": INK_OD[ink], "ink_name": ink,
            "jpeg_quality": int(rng.integers(80, 93))}
