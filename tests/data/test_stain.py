"""Stain estimation on the real Aperio scan, Macenko normalisation, and HED stain jitter measured by deconvolution."""

import json

import numpy as np
import pytest
from helpers import read_rgb

from calciscope.data.stain import (
    REFERENCE_MAX_CONCENTRATIONS, REFERENCE_STAIN, MacenkoNormalizer, hed_jitter, hed_scale_shift, macenko_stains,
    rgb_to_hed,
)
from calciscope.errors import CalciscopeError


@pytest.fixture(scope="module")
def region(cmu_svs) -> np.ndarray:
    """A 2048² region at level 0 of the real scan (skin, H&E, some green ink)."""
    return read_rgb(cmu_svs, (0, 0), (2048, 2048))


@pytest.fixture(scope="module")
def tissue_tile(region) -> np.ndarray:
    """512² of dense tissue (both stains present)."""
    return np.ascontiguousarray(region[1000:1512, 1000:1512])


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def synthetic_he(stains: np.ndarray, size: int = 128, seed: int = 0) -> np.ndarray:
    """An image whose every pixel is a known non-negative mix of the two stains (I0 = 240)."""
    rng = np.random.default_rng(seed)
    conc = rng.gamma(2.0, 0.35, (size * size, 2)) * (rng.random((size * size, 1)) < 0.8)
    od = conc @ stains
    return np.clip(240 * np.exp(-od) - 1 + 0.5, 0, 255).astype(np.uint8).reshape(size, size, 3)


def test_macenko_on_the_real_scan_recovers_the_reference_vectors(region):
    stains, max_conc = macenko_stains(region)
    assert np.all(cosines(stains, REFERENCE_STAIN) >= 0.99)
    assert np.abs(stains - REFERENCE_STAIN).max() < 0.05
    assert stains[0, 0] > stains[1, 0]  # haematoxylin (row 0) has the larger red OD
    assert np.all(np.abs(max_conc / REFERENCE_MAX_CONCENTRATIONS - 1) < 0.2)


def test_macenko_recovers_known_stains_of_a_synthetic_mix_h_first():
    truth = np.array([[0.55, 0.75, 0.37], [0.10, 0.95, 0.30]])
    truth /= np.linalg.norm(truth, axis=1, keepdims=True)
    stains, _ = macenko_stains(synthetic_he(truth))
    assert np.all(cosines(stains, truth) > 0.998)


def test_too_few_tissue_pixels_is_a_clear_error():
    blank = np.full((64, 64, 3), 235, np.uint8)
    blank[:5, :5] = (120, 60, 150)
    with pytest.raises(CalciscopeError, match="only 25 tissue pixels"):
        macenko_stains(blank)


def restain(rgb: np.ndarray, stains: np.ndarray) -> np.ndarray:
    """``rgb`` re-rendered with other stain vectors: same H and E amounts (and off-plane residual), new colours."""
    od = -np.log((rgb.reshape(-1, 3) + 1.0) / 240)
    conc = od @ np.linalg.pinv(REFERENCE_STAIN)
    od = conc @ stains + (od - conc @ REFERENCE_STAIN)
    return np.clip(240 * np.exp(-od) - 0.5, 0, 255).astype(np.uint8).reshape(rgb.shape)


def extreme_stain_od(rgb: np.ndarray) -> np.ndarray:
    """Macenko stain vectors × max concentrations: the OD of the darkest H and E, direction and depth together."""
    stains, max_conc = macenko_stains(rgb)
    return stains * max_conc[:, None]


