"""The built-in tiny encoder: trains from scratch on 2 CPU cores in minutes.

Image tower: a 3-stage CNN (64 px -> 8x8 map of width 128). The synthetic scenes put objects on
a 3x3 grid, so *where* something is matters as much as what it is: the pooled feature is a
linear map of the flattened (channel-reduced) spatial map, which sees every position, rather
than a global average that would throw positions away. The 64 spatial tokens carry a learned
positional embedding for the token-level compositors.

Text tower: hashed word embeddings (encoders/tokenizer.py) + a small bidirectional
pre-norm transformer; pooled at the EOS token, projected to ``embed_dim``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..data.preprocess import Preprocess
from .base import EncoderPair, Features, replace_slots
from .tokenizer import EOS_ID, PAD_ID, SLOT_ID, HashTokenizer


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class TinyImageTower(nn.Module):
    def __init__(self, image_size: int, width: int, embed_dim: int, reduce: int = 32) -> None:
        super().__init__()
        if image_size % 8:
            raise ValueError(f"tiny encoder image_size must be a multiple of 8, got {image_size}")
        w1, w2 = max(width // 4, 8), max(width // 2, 8)
        self.backbone = nn.Sequential(
            _conv_bn(3, w1, 2), _conv_bn(w1, w1, 1),       # /2
            _conv_bn(w1, w2, 2), _conv_bn(w2, w2, 1),      # /4
            _conv_bn(w2, width, 2), _conv_bn(width, width, 1),  # /8
        )
        self.grid = image_size // 8
        n_tokens = self.grid * self.grid
        self.pos_embedding = nn.Parameter(torch.randn(n_tokens, width) * 0.02)
        self.reduce = nn.Conv2d(width, reduce, 1)
        self.proj = nn.Sequential(nn.Flatten(), nn.LayerNorm(reduce * n_tokens),
                                  nn.Linear(reduce * n_tokens, embed_dim))

    def forward(self, pixels: torch.Tensor) -> Features:
        fmap = self.backbone(pixels)                       # [B, C, g, g]
        if fmap.shape[-1] != self.grid or fmap.shape[-2] != self.grid:
            raise ValueError(f"tiny encoder expects {self.grid * 8}x{self.grid * 8} images, "
                             f"got {pixels.shape[-2]}x{pixels.shape[-1]}")
        pooled = self.proj(self.reduce(fmap))
        tokens = fmap.flatten(2).transpose(1, 2) + self.pos_embedding
        return Features(pooled, tokens, None)


class TinyTextTower(nn.Module):
    def __init__(self, vocab_size: int, context_length: int, width: int, layers: int, heads: int,
                 embed_dim: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width, padding_idx=PAD_ID)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, dropout=0.0,
                                           batch_first=True, norm_first=True, activation="gelu")
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln_final = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)

    def forward(self, token_ids: torch.Tensor, slot_embeddings: torch.Tensor | None) -> Features:
        x = self.token_embedding(token_ids)
        x = replace_slots(x, token_ids, SLOT_ID, slot_embeddings)
        x = x + self.positional_embedding[: token_ids.shape[1]]
        mask = token_ids != PAD_ID
        x = self.ln_final(self.transformer(x, src_key_padding_mask=~mask))
        # EOS position; a text truncated by hand without EOS falls back to its last real token
        has_eos = (token_ids == EOS_ID).any(dim=1)
        eos = torch.where(has_eos, (token_ids == EOS_ID).int().argmax(dim=1), mask.sum(dim=1) - 1)
        pooled = self.proj(x[torch.arange(x.shape[0], device=x.device), eos])
        return Features(pooled, x, mask)


class TinyEncoder(EncoderPair):
    """Small CNN + small transformer; see the module docstring for why it is shaped this way."""

    def __init__(self, embed_dim: int = 256, image_size: int = 64, image_width: int = 128,
                 text_width: int = 128, text_layers: int = 2, text_heads: int = 4,
                 n_buckets: int = 4096, context_length: int = 32) -> None:
        super().__init__()
        self.config: dict[str, Any] = {"name": "tiny", "kwargs": dict(
            embed_dim=embed_dim, image_size=image_size, image_width=image_width,
            text_width=text_width, text_layers=text_layers, text_heads=text_heads,
            n_buckets=n_buckets, context_length=context_length)}
        self.embed_dim, self.image_size = int(embed_dim), int(image_size)
        self.image_token_dim, self.text_token_dim = int(image_width), int(text_width)
        self.slot_token_id = SLOT_ID
        self.tokenizer = HashTokenizer(n_buckets, context_length)
        self.visual = TinyImageTower(image_size, image_width, embed_dim)
        self.text = TinyTextTower(self.tokenizer.vocab_size, context_length, text_width,
                                  text_layers, text_heads, embed_dim)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    def image_transform(self, kind: str = "targetpad") -> Callable:
        return Preprocess(kind, self.image_size)

    def encode_image(self, pixels: torch.Tensor) -> Features:
        return self.visual(pixels)

    def encode_text(self, token_ids: torch.Tensor, slot_embeddings: torch.Tensor | None = None) -> Features:
        return self.text(token_ids, slot_embeddings)

    def image_parameters(self) -> list[nn.Parameter]:
        return list(self.visual.parameters())

    def text_parameters(self) -> list[nn.Parameter]:
        return list(self.text.parameters())
