"""Twin attention compositor (TAC): fuses a reference and a target image into one vector.

Shared by DRA (arXiv 2309.02169, its "vision compositor") and CaLa (arXiv 2405.19149, the
complementary-text-reasoning branch). Settings from CaLa's public CLIP code
(github.com/Chiangsonw/CaLa, ``src/twin_attention_compositor_clip.py``):

* image tokens (RN50x4: the 9x9 map before attention pooling, width 2560) go through one shared
  ``Linear(2560, 640) + ReLU`` to the attention width 640 (= the CLIP embedding size);
* two ``nn.MultiheadAttention(640, num_heads=1, dropout=0.0)`` modules, "4 layers" each: layer 1
  lets the query side attend to the other image, every later layer attends to the previous
  layer's output, always with the *original* query-side tokens as queries (no residual, norm or
  MLP);
* ONE CLS token is prepended to both images' tokens, so it is on the query side of both stacks
  and on the key side of layer 1 (keys = [CLS; other image]); the output is the mean of the two
  stacks' CLS outputs;
* each stack applies ONE attention module four times (weights shared across layers).

``shared_cls=True, share_layers=True`` reproduce that layout exactly (the ``*_paper.json``
configs use it; pinned by ``tests/test_faithfulness.py::test_tac_matches_cala_public_layout``).
The defaults (``shared_cls=False, share_layers=False``) are our own layout: one learned CLS per
stack, on the query side only, so each stack's summary token starts from its own parameter and
the keys are the other image's tokens alone; and each layer has its own weights, as "a stack of
layers" reads in both papers.

Deliberate differences kept in both layouts: the CLS token is a learned parameter (the public
code draws ``torch.randn`` every forward, so its output is random even in eval mode); key
padding masks are honoured (the public code has fixed 9x9 maps and no padding).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError


def zero_padding(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Padded positions set to exactly 0, so that not even NaN/inf there can leak into sums."""
    if mask is None:
        return tokens
    return torch.where(mask[..., None], tokens, torch.zeros((), dtype=tokens.dtype, device=tokens.device))


class TwinAttentionCompositor(nn.Module):
    """``TAC(reference_tokens, target_tokens) -> [B, dim_out]``.

    ``dim_model`` is the attention width (default ``dim_out``, as in the public code where both
    are 640); the output projection is the identity when the two agree. ``shared_cls=True`` is
    the public CLIP layout (one CLS for both stacks, also on the key side of layer 1);
    ``share_layers=True`` reuses one attention module per stack, as the public code does.
    """

    def __init__(self, dim_tokens: int, dim_out: int, num_layers: int = 4, num_heads: int = 1,
                 dropout: float = 0.0, dim_model: int | None = None, share_layers: bool = False,
                 shared_cls: bool = False) -> None:
        super().__init__()
        dim_model = dim_model or dim_out
        if num_layers < 1:
            raise ConfigError(f"TAC needs at least one attention layer, got num_layers={num_layers}")
        if num_heads < 1 or dim_model % num_heads:
            raise ConfigError(f"TAC attention width {dim_model} is not divisible by num_heads={num_heads}")
        self.num_layers = num_layers
        self.share_layers = share_layers
        self.shared_cls = shared_cls
        self.input_projection = nn.Sequential(nn.Linear(dim_tokens, dim_model), nn.ReLU())
        if shared_cls:
            self.cls = nn.Parameter(torch.randn(1, 1, dim_model) * 0.02)
        else:
            self.cls_reference = nn.Parameter(torch.randn(1, 1, dim_model) * 0.02)
            self.cls_target = nn.Parameter(torch.randn(1, 1, dim_model) * 0.02)
        n_modules = 1 if share_layers else num_layers

        def stack() -> nn.ModuleList:
            return nn.ModuleList(nn.MultiheadAttention(dim_model, num_heads, dropout=dropout, batch_first=True)
                                 for _ in range(n_modules))

        self.reference_attention = stack()   # reference tokens query the target
        self.target_attention = stack()      # target tokens query the reference
        self.output_projection = nn.Identity() if dim_model == dim_out else nn.Linear(dim_model, dim_out)

    @staticmethod
    def _with_cls(cls: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch = tokens.shape[0]
        out = torch.cat([cls.expand(batch, -1, -1).to(tokens.dtype), tokens], dim=1)
        if mask is None:
            return out, None
        return out, torch.cat([torch.ones(batch, 1, dtype=torch.bool, device=mask.device), mask], dim=1)

    def _stack(self, layers: nn.ModuleList, cls: torch.Tensor, queries: torch.Tensor,
               query_mask: torch.Tensor | None, keys: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        q, q_mask = self._with_cls(cls, queries, query_mask)
        kv, kv_mask = self._with_cls(cls, keys, key_mask) if self.shared_cls else (keys, key_mask)
        for i in range(self.num_layers):
            attention = layers[0 if self.share_layers else i]
            kv, _ = attention(q, kv, kv, need_weights=False,
                              key_padding_mask=None if kv_mask is None else ~kv_mask)
            kv, kv_mask = zero_padding(kv, q_mask), q_mask
        return kv[:, 0]

    def forward(self, reference: torch.Tensor, target: torch.Tensor,
                reference_mask: torch.Tensor | None = None, target_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``reference`` ``[B, Lr, dim_tokens]``, ``target`` ``[B, Lt, dim_tokens]``; masks True = real."""
        ref = zero_padding(self.input_projection(zero_padding(reference, reference_mask)), reference_mask)
        tgt = zero_padding(self.input_projection(zero_padding(target, target_mask)), target_mask)
        cls_ref, cls_tgt = (self.cls, self.cls) if self.shared_cls else (self.cls_reference, self.cls_target)
        from_reference = self._stack(self.reference_attention, cls_ref, ref, reference_mask, tgt, target_mask)
        from_target = self._stack(self.target_attention, cls_tgt, tgt, target_mask, ref, reference_mask)
        return self.output_projection((from_reference + from_target) / 2)
