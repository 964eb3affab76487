"""CaLa, BLIP-2 variant (Jiang et al., arXiv 2405.19149), as CaLa's public code runs it.

github.com/Chiangsonw/CaLa ``src/blip_fine_tune.py`` (``encoder_arch == "blip2"``,
``cir_frame == "sum"``) loads three BLIP-2 ``pretrain_vitL`` feature extractors, one per role:

* textual: ``text_feats`` = the Q-Former's CLS hidden state (768-d, un-projected), ``text_embeds``
  = its token outputs;
* multimodal: the reference image and the caption together through the Q-Former; query 0 of the
  32 query outputs is ``reference_feats``;
* visual: the 32 query outputs of an image; query 0, L2-normalised, is the target / gallery side.

and optimises, with the scales and weights of the CLIP variant (``methods/cala.py``)::

    query          = L2norm(text_feats + reference_feats)            (element_wise_sum)
    logits_match   = 100 * query @ L2norm(target query 0).T
    logits_align   = 10 * text_feats @ TAC(visual(reference) tokens, visual(target) tokens).T
    logits_reason  = 10 * HCA(multimodal tokens, text tokens, visual(target) tokens) @ reference_feats.T
    loss = w_hca * CE(logits_reason) + (1 - w_hca) * CE(w_tac * logits_align + (1 - w_tac) * logits_match)

with ``w_tac = 0.45``, ``w_hca = 0.1`` (README), TAC = one attention module applied four times per
direction (``tac_share_layers``), HCA's row 0 (``hca_query = "first"``, the query-0 position).
Stages: ``train_text_tower`` trains the textual and multimodal Q-Formers (with the multimodal
query tokens) = the public ``--encoder multi``; adding ``train_image_tower`` trains the visual
Q-Former and its query tokens too = ``--encoder both``. The ViT never trains.

The three Q-Formers are copies of the encoder's one (``share_qformer: false``, the public code);
``share_qformer: true`` keeps one Q-Former for the three roles: ViT-g Q-Former copies are 0.19 B
parameters each, so sharing saves 0.37 B parameters = 1.5 GB of float32 weights + 3.0 GB of AdamW
moments (+1.5 GB of gradients) when they train.

Deliberate differences from the public code (the same as ``methods/cala.py``): every logit uses
L2-normalised features (the public align/reason logits use raw 768-d features, so their scale is
no temperature); TAC has its input projection and learned CLS tokens (``tac.py``); HCA has its image
projection and masks padding text tokens (``hca.py``). The public cosine schedule changes only its
first parameter group (the multimodal Q-Former); here group 0 is every parameter without an
``lr_mult`` (the three Q-Formers).

Config (``method_config``): ``tac``, ``hca``, ``w_tac``, ``w_hca``, ``match_scale``, ``align_scale``,
``reason_scale``, ``tac_layers``, ``tac_heads``, ``tac_dropout``, ``tac_share_layers``,
``hca_dropout``, ``hca_query``, ``share_qformer``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..encoders.base import EncoderPair, Features, require_multimodal
from ..gather import gather_rows   # identity outside a multi-process global batch
from .base import CaLaLoss, CIRMethod, check_weight, excluding, read_options
from .hca import HingeCrossAttention
from .registry import register_method
from .tac import TwinAttentionCompositor


@dataclass
class EncodedText(Features):
    """Text features that keep their token ids: the multimodal query needs the text again,
    together with the reference image, which ``compose`` has and ``text_features`` has not."""

    token_ids: torch.Tensor | None = None


@register_method("cala_blip2")
class CaLaBlip2(CaLaLoss, CIRMethod):
    """Textual, multimodal and visual Q-Formers trained with CaLa's three relations."""

    DEFAULTS: dict[str, Any] = {
        "tac": True, "hca": True, "w_tac": 0.45, "w_hca": 0.1,
        "match_scale": 100.0, "align_scale": 10.0, "reason_scale": 10.0,
        "tac_layers": 4, "tac_heads": 1, "tac_dropout": 0.0, "tac_share_layers": True,
        "hca_dropout": 0.1, "hca_query": "first", "share_qformer": False,
    }

    def __init__(self, encoder: EncoderPair, config: dict[str, Any] | None = None) -> None:
        super().__init__(encoder, config)
        require_multimodal(encoder, self.name)
        self.options = o = read_options(self.name, self.config, self.DEFAULTS)
        check_weight(self.name, "w_tac", o["w_tac"], upper_open=True)
        check_weight(self.name, "w_hca", o["w_hca"], upper_open=True)
        if not o["share_qformer"]:
            encoder.split_roles()          # type: ignore[attr-defined]
        encoder.keep_vision = True         # type: ignore[attr-defined]  # reference ViT states for the multimodal role
        d = encoder.embed_dim
        self.tac = TwinAttentionCompositor(encoder.image_token_dim, d, num_layers=o["tac_layers"],
                                           num_heads=o["tac_heads"], dropout=o["tac_dropout"],
                                           share_layers=o["tac_share_layers"])
        self.hca = HingeCrossAttention(encoder.image_token_dim, encoder.text_token_dim, d,
                                       dropout=o["hca_dropout"], query=o["hca_query"])

    # ---- what trains --------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        params = list(self.head_parameters())
        if self.train_text_tower:
            params += self.encoder.text_parameters() + self.encoder.multimodal_parameters()
        if self.train_image_tower:
            params += self.encoder.image_parameters()
        unused = ([] if self.uses_tac else [self.tac]) + ([] if self.uses_hca else [self.hca])
        seen: set[int] = set()
        out = []
        for p in excluding(params, unused):   # a shared Q-Former serves several roles: once each
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    @property
    def image_tower_frozen(self) -> bool:
        """Never: the multimodal role cross-attends to the reference's ViT states, which cached
        image features do not hold (the encoder's ViT cache keeps the ViT cheap instead)."""
        return False

    # ---- encoding -----------------------------------------------------------------------
    def text_features(self, token_ids: torch.Tensor, slot_embeddings: torch.Tensor | None = None) -> Features:
        f = super().text_features(token_ids, slot_embeddings)
        return EncodedText(f.pooled, f.tokens, f.mask, None, token_ids)

    def multimodal_features(self, reference: Features, token_ids: torch.Tensor) -> Features:
        if self.train_text_tower and self.training:
            return self.encoder.encode_multimodal(reference, token_ids)
        with torch.no_grad():
            return self.encoder.encode_multimodal(reference, token_ids).detach()

    def _query(self, multimodal: Features, text: Features) -> torch.Tensor:
        return F.normalize(text.pooled.float() + multimodal.pooled.float(), dim=-1)

    def compose(self, reference: Features, text: Features) -> torch.Tensor:
        if not isinstance(text, EncodedText) or text.token_ids is None:
            raise TypeError("cala_blip2 composes from its own text_features (they keep the token ids)")
        return self._query(self.multimodal_features(reference, text.token_ids), text)

    # ---- training -----------------------------------------------------------------------
    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        o = self.options
        reference = self.image_features(batch["reference"])
        target = self.image_features(batch["target"])
        text = self.text_features(batch["text"])
        multimodal = self.multimodal_features(reference, batch["text"])
        target_vec = self.gallery_embedding(target)

        logits_match = o["match_scale"] * self._query(multimodal, text) @ gather_rows(target_vec).t()
        logits_align = logits_reason = None
        if self.uses_tac:
            fused = self.tac(reference.tokens.float(), target.tokens.float())
            text_vec = F.normalize(text.pooled.float(), dim=-1)
            logits_align = o["align_scale"] * text_vec @ gather_rows(F.normalize(fused, dim=-1)).t()
        if self.uses_hca:
            pseudo_target = self.hca(multimodal.tokens.float(), text.tokens.float(), target.tokens.float(),
                                     None, text.mask, None)
            reference_vec = F.normalize(multimodal.pooled.float(), dim=-1)
            logits_reason = o["reason_scale"] * F.normalize(pseudo_target, dim=-1) @ gather_rows(reference_vec).t()
        return self.mix_losses(logits_match, logits_align, logits_reason)
