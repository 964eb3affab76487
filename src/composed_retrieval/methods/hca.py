"""Hinge-based cross attention (HCA, CaLa arXiv 2405.19149): the text bridges reference and target.

    A = Q_r(R) K_c(C)^T / sqrt(d)        reference -> text       [B, Lr, Lc]
    B = K_c(C) K_t(T)^T / sqrt(d)        text -> target          [B, Lc, Lt]
    W = softmax(A B) over target tokens                          [B, Lr, Lt]
    pseudo-target = W V_t(T) at the query position               [B, d]

Settings from CaLa's public CLIP code (github.com/Chiangsonw/CaLa,
``src/hinge_based_cross_attention_clip.py``, method ``hca_T_share_text``): image tokens go
through one shared ``Linear(2560, 640) + ReLU``; Q_r, K_c, K_t, V_t are ``Linear(640, 640)``; the
text key projection K_c is the same in A and B (the "hinge"); both products are divided by
sqrt(640); dropout 0.1 on W; the pseudo-target is row 0.

Differences, on purpose:
* padding text tokens are masked (the public code lets them in): their K_c rows are set to exactly
  zero, so they add nothing to A B and any value stored there (even NaN) leaves the output
  unchanged; padded target tokens get -inf before the softmax and zero values;
* the query position: the public code takes row 0 of the 9x9 ResNet map, i.e. the top-left cell,
  not a CLS. By default we use the mean of the reference tokens -- the token CLIP's own attention
  pool queries with -- and only compute that row; ``query="first"`` reproduces the public code
  (and is the right choice for ViT/Q-former tokens whose row 0 is a CLS); with it and no text
  mask the output equals the public formula
  (``tests/test_faithfulness.py::test_hca_first_query_without_text_mask_matches_public_code``);
* K_c maps the text-token width to d directly (in the public code both are 640), and an output
  projection to ``dim_out`` is added only when the attention width differs from it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from .tac import zero_padding


class HingeCrossAttention(nn.Module):
    """``HCA(R, C, T) -> pseudo-target [B, dim_out]``."""

    QUERIES = ("mean", "first")

    def __init__(self, dim_image_tokens: int, dim_text_tokens: int, dim_out: int, dropout: float = 0.1,
                 dim_model: int | None = None, query: str = "mean") -> None:
        super().__init__()
        if query not in self.QUERIES:
            raise ConfigError(f"HCA query must be one of {', '.join(self.QUERIES)}, got {query!r}")
        d = dim_model or dim_out
        self.dim = d
        self.query = query
        self.image_projection = nn.Sequential(nn.Linear(dim_image_tokens, d), nn.ReLU())  # shared by R and T
        self.query_reference = nn.Linear(d, d)
        self.key_text = nn.Linear(dim_text_tokens, d)
        self.key_target = nn.Linear(d, d)
        self.value_target = nn.Linear(d, d)
        self.attention_dropout = nn.Dropout(dropout)
        self.output_projection = nn.Identity() if d == dim_out else nn.Linear(d, dim_out)

    def _query_token(self, ref: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.query == "first":
            return ref[:, :1]
        if mask is None:
            return ref.mean(dim=1, keepdim=True)
        count = mask.sum(dim=1, keepdim=True).clamp(min=1).to(ref.dtype)
        return (ref.sum(dim=1) / count)[:, None]   # padded rows are already zero

    def forward(self, reference: torch.Tensor, text: torch.Tensor, target: torch.Tensor,
                reference_mask: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
                target_mask: torch.Tensor | None = None, return_weights: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Token tensors ``[B, L, width]`` with masks True = real. With ``return_weights`` also
        returns ``{"A": [B,1,Lc], "B": [B,Lc,Lt], "W": [B,1,Lt]}`` for inspection."""
        ref = zero_padding(self.image_projection(zero_padding(reference, reference_mask)), reference_mask)
        tgt = self.image_projection(zero_padding(target, target_mask))
        q = self.query_reference(self._query_token(ref, reference_mask))          # [B, 1, d]
        k_text = zero_padding(self.key_text(zero_padding(text, text_mask)), text_mask)  # [B, Lc, d]
        k_target = self.key_target(tgt)                                             # [B, Lt, d]
        v_target = zero_padding(self.value_target(tgt), target_mask)               # [B, Lt, d]
        scale = math.sqrt(self.dim)
        a = q @ k_text.transpose(1, 2) / scale                                       # [B, 1, Lc]
        b = k_text @ k_target.transpose(1, 2) / scale                                # [B, Lc, Lt]
        logits = a @ b
        if target_mask is not None:
            logits = logits.masked_fill(~target_mask[:, None, :], float("-inf"))
        w = logits.softmax(dim=-1)
        out = self.output_projection((self.attention_dropout(w) @ v_target)[:, 0])
        if return_weights:
            return out, {"A": a, "B": b, "W": w}
        return out