@pytest.mark.parametrize("alteration", ["restain", "rgb_scale", "hed"])
def test_normalising_an_altered_tile_brings_its_stains_back_to_the_target(tissue_tile, alteration):
    bluish = np.array([[0.45, 0.70, 0.55], [0.05, 0.95, 0.30]])
    altered = {
        "restain": lambda t: restain(t, bluish / np.linalg.norm(bluish, axis=1, keepdims=True)),
        "rgb_scale": lambda t: np.clip(t * np.array([0.8, 1.0, 1.15]), 0, 255).astype(np.uint8),
        "hed": lambda t: hed_scale_shift(t, [1.5, 0.6, 1.0], [0.05, -0.03, 0.0]),
    }[alteration](tissue_tile)
    normalizer = MacenkoNormalizer()
    target = normalizer.stain_matrix * normalizer.max_concentrations[:, None]
    before = np.linalg.norm(extreme_stain_od(altered) - target)
    after = np.linalg.norm(extreme_stain_od(normalizer.transform(altered)) - target)
    assert after < 0.3 * before
    assert np.all(cosines(macenko_stains(normalizer.transform(altered))[0], normalizer.stain_matrix) > 0.995)


def test_a_background_tile_passes_unchanged():
    rng = np.random.default_rng(0)
    background = rng.integers(228, 250, (224, 224, 3)).astype(np.uint8)
    background[100:110, 100:110] = (150, 80, 160)  # a speck of tissue, 0.2% of the tile
    assert np.array_equal(MacenkoNormalizer().transform(background), background)


def test_to_dict_round_trip_normalises_identically(region, tissue_tile):
    fitted = MacenkoNormalizer().fit(region[:1024, :1024])
    restored = MacenkoNormalizer.from_dict(json.loads(json.dumps(fitted.to_dict())))
    assert np.allclose(restored.stain_matrix, fitted.stain_matrix, atol=1e-6)
    out = fitted.transform(tissue_tile)
    assert out.dtype == np.uint8 and out.shape == tissue_tile.shape
    assert np.abs(restored.transform(tissue_tile).astype(int) - out).max() <= 1


def test_a_malformed_stain_target_is_refused():
    with pytest.raises(CalciscopeError, match="stain_matrix must be 2×3"):
        MacenkoNormalizer.from_dict({"stain_matrix": [[1, 0, 0]], "max_concentrations": [1, 1]})


def test_hed_scale_and_shift_are_recovered_by_deconvolution(tissue_tile):
    scale, shift = np.array([1.2, 0.85, 1.0]), np.array([0.04, -0.03, 0.0])
    out = hed_scale_shift(tissue_tile, scale, shift)
    ok = np.all((tissue_tile > 20) & (tissue_tile < 235) & (out > 20) & (out < 235), axis=2)
    before, after = rgb_to_hed(tissue_tile)[ok], rgb_to_hed(out)[ok]
    for c in (0, 1):  # H, E: least-squares fit of after = slope · before + intercept
        slope, intercept = np.polyfit(before[:, c], after[:, c], 1)
        assert slope == pytest.approx(scale[c], abs=0.02) and intercept == pytest.approx(shift[c], abs=0.01)


def test_hed_jitter_with_zero_range_is_the_identity(tissue_tile):
    assert np.array_equal(hed_jitter(tissue_tile, np.random.default_rng(0), sigma=0.0, bias=0.0), tissue_tile)



def test_reinhard_brings_an_altered_tile_to_the_target_statistics_and_round_trips(tissue_tile):
    import cv2

    from calciscope.data.stain import REFERENCE_LAB_MEAN, ReinhardNormalizer, normalizer_from_spec

    altered = hed_scale_shift(tissue_tile, [1.4, 0.7, 1.0], [0.05, -0.05, 0.0])
    out = ReinhardNormalizer().transform(altered)
    lab = cv2.cvtColor(out.astype(np.float32) / 255, cv2.COLOR_RGB2LAB).reshape(-1, 3)
    before = cv2.cvtColor(altered.astype(np.float32) / 255, cv2.COLOR_RGB2LAB).reshape(-1, 3)
    tissue = np.all(altered.reshape(-1, 3) <= 205, axis=1)
    assert np.abs(lab[tissue].mean(0) - REFERENCE_LAB_MEAN).max() < np.abs(before[tissue].mean(0)
                                                                             - REFERENCE_LAB_MEAN).max()
    spec = ReinhardNormalizer().to_dict()
    assert np.array_equal(normalizer_from_spec(spec).transform(altered), out)
    assert normalizer_from_spec("reinhard").to_dict() == spec and normalizer_from_spec(False) is None
