"""Method registry: name -> class. A new method is one file plus one line here."""

from __future__ import annotations

import importlib

from unshortcut.errors import UnshortcutError
from unshortcut.methods.base import Method

# Modules under unshortcut.methods that define registered methods.
_METHOD_MODULES: tuple[str, ...] = (
    "erm",
    "gerne",
    "resample",
    "reweight",
    "groupdro",
    "jtt",
    "dfr",
    "lff",
    "spatial",
    "mimm",
)

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method under its ``name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"method name {cls.name!r} is empty or registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    for module in _METHOD_MODULES:
        importlib.import_module(f"unshortcut.methods.{module}")


def method_names() -> list[str]:
    """Registered names in registration order (ERM first, then as ``_METHOD_MODULES``)."""
    _load_all()
    return list(_REGISTRY)


def get_method(name: str) -> type[Method]:
    """The class registered as ``name``; a clear error listing the known ones otherwise."""
    _load_all()
    if name not in _REGISTRY:
        raise UnshortcutError(f"unknown method {name!r} (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]
