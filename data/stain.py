"""H&E stain handling: Macenko stain estimation and normalisation, Reinhard colour normalisation, and HED stain
augmentation.

Optical density (OD) here is natural-log absorbance, ``OD = -ln((I + 1) / I0)`` per RGB channel, with ``I0`` the
brightness of clear glass (240 for Macenko, as in the original method; 256 for the HED round trip, so that an
unchanged tile comes back bit-exact). A stain is a unit OD vector (R, G, B); a pixel's OD is a non-negative mix.

    normalizer = MacenkoNormalizer()                 # target: the reference stains of a real Aperio scan
    tile = normalizer.transform(tile)                # the tile's stains mapped onto the target's
    card_extra["stain"] = normalizer.to_dict()       # ... and MacenkoNormalizer.from_dict() at inference

    normalizer_from_spec(card.extra["stain_normalize"])   # what a training config or card names, or None

Cost per 224² tile on one core (vectorised numpy, OD from a 256-entry table): ``MacenkoNormalizer.transform``
≈ 2 ms, ``ReinhardNormalizer.transform`` ≈ 1 ms, ``hed_jitter`` ≈ 0.5 ms.
"""

from __future__ import annotations

import cv2
import numpy as np

from calciscope.errors import CalciscopeError

# H and E OD unit vectors (rows; R, G, B) measured by Macenko on all of level 0 of the real Aperio scan
# tests/fixtures/CMU-1-Small-Region.svs (0.499 µm/px), the vectors the synthetic phantoms are drawn with;
# macenko_stains on that scan gives them within 0.025 per component.
REFERENCE_STAIN = np.array([[0.6284, 0.6900, 0.3591],
                            [0.1841, 0.9105, 0.3704]])
# 99th percentile of the H and E concentrations of that scan's tissue pixels (macenko_stains, default settings).
REFERENCE_MAX_CONCENTRATIONS = np.array([3.58, 2.31])

# Ruifrok & Johnston 2001 stain vectors (rows: haematoxylin, eosin, DAB), normalised to unit length.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29],
                         [0.07, 0.99, 0.11],
                         [0.27, 0.57, 0.78]])
RGB_FROM_HED = RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)

# Reinhard target: mean and SD of CIE L*a*b* (OpenCV, float RGB in [0, 1]) over the tissue pixels of that scan
REFERENCE_LAB_MEAN = np.array([41.758, 29.222, -14.44])
REFERENCE_LAB_STD = np.array([16.118, 11.919, 9.166])

MIN_TISSUE_PIXELS = 100  # fewer than this: stains cannot be estimated
_HED_I0 = 256.0
_HED_OD_LUT = (-np.log((np.arange(256) + 1.0) / _HED_I0)).astype(np.float32)


def od_table(background: float = 240.0) -> np.ndarray:
    """OD of each uint8 value, ``-ln((I + 1) / background)`` (float32, 256 entries)."""
    return (-np.log((np.arange(256) + 1.0) / float(background))).astype(np.float32)


