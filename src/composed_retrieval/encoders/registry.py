"""Encoder names -> EncoderPair instances (open_clip-style factory).

Names: ``tiny`` (built in) or ``open_clip:<model>`` (e.g. ``open_clip:RN50x4``). The registry
imports the backends; backends import only downward (``weights.py`` reads weight files safely).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .base import EncoderPair
from .weights import _one_line, load_weights

OPEN_CLIP_PREFIX = "open_clip:"
ENCODER_CHOICES = ("tiny", "open_clip:<model> (e.g. open_clip:RN50x4, open_clip:ViT-B-32, open_clip:ViT-L-14)",
                   "blip2:<Hugging Face BLIP-2 folder or LAVIS .pth>")


def available_encoders() -> tuple[str, ...]:
    return ENCODER_CHOICES


def build_encoder(name: str, checkpoint: str | Path | None = None, **kw: Any) -> EncoderPair:
    """``tiny`` or ``open_clip:<model>``; ``checkpoint`` is a local weights file (None: random)."""
    if name == "tiny":
        from .tiny import TinyEncoder
        try:
            encoder: EncoderPair = TinyEncoder(**kw)
        except (TypeError, ValueError, RuntimeError) as exc:  # RuntimeError: e.g. a negative width
            raise ConfigError(f"bad options for the tiny encoder: {_one_line(exc)}") from None
        if checkpoint is not None:
            load_weights(encoder, checkpoint)
            encoder.config["checkpoint"] = str(Path(checkpoint).resolve())
        return encoder
    if isinstance(name, str) and (name == "blip2" or name.startswith("blip2:")):
        from .blip2 import build_blip2
        return build_blip2(name, checkpoint, **kw)
    if isinstance(name, str) and name.startswith(OPEN_CLIP_PREFIX) and len(name) > len(OPEN_CLIP_PREFIX):
        from .openclip import OpenCLIPEncoder
        try:
            return OpenCLIPEncoder(name[len(OPEN_CLIP_PREFIX):], checkpoint=checkpoint, **kw)
        except TypeError as exc:
            raise ConfigError(f"bad options for encoder {name!r}: {_one_line(exc)}") from None
    raise ConfigError(f"unknown encoder {name!r}; expected one of: {', '.join(ENCODER_CHOICES)}")


def encoder_from_config(cfg: dict[str, Any]) -> EncoderPair:
    """Rebuild an encoder from its ``encoder.config`` (name, kwargs, checkpoint)."""
    if not isinstance(cfg, dict) or not isinstance(cfg.get("name"), str):
        raise ConfigError("encoder config must be an object with a string 'name'")
    kwargs = cfg.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ConfigError("encoder config field 'kwargs' must be an object")
    return build_encoder(cfg["name"], checkpoint=cfg.get("checkpoint"), **kwargs)
