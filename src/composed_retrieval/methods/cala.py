"""CaLa: complementary association learning (Jiang et al., arXiv 2405.19149; SIGIR 2024).

Three relations of a triplet (reference R, text C, target T), all used only in training:
* query-target matching: ``logits_match = 100 * q @ L2norm(T).T`` with ``q`` from the query
  compositor;
* complementary text reasoning: the twin attention compositor fuses R and T and must identify
  the text, ``logits_align = s_align * C @ TAC(R, T).T`` (``s_align`` = 10);
* text-bridged image alignment: the hinge-based cross attention builds a pseudo-target
  ``HCA(R, C, T)`` that must identify its reference, ``logits_reason = s_reason * HCA @ R.T``
  (``s_reason`` = 10), the "reasoning" cross-entropy.

    loss = w_hca * CE(logits_reason) + (1 - w_hca) * CE(w_tac * logits_align + (1 - w_tac) * logits_match)

with ``w_tac = 0.45``, ``w_hca = 0.1``. All of this is how CaLa's public code computes it
(github.com/Chiangsonw/CaLa, ``src/blip_fine_tune.py`` and README: scales 100/10/10, the mixed
logits, ``--tac-weight 0.45 --hca-weight 0.1``; RN50x4 with ``--embeds-dim 640``, 30 epochs,
batch 64, lr 5e-6 for the CLIP text tower and 2x for TAC/HCA, AdamW weight decay 0.05, cosine
schedule; the CLIP image tower is not optimised).

The query compositor. The public code's CLIP variant trains CLIP4Cir's element-wise sum
(``cir_frame="sum"``, text tower fine-tuned), its BLIP-2 variant a Q-former (or ARTEMIS). On our
encoder interface the default is CLIP4Cir's Combiner (``compositor: "combiner"``, the same
``CombinerNet`` DRA uses); ``compositor: "sum"`` reproduces the public CLIP recipe. Inference
uses the query compositor only; TAC and HCA are training-time modules.

``cala_paper.json`` reproduces the public CLIP loss exactly (``fusion: "raw"``,
``align_features: "raw"``, ``tac_shared_cls``/``tac_share_layers``, ``hca_query: "first"``,
``hca_text_mask: false``; pinned by ``tests/test_faithfulness.py``). Our defaults differ on
purpose: features in every logit are L2-normalised (``align_features: "normalized"``: the public
align/reason logits use raw features, so their scale is not a temperature); the sum normalises
each side first; HCA masks padding text tokens and uses a mean query token (see ``hca.py``);
TAC has a CLS per stack (see ``tac.py``). In every setting TAC's CLS is learned (the public code
draws it at random every forward).

Config (``method_config``): ``tac``, ``hca`` (bool switches), ``w_tac``, ``w_hca``,
``compositor`` ("combiner" | "sum"), ``fusion`` ("normalized" | "raw") and ``text_weight`` of the
sum, ``align_features`` ("normalized" | "raw"), ``match_scale``, ``align_scale``,
``reason_scale``, ``tac_layers``, ``tac_heads``, ``tac_dropout``, ``tac_share_layers``,
``tac_shared_cls``, ``hca_dropout``, ``hca_query`` ("mean" | "first"), ``hca_text_mask``,
``projection_dim``, ``hidden_dim``, ``dropout`` (Combiner).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..encoders.base import EncoderPair, Features
from ..errors import ConfigError
from ..gather import gather_rows   # identity outside a multi-process global batch
from .base import (CaLaLoss, CIRMethod, check_fusion, check_weight, excluding, read_options, require_tokens,
                   sum_compose)
from .combiner import CombinerNet
from .hca import HingeCrossAttention
from .registry import register_method
from .tac import TwinAttentionCompositor

COMPOSITORS = ("combiner", "sum")
ALIGN_FEATURES = ("normalized", "raw")


@register_method("cala")
class CaLa(CaLaLoss, CIRMethod):
    """Query compositor trained with matching, complementary text reasoning and text-bridged
    image alignment."""

    DEFAULTS: dict[str, Any] = {
        "tac": True, "hca": True, "w_tac": 0.45, "w_hca": 0.1, "compositor": "combiner",
        "match_scale": 100.0, "align_scale": 10.0, "reason_scale": 10.0,
        "fusion": "normalized", "text_weight": 0.5, "align_features": "normalized",
        "tac_layers": 4, "tac_heads": 1, "tac_dropout": 0.0, "tac_share_layers": False, "tac_shared_cls": False,
        "hca_dropout": 0.1, "hca_query": "mean", "hca_text_mask": True,
        "projection_dim": None, "hidden_dim": None, "dropout": 0.5,
    }

    def __init__(self, encoder: EncoderPair, config: dict[str, Any] | None = None) -> None:
        super().__init__(encoder, config)
        self.options = o = read_options(self.name, self.config, self.DEFAULTS)
        # w = 1 would leave the query compositor without any training signal
        check_weight(self.name, "w_tac", o["w_tac"], upper_open=True)
        check_weight(self.name, "w_hca", o["w_hca"], upper_open=True)
        if o["compositor"] not in COMPOSITORS:
            raise ConfigError(f"method_config.compositor: expected one of {', '.join(COMPOSITORS)} for cala, "
                              f"got {o['compositor']!r}")
        check_fusion(self.name, o)
        if o["align_features"] not in ALIGN_FEATURES:
            raise ConfigError(f"method_config.align_features: expected one of {', '.join(ALIGN_FEATURES)} for "
                              f"cala, got {o['align_features']!r}")
        d = encoder.embed_dim
        self.tac = TwinAttentionCompositor(encoder.image_token_dim, d, num_layers=o["tac_layers"],
                                           num_heads=o["tac_heads"], dropout=o["tac_dropout"],
                                           share_layers=o["tac_share_layers"], shared_cls=o["tac_shared_cls"])
        self.hca = HingeCrossAttention(encoder.image_token_dim, encoder.text_token_dim, d,
                                       dropout=o["hca_dropout"], query=o["hca_query"])
        self.combiner = (CombinerNet(d, o["projection_dim"], o["hidden_dim"], o["dropout"])
                         if o["compositor"] == "combiner" else None)

    def trainable_parameters(self) -> list[nn.Parameter]:
        unused: list[nn.Module] = []
        if not self.uses_tac:
            unused.append(self.tac)
        if not self.uses_hca:
            unused.append(self.hca)
        return excluding(super().trainable_parameters(), unused)

    def compose(self, reference: Features, text: Features) -> torch.Tensor:
        if self.combiner is None:
            return sum_compose(reference.pooled.float(), text.pooled.float(), self.options["fusion"],
                               self.options["text_weight"])
        return F.normalize(self.combiner(reference.pooled.float(), text.pooled.float()), dim=-1)

    def _unit(self, x: torch.Tensor) -> torch.Tensor:
        """Features in the align/reason logits: L2-normalised (ours) or as computed (public code)."""
        return F.normalize(x, dim=-1) if self.options["align_features"] == "normalized" else x

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        o = self.options
        reference = self.image_features(batch["reference"])
        target = self.image_features(batch["target"])
        text = self.text_features(batch["text"])
        target_vec = self.gallery_embedding(target)
        text_vec = self._unit(text.pooled.float())

        logits_match = o["match_scale"] * self.compose(reference, text) @ gather_rows(target_vec).t()
        logits_align = logits_reason = None
        if self.uses_tac:
            require_tokens(reference, "reference image", self.name)
            require_tokens(target, "target image", self.name)
            fused = self.tac(reference.tokens.float(), target.tokens.float(), reference.mask, target.mask)
            logits_align = o["align_scale"] * text_vec @ gather_rows(self._unit(fused)).t()
        if self.uses_hca:
            require_tokens(reference, "reference image", self.name)
            require_tokens(target, "target image", self.name)
            require_tokens(text, "text", self.name)
            pseudo_target = self.hca(reference.tokens.float(), text.tokens.float(), target.tokens.float(),
                                     reference.mask, text.mask if o["hca_text_mask"] else None, target.mask)
            reference_vec = self._unit(reference.pooled.float())
            logits_reason = o["reason_scale"] * self._unit(pseudo_target) @ gather_rows(reference_vec).t()
        return self.mix_losses(logits_match, logits_align, logits_reason)
