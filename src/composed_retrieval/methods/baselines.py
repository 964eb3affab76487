"""Reference points every table needs: image-only, text-only and element-wise sum.

``sum`` with trainable towers is also CLIP4Cir's stage 1 (task-oriented fine-tuning). Its
``fusion`` (``method_config``) is ``"normalized"`` (default: each side L2-normalised, then
summed and normalised -- our variant) or ``"raw"`` (``normalize(image + text)`` on the towers'
raw features: CLIP4Cir's, CaLa's and SPN4CIR's ``element_wise_sum``, pinned by
``tests/test_faithfulness.py::test_sum_fusions``); ``text_weight`` w weighs the two sides,
``(1 - w) image + w text`` (0.5: the plain sum).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..encoders.base import EncoderPair, Features
from ..losses import batch_contrastive
from .base import CIRMethod, check_fusion, sum_compose
from .registry import register_method


class _Fixed(CIRMethod):
    """Shared training objective: the composed query classifies its target within the batch."""

    options = frozenset({"logit_scale"})

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        query = self.query_from_batch(batch)
        target = self.gallery_embedding(self.image_features(batch["target"]))
        loss = batch_contrastive(query, target, float(self.config.get("logit_scale", 100.0)))
        return {"loss": loss, "contrastive": loss.detach()}


@register_method("image_only")
class ImageOnly(_Fixed):
    def compose(self, reference: Features, text: Features) -> torch.Tensor:
        return F.normalize(reference.pooled.float(), dim=-1)


@register_method("text_only")
class TextOnly(_Fixed):
    def compose(self, reference: Features, text: Features) -> torch.Tensor:
        return F.normalize(text.pooled.float(), dim=-1)


@register_method("sum")
class Sum(_Fixed):
    options = frozenset({"logit_scale", "fusion", "text_weight"})

    def __init__(self, encoder: EncoderPair, config: dict[str, Any] | None = None) -> None:
        super().__init__(encoder, config)
        self.fusion = self.config.get("fusion", "normalized")
        self.text_weight = self.config.get("text_weight", 0.5)
        check_fusion(self.name, {"fusion": self.fusion, "text_weight": self.text_weight})
        self.text_weight = float(self.text_weight)
        # recorded with the run (config.json, results.json) even when the defaults were used
        self.config.update(fusion=self.fusion, text_weight=self.text_weight)

    def compose(self, reference: Features, text: Features) -> torch.Tensor:
        return sum_compose(reference.pooled.float(), text.pooled.float(), self.fusion, self.text_weight)
