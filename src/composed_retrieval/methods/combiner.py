"""CLIP4Cir's Combiner (Baldrati et al.): the multimodal compositor that DRA reuses too.

Stage 1 fine-tunes the towers with an element-wise sum (stage ``finetune``; ``fusion`` as in the
``sum`` method); stage 2 trains this network on frozen towers. ``CombinerNet`` follows
github.com/ABaldrati/CLIP4Cir ``src/combiner.py`` (``combine_features``) and equals it on
unit-norm inputs (``tests/test_faithfulness.py``); the one deliberate difference is that it
L2-normalises its inputs first (see ``CombinerNet.forward``), so on raw CLIP features it is not
CLIP4Cir's function.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..encoders.base import EncoderPair, Features
from ..losses import batch_contrastive
from .base import CIRMethod, check_fusion, sum_compose
from .registry import register_method


class CombinerNet(nn.Module):
    """out = W_o h + lambda t + (1 - lambda) i with a learned, input-dependent lambda.

    Widths follow CLIP4Cir: projection 4d, hidden 8d, dropout 0.5.
    """

    def __init__(self, dim: int, projection_dim: int | None = None, hidden_dim: int | None = None,
                 dropout: float = 0.5) -> None:
        super().__init__()
        projection_dim = projection_dim or 4 * dim
        hidden_dim = hidden_dim or 8 * dim
        self.text_projection = nn.Linear(dim, projection_dim)
        self.image_projection = nn.Linear(dim, projection_dim)
        self.combiner_layer = nn.Linear(2 * projection_dim, hidden_dim)
        self.output_layer = nn.Linear(hidden_dim, dim)
        self.dynamic_scalar = nn.Sequential(
            nn.Linear(2 * projection_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden_dim, 1), nn.Sigmoid())
        self.dropout = nn.Dropout(dropout)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Unnormalised composed feature ``[B, d]`` from pooled image and text features.

        The inputs are L2-normalised first: the residual ``lambda t + (1 - lambda) i`` mixes the
        two towers' features, which only means something when they are on one scale (CLIP's
        towers happen to give similar norms; a tower trained from scratch need not).
        """
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        t = self.dropout(F.relu(self.text_projection(text)))
        i = self.dropout(F.relu(self.image_projection(image)))
        c = torch.cat([t, i], dim=-1)
        h = self.dropout(F.relu(self.combiner_layer(c)))
        lam = self.dynamic_scalar(c)
        return self.output_layer(h) + lam * text + (1 - lam) * image


@register_method("combiner")
class Combiner(CIRMethod):
    """CLIP4Cir in two stages: ``finetune`` trains the towers with an element-wise sum query;
    ``combiner`` trains the Combiner on the (then frozen) towers. Both use batch-based
    classification with logit scale 100. A run may list only the ``combiner`` stage when the
    towers are already adapted (``init_from`` a stage-1 run)."""

    stages = ("finetune", "combiner")
    options = frozenset({"projection_dim", "hidden_dim", "dropout", "logit_scale", "fusion", "text_weight"})

    def __init__(self, encoder: EncoderPair, config: dict[str, Any] | None = None) -> None:
        super().__init__(encoder, config)
        d = encoder.embed_dim
        self.combiner = CombinerNet(d, self.config.get("projection_dim"), self.config.get("hidden_dim"),
                                    float(self.config.get("dropout", 0.5)))
        self.logit_scale = float(self.config.get("logit_scale", 100.0))
        # the stage-1 sum: "normalized" (default) or CLIP4Cir's "raw" (see methods/base.py)
        self.fusion = {"fusion": self.config.get("fusion", "normalized"), "text_weight": self.config.get("text_weight", 0.5)}
        check_fusion(self.name, self.fusion)
        self.config.update(self.fusion)

    def compose(self, reference: Features, text: Features) -> torch.Tensor:
        if self.stage == "finetune":
            return sum_compose(reference.pooled.float(), text.pooled.float(), self.fusion["fusion"],
                               float(self.fusion["text_weight"]))
        out = self.combiner(reference.pooled.float(), text.pooled.float())
        return F.normalize(out, dim=-1)

    def head_parameters(self) -> list[nn.Parameter]:
        # stage 1 trains the towers only; the Combiner starts training in stage 2
        return [] if self.stage == "finetune" else list(self.combiner.parameters())

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        query = self.query_from_batch(batch)
        target = self.gallery_embedding(self.image_features(batch["target"]))
        loss = batch_contrastive(query, target, self.logit_scale)
        return {"loss": loss, "contrastive": loss.detach()}
