"""A small encoder pair for method tests: 8x8 pixels -> a 4x4 map of image tokens, text -> an
embedding table (id 0 = padding). test_dra_cala and test_faithfulness differ only in widths, in
how text is pooled and in feature scale (raw, not unit-norm, features for CaLa's loss)."""
from __future__ import annotations

import torch
from torch import nn

from composed_retrieval.encoders.base import EncoderPair, Features


class FakeEncoder(EncoderPair):
    image_size, slot_token_id = 8, 3
    config: dict = {}

    def __init__(self, embed_dim: int, image_token_dim: int, text_token_dim: int, masked_mean: bool = True,
                 image_scale: float = 1.0, text_scale: float = 1.0) -> None:
        super().__init__()
        self.embed_dim, self.image_token_dim, self.text_token_dim = embed_dim, image_token_dim, text_token_dim
        self.masked_mean, self.image_scale, self.text_scale = masked_mean, image_scale, text_scale
        self.conv = nn.Conv2d(3, image_token_dim, kernel_size=2, stride=2)
        self.image_pool = nn.Linear(image_token_dim, embed_dim)
        self.words = nn.Embedding(50, text_token_dim)
        self.text_pool = nn.Linear(text_token_dim, embed_dim)

    def encode_image(self, pixels: torch.Tensor) -> Features:
        tokens = self.conv(pixels).flatten(2).transpose(1, 2)
        return Features(self.image_pool(tokens.mean(1)) * self.image_scale, tokens)

    def encode_text(self, token_ids: torch.Tensor, slot_embeddings: torch.Tensor | None = None) -> Features:
        mask = token_ids != 0
        tokens = self.words(token_ids)
        pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True) if self.masked_mean else tokens.mean(1)
        return Features(self.text_pool(pooled) * self.text_scale, tokens, mask)

    def image_parameters(self) -> list[nn.Parameter]:
        return list(self.conv.parameters()) + list(self.image_pool.parameters())

    def text_parameters(self) -> list[nn.Parameter]:
        return list(self.words.parameters()) + list(self.text_pool.parameters())
