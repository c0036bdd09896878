"""Training methods (ERM, GERNE, group-robustness baselines) behind one interface."""

from unshortcut.methods.base import HParam, Method, Optimizers, TrainContext, backward_and_step
from unshortcut.methods.registry import get_method, method_names, register
from unshortcut.rows import Batch, GroupedSplit

__all__ = [
    "Batch",
    "GroupedSplit",
    "HParam",
    "Method",
    "Optimizers",
    "TrainContext",
    "backward_and_step",
    "get_method",
    "method_names",
    "register",
]