def macenko_stains(rgb: np.ndarray, *, od_threshold: float = 0.15, alpha: float = 1.0, background: float = 240,
                   drop_ink: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Macenko et al. 2009 stain estimate of an RGB uint8 image: (stain_matrix (2, 3) rows H then E, max conc. (2,)).

    Tissue pixels have OD ≥ ``od_threshold`` in every channel (and, with ``drop_ink``, G ≤ R: a pixel greener than
    red absorbs more red than any H&E mix does, e.g. green marker ink). Their OD is projected onto the plane of the
    two main eigenvectors of its covariance; the ``alpha`` and ``100 - alpha`` percentile angles there are the two
    stains. Haematoxylin is the one with the larger red OD component (the usual convention: it absorbs red, eosin
    hardly does). Max concentrations are the 99th percentiles of the tissue pixels' H and E concentrations.
    """
    rgb = _as_rgb(rgb)
    planar = _planar(rgb)
    tissue = _tissue_index(planar, od_threshold, background, drop_ink)
    if len(tissue) < MIN_TISSUE_PIXELS:
        raise CalciscopeError(f"Macenko stain estimate: only {len(tissue)} tissue pixels (OD ≥ {od_threshold} in "
                              f"every channel) in a {rgb.shape[1]}×{rgb.shape[0]} image; at least {MIN_TISSUE_PIXELS} "
                              "are needed")
    od_tissue = np.take(od_table(background), planar.take(tissue, axis=1))
    stains = _stain_vectors(od_tissue, alpha)
    return stains, _percentile99(np.linalg.pinv(stains).T.astype(np.float32) @ od_tissue)


class MacenkoNormalizer:
    """Maps a tile's H and E stains (Macenko estimate per tile) onto a target's stain vectors and max concentrations.

    The default target is the reference scan (``REFERENCE_STAIN``, ``REFERENCE_MAX_CONCENTRATIONS``); :meth:`fit`
    takes it from a target image instead. A tile with too little tissue (below ``min_tissue_fraction`` of its pixels,
    or fewer than ``MIN_TISSUE_PIXELS``), or whose two estimated stains are nearly parallel (one stain only, e.g.
    a tile of pure collagen), comes back unchanged: there is nothing reliable to map.
    """

    def __init__(self, stain_matrix=REFERENCE_STAIN, max_concentrations=REFERENCE_MAX_CONCENTRATIONS, *,
                 od_threshold: float = 0.15, alpha: float = 1.0, background: float = 240,
                 min_tissue_fraction: float = 0.05):
        self.stain_matrix = np.asarray(stain_matrix, dtype=np.float64).reshape(2, 3)
        self.max_concentrations = np.asarray(max_concentrations, dtype=np.float64).reshape(2)
        self.od_threshold = float(od_threshold)
        self.alpha = float(alpha)
        self.background = float(background)
        self.min_tissue_fraction = float(min_tissue_fraction)
        self._od = od_table(self.background)

    def fit(self, rgb: np.ndarray) -> MacenkoNormalizer:
        """Take the target stains and max concentrations from ``rgb`` (a representative H&E region)."""
        self.stain_matrix, self.max_concentrations = macenko_stains(
            rgb, od_threshold=self.od_threshold, alpha=self.alpha, background=self.background)
        return self

    def transform(self, rgb: np.ndarray) -> np.ndarray:
        """The tile (uint8 HWC RGB) with its stains replaced by the target's; same shape and dtype."""
        rgb = _as_rgb(rgb)
        planar = _planar(rgb)
        tissue = _tissue_index(planar, self.od_threshold, self.background, True)
        if len(tissue) < max(MIN_TISSUE_PIXELS, self.min_tissue_fraction * planar.shape[1]):
            return rgb
        od = np.take(self._od, planar)  # (3, N)
        od_tissue = od.take(tissue, axis=1)
        stains = _stain_vectors(od_tissue, self.alpha)
        if stains[0] @ stains[1] > np.cos(np.deg2rad(10.0)):
            return rgb
        to_conc = np.linalg.pinv(stains).T.astype(np.float32)  # (2, 3)
        tile_max = _percentile99(to_conc @ od_tissue)
        if np.any(tile_max <= 1e-3):
            return rgb
        # OD -> concentrations -> scaled to the target's range -> target OD, as one (3, 3) matrix
        mapping = self.stain_matrix.T @ (to_conc * (self.max_concentrations / tile_max)[:, None])
        return _od_to_rgb(mapping.astype(np.float32) @ od, self.background, rgb.shape)

    __call__ = transform

    def to_dict(self) -> dict:
        """JSON-serialisable target and settings (stored in the model card so inference normalises identically)."""
        return {"method": "macenko", "stain_matrix": np.round(self.stain_matrix, 6).tolist(),
                "max_concentrations": np.round(self.max_concentrations, 6).tolist(),
                "od_threshold": self.od_threshold, "alpha": self.alpha, "background": self.background,
                "min_tissue_fraction": self.min_tissue_fraction}

    @classmethod
    def from_dict(cls, data: dict) -> MacenkoNormalizer:
        if not isinstance(data, dict) or data.get("method", "macenko") != "macenko":
            raise CalciscopeError(f"stain normaliser: expected a Macenko target mapping, got {data!r:.80}")
        try:
            stains = np.asarray(data["stain_matrix"], dtype=np.float64)
            max_conc = np.asarray(data["max_concentrations"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as exc:
            raise CalciscopeError(f"stain normaliser: missing or malformed stain_matrix / max_concentrations ({exc})"
                                  ) from exc
        if stains.shape != (2, 3) or max_conc.shape != (2,):
            raise CalciscopeError(f"stain normaliser: stain_matrix must be 2×3 and max_concentrations 2 values, got "
                                  f"{stains.shape} and {max_conc.shape}")
        settings = {k: data[k] for k in ("od_threshold", "alpha", "background", "min_tissue_fraction") if k in data}
        return cls(stains, max_conc, **settings)

    def __repr__(self) -> str:
        return f"MacenkoNormalizer(stain_matrix={self.stain_matrix.round(4).tolist()}, " \
               f"max_concentrations={self.max_concentrations.round(3).tolist()})"


class ReinhardNormalizer:
    """Reinhard et al. 2001 colour transfer: the tile's tissue pixels get the target's mean and SD of CIE L*a*b*.

    Statistics come from the tissue pixels (OD ≥ ``od_threshold`` in every channel, as Macenko's); background stays
    as it is. The default target is the reference scan's; a tile with too little tissue comes back unchanged.
    """

    def __init__(self, lab_mean=REFERENCE_LAB_MEAN, lab_std=REFERENCE_LAB_STD, *, od_threshold: float = 0.15,
                 background: float = 240, min_tissue_fraction: float = 0.05):
        self.lab_mean = np.asarray(lab_mean, dtype=np.float64).reshape(3)
        self.lab_std = np.asarray(lab_std, dtype=np.float64).reshape(3)
        self.od_threshold, self.background = float(od_threshold), float(background)
        self.min_tissue_fraction = float(min_tissue_fraction)

    def fit(self, rgb: np.ndarray) -> ReinhardNormalizer:
        """Take the target statistics from ``rgb`` (a representative H&E region)."""
        lab, tissue = self._lab_tissue(_as_rgb(rgb))
        if len(tissue) < MIN_TISSUE_PIXELS:
            raise CalciscopeError(f"Reinhard target: only {len(tissue)} tissue pixels; at least {MIN_TISSUE_PIXELS} "
                                  "are needed")
        self.lab_mean, self.lab_std = lab[tissue].mean(0), lab[tissue].std(0) + 1e-6
        return self

    def transform(self, rgb: np.ndarray) -> np.ndarray:
        rgb = _as_rgb(rgb)
        lab, tissue = self._lab_tissue(rgb)
        if len(tissue) < max(MIN_TISSUE_PIXELS, self.min_tissue_fraction * len(lab)):
            return rgb
        values = lab[tissue]
        mapped = (values - values.mean(0)) / (values.std(0) + 1e-6) * self.lab_std + self.lab_mean
        lab[tissue] = mapped.astype(np.float32)
        out = cv2.cvtColor(lab.reshape(rgb.shape), cv2.COLOR_LAB2RGB)
        return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)

    __call__ = transform

    def _lab_tissue(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lab = cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB).reshape(-1, 3)
        return lab, _tissue_index(_planar(rgb), self.od_threshold, self.background, False)

    def to_dict(self) -> dict:
        return {"method": "reinhard", "lab_mean": np.round(self.lab_mean, 4).tolist(),
                "lab_std": np.round(self.lab_std, 4).tolist(), "od_threshold": self.od_threshold,
                "background": self.background, "min_tissue_fraction": self.min_tissue_fraction}

    @classmethod
    def from_dict(cls, data: dict) -> ReinhardNormalizer:
        try:
            mean, std = (np.asarray(data[k], dtype=np.float64) for k in ("lab_mean", "lab_std"))
        except (KeyError, TypeError, ValueError) as exc:
            raise CalciscopeError(f"stain normaliser: missing or malformed lab_mean / lab_std ({exc})") from None
        if mean.shape != (3,) or std.shape != (3,) or np.any(std <= 0):
            raise CalciscopeError(f"stain normaliser: lab_mean and lab_std must be 3 values (std > 0), got "
                                  f"{mean.shape} and {std.shape}")
        settings = {k: data[k] for k in ("od_threshold", "background", "min_tissue_fraction") if k in data}
        return cls(mean, std, **settings)


def normalizer_from_spec(spec) -> MacenkoNormalizer | ReinhardNormalizer | None:
    """The normaliser a training config (``data.stain_normalize``) or a card (``extra.stain_normalize``) names:
    False / None / "none" → None; True / "macenko" → Macenko to the reference; "reinhard" → Reinhard to the
    reference; a mapping (``to_dict()``) → that normaliser; anything else is one error line."""
    if spec is None or spec is False or spec == "none":
        return None
    if spec is True or spec == "macenko":
        return MacenkoNormalizer()
    if spec == "reinhard":
        return ReinhardNormalizer()
    if isinstance(spec, (MacenkoNormalizer, ReinhardNormalizer)):
        return spec
    if isinstance(spec, dict) and spec.get("method") == "reinhard":
        return ReinhardNormalizer.from_dict(spec)
    if isinstance(spec, dict):
        return MacenkoNormalizer.from_dict(spec)
    raise CalciscopeError(f"stain_normalize: expected false, true, 'macenko', 'reinhard' or a stain target mapping, "
                          f"got {spec!r:.80}")


def hed_jitter(rgb: np.ndarray, rng: np.random.Generator, sigma: float = 0.05, bias: float = 0.05) -> np.ndarray:
    """H&E stain augmentation (Tellez et al. 2018): each HED concentration ``c → c·(1 + U(±sigma)) + U(±bias)``.

    Concentrations from Ruifrok–Johnston colour deconvolution of natural-log OD (``bias`` is in those OD units).
    """
    scale = 1.0 + rng.uniform(-sigma, sigma, 3)
    shift = rng.uniform(-bias, bias, 3)
    return hed_scale_shift(rgb, scale, shift)


def hed_scale_shift(rgb: np.ndarray, scale, shift) -> np.ndarray:
    """``rgb`` with HED concentrations scaled by ``scale`` (3,) and shifted by ``shift`` (3,); uint8 like the input."""
    rgb = _as_rgb(rgb)
    # OD' = ((OD · HED_FROM_RGB) · diag(scale) + shift) · RGB_FROM_HED  ==  OD · A + d  (row vectors)
    a = (HED_FROM_RGB * np.asarray(scale, dtype=np.float64)) @ RGB_FROM_HED
    d = np.asarray(shift, dtype=np.float64) @ RGB_FROM_HED
    od = a.T.astype(np.float32) @ np.take(_HED_OD_LUT, _planar(rgb))
    od += d.astype(np.float32)[:, None]
    return _od_to_rgb(od, _HED_I0, rgb.shape)


def rgb_to_hed(rgb: np.ndarray) -> np.ndarray:
    """HED concentrations (float32, H × W × 3) by Ruifrok–Johnston deconvolution of natural-log OD."""
    rgb = _as_rgb(rgb)
    return np.take(_HED_OD_LUT, rgb) @ HED_FROM_RGB.astype(np.float32)


# -- helpers ---------------------------------------------------------------------------------------------------
def _as_rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise CalciscopeError(f"stain: expected an RGB uint8 image (H, W, 3), got {rgb.dtype} {rgb.shape}")
    return rgb


def _planar(rgb: np.ndarray) -> np.ndarray:
    """(3, H·W) uint8: one contiguous row per channel, so per-channel numpy work runs on contiguous memory."""
    return np.ascontiguousarray(rgb.reshape(-1, 3).T)


def _tissue_index(planar: np.ndarray, od_threshold: float, background: float, drop_ink: bool) -> np.ndarray:
    """Indices of pixels with OD ≥ ``od_threshold`` in every channel (compared in uint8: I ≤ I0·exp(-t) - 1)."""
    cutoff = int(np.floor(background * np.exp(-od_threshold) - 1.0))
    r, g, b = planar
    tissue = (r <= cutoff) & (g <= cutoff) & (b <= cutoff)
    if drop_ink:
        tissue &= g <= r
    return np.flatnonzero(tissue)


def _stain_vectors(od_tissue: np.ndarray, alpha: float) -> np.ndarray:
    """Macenko's two extreme stain directions in the main OD plane of ``od_tissue`` (3, n); rows (H, E), unit length."""
    n = od_tissue.shape[1]
    mean = od_tissue.mean(axis=1, dtype=np.float64)
    second = np.array([[np.dot(od_tissue[i], od_tissue[j]) for j in range(3)] for i in range(3)], dtype=np.float64)
    _, vectors = np.linalg.eigh((second - n * np.outer(mean, mean)) / max(n - 1, 1))
    plane = vectors[:, [2, 1]]  # largest eigenvalue first
    plane *= np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # eigenvector signs are arbitrary
    projected = plane.T.astype(np.float32) @ od_tissue
    angles = np.arctan2(projected[1], projected[0])
    lo, hi = np.percentile(angles, [alpha, 100.0 - alpha])
    v_lo = plane @ np.array([np.cos(lo), np.sin(lo)])
    v_hi = plane @ np.array([np.cos(hi), np.sin(hi)])
    stains = np.stack([v_lo, v_hi] if v_lo[0] > v_hi[0] else [v_hi, v_lo])
    stains *= np.where(stains.sum(axis=1, keepdims=True) < 0, -1.0, 1.0)
    return stains / np.linalg.norm(stains, axis=1, keepdims=True)


def _od_to_rgb(od: np.ndarray, i0: float, shape: tuple) -> np.ndarray:
    """(3, N) OD → uint8 image of ``shape``: I = I0·exp(-OD) - 1, rounded and clipped."""
    np.exp(-od, out=od)
    od *= i0
    od -= 0.5
    np.clip(od, 0, 255, out=od)
    return np.ascontiguousarray(od.astype(np.uint8).T).reshape(shape)


def _percentile99(concentrations: np.ndarray) -> np.ndarray:
    """99th percentile of each row of (2, n) concentrations."""
    return np.array([np.percentile(row, 99) for row in concentrations], dtype=np.float64)
