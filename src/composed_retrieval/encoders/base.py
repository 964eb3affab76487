"""The encoder interface every method builds on.

An encoder pair gives, for a batch, a pooled feature ``[B, d]`` and a token sequence
``[B, L, d_tok]`` (spatial tokens for images; word tokens plus a padding mask for texts), and
can encode a text in which chosen token slots are replaced by given embeddings (pseudo-words).

Optional capability, **multimodal**: ``encode_multimodal(reference, text_ids)`` encodes a
reference image and a text *together* (BLIP-2's Q-Former: query tokens and words attend to each
other and cross-attend to the image), what CaLa-BLIP-2's query and SPRC's prompt are made of. An
encoder that has it sets ``supports_multimodal = True``; a method that needs it calls
:func:`require_multimodal`, which raises a one-line error for any other encoder.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..errors import ConfigError
from ..features import Features  # noqa: F401  (re-exported: the interface output type)


class EncoderPair(nn.Module):
    """Image tower + text tower behind one interface.

    Subclasses set ``embed_dim`` (pooled d, shared by both towers), ``image_token_dim``,
    ``text_token_dim`` (width of the text transformer = size of a word embedding),
    ``image_size`` and ``config`` (a JSON-able dict from which the registry rebuilds it).
    """

    embed_dim: int
    image_token_dim: int
    text_token_dim: int
    image_size: int
    config: dict[str, Any]
    #: token id that marks a pseudo-word slot ("$") after tokenization
    slot_token_id: int

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids ``[B, L]`` (long) for a list of strings."""
        raise NotImplementedError

    def image_transform(self, kind: str = "targetpad") -> Callable:
        """PIL image -> normalised tensor ``[3, H, W]`` at this model's resolution."""
        raise NotImplementedError

    def encode_image(self, pixels: torch.Tensor) -> Features:
        raise NotImplementedError

    def encode_text(self, token_ids: torch.Tensor, slot_embeddings: torch.Tensor | None = None) -> Features:
        """Encode texts; where ``token_ids == slot_token_id`` the word embedding is replaced by
        ``slot_embeddings[b]`` (``[B, text_token_dim]``), one pseudo-word per text."""
        raise NotImplementedError

    def image_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    #: True for encoders with ``encode_multimodal`` (see the module docstring)
    supports_multimodal: bool = False

    def encode_multimodal(self, reference: torch.Tensor | Features, token_ids: torch.Tensor,
                          slot_embeddings: torch.Tensor | None = None) -> Features:
        """Reference image (pixels, or Features carrying ``vision``) and text encoded together."""
        raise MissingCapability(f"encoder {self.config.get('name', type(self).__name__)!r} has no multimodal "
                                "path (image and text encoded together); use a BLIP-2 encoder (blip2:DIR)")

    def multimodal_parameters(self) -> list[nn.Parameter]:
        return []

    def text_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode_texts(self, texts: list[str], slot_embeddings: torch.Tensor | None = None) -> Features:
        return self.encode_text(self.tokenize(texts).to(self.device), slot_embeddings)


class MissingCapability(ConfigError, ValueError):
    """A method asked an encoder for an optional capability it lacks (CLI: a one-line error)."""


def require_multimodal(encoder: EncoderPair, method: str) -> None:
    if not getattr(encoder, "supports_multimodal", False):
        raise MissingCapability(f"method {method!r} needs an encoder with a multimodal path (image and text "
                                f"encoded together, e.g. blip2:DIR); encoder "
                                f"{encoder.config.get('name', type(encoder).__name__)!r} has none")


def replace_slots(word_embeddings: torch.Tensor, token_ids: torch.Tensor, slot_token_id: int,
                  slot_embeddings: torch.Tensor | None) -> torch.Tensor:
    """Put ``slot_embeddings[b]`` at every position of text b whose id is ``slot_token_id``.

    Shared by every text tower, so that pseudo-word injection is one piece of code.
    """
    if slot_embeddings is None:
        return word_embeddings
    slots = (token_ids == slot_token_id)
    if not bool(slots.any(dim=1).all()):
        missing = (~slots.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"texts {missing} have no pseudo-word slot to fill")
    fill = slot_embeddings.to(word_embeddings.dtype)[:, None, :].expand_as(word_embeddings)
    return torch.where(slots[..., None], fill, word_embeddings)
