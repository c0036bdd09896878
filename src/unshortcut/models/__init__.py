"""Classifiers: a backbone that maps a patch to features, and a linear head.

Every model is a :class:`Classifier` so methods can reach the penultimate features
(DFR, GERNE's pseudo-groups) and the head (last-layer retraining) the same way,
whatever the backbone.
"""

from unshortcut.models.registry import Classifier, ModelOutput, build_model, model_names

__all__ = ["Classifier", "ModelOutput", "build_model", "model_names"]
