"""DRA: dual relation alignment (Jiang et al., arXiv 2309.02169).

Two relations in a triplet (reference R, text C, target T):
* explicit (R + C -> T): the usual query-target matching; during training the text feature is
  augmented with the vision compositor's output, ``Fc + Fv``, before the multimodal compositor
  (CLIP4Cir's Combiner, reused from ``combiner.py``) fuses it with the reference;
* implicit (R + T -> C): ``Fv = TAC(R tokens, T tokens)`` is aligned with the text feature.

At inference there is no target: the query is ``Combiner(R, Fc)``.

Settings and where they come from:
* backbone CLIP RN50x4, spatial tokens 9x9x2560, embedding 640; the vision compositor is a
  twin attention compositor with 4 attention layers (paper; TAC details follow the same authors'
  public CaLa code, see ``tac.py``: 1 head, dropout 0, attention width 640);
* Combiner: projection 4d = 2560, hidden 8d = 5120, dropout 0.5; matching logits ``100 * q @ t.T``
  (CLIP4Cir, github.com/ABaldrati/CLIP4Cir README and DESIGN section 3);
* two stages (DESIGN section 3): ``warmup`` trains the text side (text tower when the stage
  enables it, TAC, the alignment head) with both alignment losses while the query is the
  CLIP4Cir stage-1 element-wise sum of reference and (augmented) text; ``main`` trains the
  compositors (TAC and Combiner) with both losses. The paper's text was not available to check
  the exact stage-1 parameter set; this follows the design doc.
* implicit alignment logits ``10 * text @ Fv.T`` against the diagonal, on L2-normalised
  features: scale 10 as in CaLa's public code for the same TAC-to-text alignment (that code does
  not normalise; we do, so that 10 is an inverse temperature). Loss weights default to 1.

Config (``method_config``): ``implicit`` (bool, alignment loss on/off), ``explicit`` (bool,
``Fc + Fv`` augmentation on/off), ``w_match``, ``w_implicit``, ``match_scale``,
``implicit_scale``, ``tac_layers``, ``tac_heads``, ``tac_dropout``, ``tac_share_layers``,
``align_head`` (a linear head on Fv for the implicit loss, our choice so that the alignment
target and the augmentation need not share one space), ``projection_dim``, ``hidden_dim``,
``dropout`` (Combiner). Keys starting with ``_`` are comments.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..encoders.base import EncoderPair, Features
from ..errors import ConfigError
from ..losses import batch_contrastive
from .base import CIRMethod, excluding, read_options, require_tokens, sum_compose
from .combiner import CombinerNet
from .registry import register_method
from .tac import TwinAttentionCompositor

@register_method("dra")
class DRA(CIRMethod):
    """TAC-augmented Combiner trained with explicit matching plus implicit text alignment."""

    stages = ("warmup", "main")
    DEFAULTS: dict[str, Any] = {
        "implicit": True, "explicit": True, "w_match": 1.0, "w_implicit": 1.0,
        "match_scale": 100.0, "implicit_scale": 10.0, "align_head": True,
        "tac_layers": 4, "tac_heads": 1, "tac_dropout": 0.0, "tac_share_layers": False,
        "projection_dim": None, "hidden_dim": None, "dropout": 0.5,
    }

    def __init__(self, encoder: EncoderPair, config: dict[str, Any] | None = None) -> None:
        super().__init__(encoder, config)
        self.options = o = read_options(self.name, self.config, self.DEFAULTS)
        if o["w_match"] <= 0:
            raise ConfigError("method_config.w_match: must be > 0 for dra; without the matching loss "
                              "the query compositor is never trained")
        if o["w_implicit"] < 0:
            raise ConfigError(f"method_config.w_implicit: must be >= 0 for dra, got {o['w_implicit']}")
        d = encoder.embed_dim
        self.tac = TwinAttentionCompositor(encoder.image_token_dim, d, num_layers=o["tac_layers"],
                                           num_heads=o["tac_heads"], dropout=o["tac_dropout"],
                                           share_layers=o["tac_share_layers"])
        self.align_head = nn.Linear(d, d) if o["align_head"] else nn.Identity()
        self.combiner = CombinerNet(d, o["projection_dim"], o["hidden_dim"], o["dropout"])
        # persisted with the weights, so a checkpoint saved after the warm-up alone composes
        # the way it was trained (element-wise sum) and one saved after "main" uses the Combiner
        self.register_buffer("combiner_in_use", torch.zeros((), dtype=torch.bool))

    @property
    def uses_implicit(self) -> bool:
        return self.options["implicit"] and self.options["w_implicit"] > 0

    @property
    def uses_tac(self) -> bool:
        return self.uses_implicit or self.options["explicit"]

    def set_stage(self, stage: str) -> None:
        super().set_stage(stage)
        self.combiner_in_use.fill_(stage == "main")

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Only what the current stage's losses reach: no Combiner in the warm-up, no alignment
        head or TAC when the terms that use them are switched off."""
        unused: list[nn.Module] = []
        if self.stage == "warmup":
            unused.append(self.combiner)
        if not self.uses_implicit:
            unused.append(self.align_head)
        if not self.uses_tac:
            unused.append(self.tac)
        return excluding(super().trainable_parameters(), unused)

    def _query(self, reference: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if bool(self.combiner_in_use):
            return F.normalize(self.combiner(reference, text), dim=-1)
        return sum_compose(reference, text)

    def compose(self, reference: Features, text: Features) -> torch.Tensor:
        return self._query(reference.pooled.float(), text.pooled.float())

    def visual_relation(self, reference: Features, target: Features) -> torch.Tensor:
        """Fv = TAC(reference tokens, target tokens), ``[B, d]`` (unnormalised)."""
        require_tokens(reference, "reference image", self.name)
        require_tokens(target, "target image", self.name)
        return self.tac(reference.tokens.float(), target.tokens.float(), reference.mask, target.mask)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        o = self.options
        reference = self.image_features(batch["reference"])
        target = self.image_features(batch["target"])
        text = self.text_features(batch["text"])
        fc = text.pooled.float()
        fv = self.visual_relation(reference, target) if self.uses_tac else None

        text_for_query = fc + fv if o["explicit"] else fc
        query = self._query(reference.pooled.float(), text_for_query)
        match = batch_contrastive(query, self.gallery_embedding(target), o["match_scale"])
        loss = o["w_match"] * match
        out = {"match": match.detach()}
        if self.uses_implicit:
            aligned = F.normalize(self.align_head(fv), dim=-1)
            implicit = batch_contrastive(F.normalize(fc, dim=-1), aligned, o["implicit_scale"])
            loss = loss + o["w_implicit"] * implicit
            out["implicit"] = implicit.detach()
        out["loss"] = loss
        return out
