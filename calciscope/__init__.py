"""calciscope: CNN scoring of biopsy whole-slide images for the calciphylaxis pattern.

Decision support for pathologists, never a diagnosis.

    import calciscope
    result = calciscope.predict_slide("biopsy.svs", model="demo", out="results/")
"""

from __future__ import annotations

from typing import Any

from calciscope._version import __version__

__all__ = ["__version__", "predict_slide", "Predictor", "PredictConfig", "SlideResult"]


def __getattr__(name: str) -> Any:
    # the inference API imports torch; keep ``import calciscope`` (and ``calciscope --help``) light
    if name in ("predict_slide", "Predictor", "PredictConfig", "SlideResult"):
        from calciscope.inference import predict

        return getattr(predict, name)
    raise AttributeError(f"module 'calciscope' has no attribute {name!r}")
