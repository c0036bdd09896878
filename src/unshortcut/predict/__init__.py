"""Whole-image inference: per-patch tumor probabilities, QuPath GeoJSON and heat maps.

``unshortcut predict RUN IMAGE... --out DIR`` (docs/predict.md). The library entry
point is :func:`predict`.
"""

from unshortcut.predict.core import ImageResult, PredictOptions, predict

__all__ = ["ImageResult", "PredictOptions", "predict"]
