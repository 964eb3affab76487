"""Encoder names -> EncoderPair instances (open_clip-style factory).

Names: ``tiny`` (built in), ``open_clip:<model>`` (e.g. ``open_clip:RN50x4``) or
``open_clip:<folder>`` (an open_clip Hugging Face folder), and ``hf_clip:<folder>`` (a
transformers CLIP / SigLIP folder). Pretrained backbones without weights are refused unless
``random_weights=True``; random weights are drawn from a fixed seed, so a spec that asks for
them rebuilds the same encoder in every process (an index built with it can be searched).
The registry imports the backends; backends import only downward (``weights.py`` reads
weight files safely).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .base import EncoderPair
from .weights import _one_line, load_weights

OPEN_CLIP_PREFIX = "open_clip:"
HF_CLIP_PREFIX = "hf_clip:"
ENCODER_CHOICES = ("tiny", "open_clip:<model> (e.g. open_clip:RN50x4, open_clip:ViT-B-32, open_clip:ViT-L-14)",
                   "open_clip:<folder with open_clip_config.json>",
                   "hf_clip:<transformers CLIP or SigLIP folder>",
                   "blip2:<Hugging Face BLIP-2 folder or LAVIS .pth>")
RANDOM_SEED = 0


def available_encoders() -> tuple[str, ...]:
    return ENCODER_CHOICES


def build_encoder(name: str, checkpoint: str | Path | None = None, **kw: Any) -> EncoderPair:
    """An encoder by name; ``checkpoint`` is a local weights file. ``random_weights=True`` allows
    a pretrained backbone without weights (tiny always starts random: it is trained here)."""
    random_weights = bool(kw.pop("random_weights", False))
    if not random_weights:
        return _build(name, checkpoint, False, kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        return _build(name, checkpoint, True, kw)


def _build(name: str, checkpoint: str | Path | None, random_weights: bool, kw: dict[str, Any]) -> EncoderPair:
    if isinstance(name, str) and name.startswith(HF_CLIP_PREFIX) and len(name) > len(HF_CLIP_PREFIX):
        from .hf_clip import HFCLIPEncoder
        if checkpoint is not None:
            raise ConfigError(f"{name}: a Hugging Face folder carries its own weights; drop --encoder-checkpoint")
        try:
            return HFCLIPEncoder(name[len(HF_CLIP_PREFIX):], random_weights=random_weights, **kw)
        except TypeError as exc:
            raise ConfigError(f"bad options for encoder {name!r}: {_one_line(exc)}") from None
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
        return build_blip2(name, checkpoint, random_weights=random_weights, **kw)
    if isinstance(name, str) and name.startswith(OPEN_CLIP_PREFIX) and len(name) > len(OPEN_CLIP_PREFIX):
        from .openclip import OpenCLIPEncoder
        try:
            return OpenCLIPEncoder(name[len(OPEN_CLIP_PREFIX):], checkpoint=checkpoint,
                                   random_weights=random_weights, **kw)
        except TypeError as exc:
            raise ConfigError(f"bad options for encoder {name!r}: {_one_line(exc)}") from None
    raise ConfigError(f"unknown encoder {name!r}; expected one of: {', '.join(ENCODER_CHOICES)}")


def encoder_from_config(cfg: dict[str, Any], random_weights: bool | None = None) -> EncoderPair:
    """Rebuild an encoder from its ``encoder.config`` (name, kwargs, checkpoint);
    ``random_weights=True`` when the caller loads the weights itself (a trained run)."""
    if not isinstance(cfg, dict) or not isinstance(cfg.get("name"), str):
        raise ConfigError("encoder config must be an object with a string 'name'")
    kwargs = dict(cfg.get("kwargs") or {})
    if not isinstance(cfg.get("kwargs") or {}, dict):
        raise ConfigError("encoder config field 'kwargs' must be an object")
    if random_weights is not None:
        kwargs["random_weights"] = random_weights
    return build_encoder(cfg["name"], checkpoint=cfg.get("checkpoint"), **kwargs)
