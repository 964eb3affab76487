"""Composed image retrieval toolkit.

The Python API (``composed_retrieval.api``) is exported here and imported on first use, so
``import composed_retrieval`` stays light: ``load_model``, ``evaluate``, ``build_index``,
``Index``, ``ModelSpec``, ``describe_model``.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_model", "evaluate", "build_index", "Index", "ModelSpec", "describe_model"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'composed_retrieval' has no attribute {name!r}")
