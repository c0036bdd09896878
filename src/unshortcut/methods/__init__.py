"""Training methods (ERM, GERNE, group-robustness baselines) behind one interface."""

from unshortcut.methods.base import Batch, GroupedSplit, HParam, Method, TrainContext
from unshortcut.methods.registry import get_method, method_names, register

__all__ = [
    "Batch",
    "GroupedSplit",
    "HParam",
    "Method",
    "TrainContext",
    "get_method",
    "method_names",
    "register",
]
