"""The features an encoder returns, as a ground-floor type.

Datasets batch them (``data/triplets.py`` stacks cached features), the cache stores them and
methods consume them, so the type lives below all of them; ``encoders/base.py`` re-exports it
as the output of the encoder interface.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Features:
    """Pooled and token-level features of one batch.

    ``mask`` is True at real tokens and False at padding (texts); None means all tokens are real.
    ``vision`` (images, optional): the frozen backbone's states that an encoder's multimodal path
    cross-attends to (BLIP-2: the ViT output); only filled when a multimodal method asks for it.
    """

    pooled: torch.Tensor                 # [B, d]
    tokens: torch.Tensor                 # [B, L, d_tok]
    mask: torch.Tensor | None = None     # [B, L] bool
    vision: torch.Tensor | None = None   # [B, N, d_vision]

    def to(self, device: torch.device | str) -> "Features":
        return Features(self.pooled.to(device), self.tokens.to(device),
                        None if self.mask is None else self.mask.to(device),
                        None if self.vision is None else self.vision.to(device))

    def detach(self) -> "Features":
        return Features(self.pooled.detach(), self.tokens.detach(),
                        None if self.mask is None else self.mask.detach(),
                        None if self.vision is None else self.vision.detach())

    def rows(self, idx: Any) -> "Features":
        """The rows ``idx`` (index, slice or index tensor) of every field."""
        return Features(self.pooled[idx], self.tokens[idx], None if self.mask is None else self.mask[idx],
                        None if self.vision is None else self.vision[idx])

    def __len__(self) -> int:
        return self.pooled.shape[0]
