"""Reference points every table needs: image-only, text-only and element-wise sum.

``sum`` with trainable towers is also CLIP4Cir's stage 1 (task-oriented fine-tuning).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..encoders.base import Features
from ..losses import batch_contrastive
from .base import CIRMethod, sum_compose
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
    def compose(self, reference: Features, text: Features) -> torch.Tensor:
        return sum_compose(reference.pooled.float(), text.pooled.float())
