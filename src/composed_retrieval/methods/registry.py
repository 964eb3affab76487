"""Method registry (open_clip-style factory): a name maps to a CIRMethod subclass."""
from __future__ import annotations

import importlib
from typing import Any, Callable

from ..encoders.base import EncoderPair
from ..errors import ConfigError
from .base import CIRMethod

_METHODS: dict[str, type[CIRMethod]] = {}
# modules imported lazily so that every registered method is known to build_method
_METHOD_MODULES = (
    "composed_retrieval.methods.baselines",
    "composed_retrieval.methods.combiner",
    "composed_retrieval.methods.dra",
    "composed_retrieval.methods.cala",
    "composed_retrieval.methods.cala_blip2",
    "composed_retrieval.methods.textual_inversion",
)


def register_method(name: str) -> Callable[[type[CIRMethod]], type[CIRMethod]]:
    def deco(cls: type[CIRMethod]) -> type[CIRMethod]:
        cls.name = name
        _METHODS[name] = cls
        return cls
    return deco


def _load_all() -> None:
    for mod in _METHOD_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:  # a real import error inside an existing module
                raise


def available_methods() -> list[str]:
    _load_all()
    return sorted(_METHODS)


def build_method(name: str, encoder: EncoderPair, config: dict[str, Any] | None = None) -> CIRMethod:
    _load_all()
    if name not in _METHODS:
        raise ConfigError(f"unknown method {name!r}; expected one of {', '.join(sorted(_METHODS))}")
    return _METHODS[name](encoder, config or {})
