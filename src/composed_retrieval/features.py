"""The features an encoder returns, as a ground-floor type.

Datasets batch them (``data/triplets.py`` stacks cached features), the cache stores them and
methods consume them, so the type lives below all of them; ``encoders/base.py`` re-exports it
as the output of the encoder interface.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Features:
    """Pooled and token-level features of one batch.

    ``mask`` is True at real tokens and False at padding (texts); None means all tokens are real.
    """

    pooled: torch.Tensor                 # [B, d]
    tokens: torch.Tensor                 # [B, L, d_tok]
    mask: torch.Tensor | None = None     # [B, L] bool

    def to(self, device: torch.device | str) -> "Features":
        return Features(self.pooled.to(device), self.tokens.to(device),
                        None if self.mask is None else self.mask.to(device))

    def detach(self) -> "Features":
        return Features(self.pooled.detach(), self.tokens.detach(),
                        None if self.mask is None else self.mask.detach())

    def __len__(self) -> int:
        return self.pooled.shape[0]
