"""DRA: dual relation alignment (Jiang et al., arXiv 2309.02169).

Two relations in a triplet (reference R, text C, target T):
* implicit (R + T -> C): ``Fv = TAC(R tokens, T tokens)`` is aligned with the text feature Fc;
* explicit (R + C -> T): the query-target matching, where the fused visual feature
  "compensates" the text (``Fc + Fv``) before the multimodal compositor (CLIP4Cir's Combiner,
  reused from ``combiner.py``) fuses it with the reference.

At inference there is no target, so there is no Fv. Read literally (the training query built
from ``Fc + Fv`` for every triplet, the inference query from ``Fc``), the target leaks into the
training query: on triplets whose target is independent of reference and text, the training
query's cross-entropy falls far below chance while the inference query's rises above it
(``tests/test_faithfulness.py::test_dra_no_target_leak``; ``compensation: "target"`` keeps that
reading only to measure it). Which reading is implemented (``compensation``):

* ``"mixed"`` (default; the closest to the paper): the paper's two roles of Fv are kept --
  Fv is trained only by the implicit alignment (the text-aligned branch) and compensates the
  text in the training query -- with two changes that keep the training query one inference
  can also build: Fv enters the query with a stop-gradient (the matching loss cannot teach TAC
  to carry the target), and for a random fraction ``fv_drop`` (0.5) of each batch the text is
  not compensated, which is exactly the inference query (modality dropout);
* ``"predicted"``: leak-free by construction: the text is compensated by ``P(R, Fc)``, a small
  network trained to identify its triplet's detached Fv among the batch's (loss ``relation``),
  in training and at inference alike; Fv reaches the query only as P's training target;
* ``"target"``: the literal reading above; leaks the target; do not train with it.

``metrics.jsonl`` has, per epoch, ``match`` (training query) and ``match_inference`` (the
query ``compose`` builds), so any train/inference gap is visible.

Settings and where they come from:
* backbone CLIP RN50x4, spatial tokens 9x9x2560, embedding 640; the vision compositor is a
  twin attention compositor with 4 attention layers (paper; TAC details follow the same authors'
  public CaLa code, see ``tac.py``: 1 head, dropout 0, attention width 640);
* Combiner: projection 4d = 2560, hidden 8d = 5120, dropout 0.5; matching logits ``100 * q @ t.T``
  (CLIP4Cir, github.com/ABaldrati/CLIP4Cir ``src/combiner.py`` and README);
* two stages, as CLIP4Cir's (the paper's summary: "first warm-up text encoder with alignment
  losses, then fine-tune compositors with combined implicit and explicit losses"):
  ``warmup`` trains the text side (the text tower when the stage enables it, TAC, the alignment
  head) with the matching and implicit losses while the query is CLIP4Cir's stage-1 element-wise
  sum; it never trains the inference compositor (Combiner, relation predictor), so a table that
  compares DRA with the Combiner gives both the same steps on the modules inference uses;
  ``main`` trains TAC and the Combiner with both losses. The paper's text was not available to
  check the exact stage-1 parameter set.
* implicit alignment logits ``10 * text @ Fv.T`` against the diagonal, on L2-normalised
  features: scale 10 as in CaLa's public code for the same TAC-to-text alignment (that code does
  not normalise; we do, so that 10 is an inverse temperature). Loss weights default to 1.

Config (``method_config``): ``implicit`` (bool, alignment loss on/off), ``explicit`` (bool,
compensation on/off), ``compensation`` ("mixed" | "predicted" | "target"), ``fv_drop``,
``fusion`` ("normalized" | "raw") and ``text_weight`` of the warm-up's sum (see ``sum_compose``),
``w_match``, ``w_implicit``, ``w_relation``, ``match_scale``, ``implicit_scale``,
``tac_layers``, ``tac_heads``, ``tac_dropout``, ``tac_share_layers``, ``tac_shared_cls``,
``align_head`` (a linear head on Fv for the implicit loss, our choice so that the alignment
target and the compensation need not share one space), ``projection_dim``, ``hidden_dim``,
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
from .base import (CIRMethod, check_fusion, check_weight, excluding, read_options, require_tokens,
                   sum_compose)
from .combiner import CombinerNet
from .registry import register_method
from .tac import TwinAttentionCompositor


COMPENSATIONS = ("predicted", "mixed", "target")


class RelationPredictor(nn.Module):
    """``P(R, Fc) -> [B, d]``: the visual relation as it can be estimated without the target.

    Trained to identify its triplet's (detached) ``Fv`` among the batch's, so that the text is
    compensated by the same kind of vector in training and at inference.
    """

    def __init__(self, dim: int, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden_dim = hidden_dim or 2 * dim
        self.net = nn.Sequential(nn.Linear(2 * dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, dim))

    def forward(self, reference: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([F.normalize(reference, dim=-1), F.normalize(text, dim=-1)], dim=-1))


@register_method("dra")
class DRA(CIRMethod):
    """Combiner whose text is compensated by the visual relation, trained with explicit
    matching plus implicit text alignment of ``Fv = TAC(R, T)``."""

    stages = ("warmup", "main")
    DEFAULTS: dict[str, Any] = {
        "implicit": True, "explicit": True, "compensation": "mixed", "fv_drop": 0.5,
        "w_match": 1.0, "w_implicit": 1.0, "w_relation": 1.0, "fusion": "normalized", "text_weight": 0.5,
        "match_scale": 100.0, "implicit_scale": 10.0, "align_head": True,
        "tac_layers": 4, "tac_heads": 1, "tac_dropout": 0.0, "tac_share_layers": False, "tac_shared_cls": False,
        "projection_dim": None, "hidden_dim": None, "dropout": 0.5,
    }

    def __init__(self, encoder: EncoderPair, config: dict[str, Any] | None = None) -> None:
        super().__init__(encoder, config)
        self.options = o = read_options(self.name, self.config, self.DEFAULTS)
        if o["w_match"] <= 0:
            raise ConfigError("method_config.w_match: must be > 0 for dra; without the matching loss "
                              "the query compositor is never trained")
        for key in ("w_implicit", "w_relation"):
            if o[key] < 0:
                raise ConfigError(f"method_config.{key}: must be >= 0 for dra, got {o[key]}")
        if o["compensation"] not in COMPENSATIONS:
            raise ConfigError(f"method_config.compensation: expected one of {', '.join(COMPENSATIONS)} for dra, "
                              f"got {o['compensation']!r}")
        check_weight(self.name, "fv_drop", o["fv_drop"])
        check_fusion(self.name, o)
        d = encoder.embed_dim
        self.tac = TwinAttentionCompositor(encoder.image_token_dim, d, num_layers=o["tac_layers"],
                                           num_heads=o["tac_heads"], dropout=o["tac_dropout"],
                                           share_layers=o["tac_share_layers"], shared_cls=o["tac_shared_cls"])
        self.align_head = nn.Linear(d, d) if o["align_head"] else nn.Identity()
        self.combiner = CombinerNet(d, o["projection_dim"], o["hidden_dim"], o["dropout"])
        self.relation_predictor = RelationPredictor(d) if self.predicts else None
        # persisted with the weights, so a checkpoint saved after the warm-up alone composes
        # the way it was trained (element-wise sum) and one saved after "main" uses the Combiner
        self.register_buffer("combiner_in_use", torch.zeros((), dtype=torch.bool))

    @property
    def predicts(self) -> bool:
        return self.options["explicit"] and self.options["compensation"] == "predicted"

    @property
    def uses_implicit(self) -> bool:
        return self.options["implicit"] and self.options["w_implicit"] > 0

    @property
    def uses_tac(self) -> bool:
        """TAC is computed (implicit loss, or Fv as compensation or as the predictor's target)."""
        return self.uses_implicit or self.options["explicit"]

    @property
    def trains_tac(self) -> bool:
        """A loss sends gradient to TAC: the implicit term, or the leaky literal reading."""
        return self.uses_implicit or (self.options["explicit"] and self.options["compensation"] == "target")

    def set_stage(self, stage: str) -> None:
        super().set_stage(stage)
        self.combiner_in_use.fill_(stage == "main")

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Only what the current stage's losses reach. The warm-up trains no module of the
        inference compositor (Combiner, relation predictor), so a table that compares DRA with
        the Combiner gives both the same number of steps on what inference uses."""
        unused: list[nn.Module] = []
        if self.stage == "warmup":
            unused.append(self.combiner)
            if self.relation_predictor is not None:
                unused.append(self.relation_predictor)
        if not self.uses_implicit:
            unused.append(self.align_head)
        if not self.trains_tac:
            unused.append(self.tac)
        return excluding(super().trainable_parameters(), unused)

    def _query(self, reference: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if bool(self.combiner_in_use):
            return F.normalize(self.combiner(reference, text), dim=-1)
        return sum_compose(reference, text, self.options["fusion"], self.options["text_weight"])

    def _inference_text(self, reference: torch.Tensor, fc: torch.Tensor) -> torch.Tensor:
        """The text the query compositor gets at inference: compensated by the predicted
        relation once the main stage trains it, else the text feature alone."""
        if self.relation_predictor is not None and bool(self.combiner_in_use):
            return fc + self.relation_predictor(reference, fc)
        return fc

    def compose(self, reference: Features, text: Features) -> torch.Tensor:
        ref, fc = reference.pooled.float(), text.pooled.float()
        return self._query(ref, self._inference_text(ref, fc))

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
        ref, fc = reference.pooled.float(), text.pooled.float()
        fv = self.visual_relation(reference, target) if self.uses_tac else None
        target_vec = self.gallery_embedding(target)

        inference_text = self._inference_text(ref, fc)
        inference_query = self._query(ref, inference_text)
        out: dict[str, torch.Tensor] = {}
        if o["explicit"] and o["compensation"] == "target":
            # the literal reading (Fc + Fv into the training query): the target leaks, kept
            # only to measure that leak (tests/test_faithfulness.py)
            train_query = self._query(ref, fc + fv)
        elif o["explicit"] and o["compensation"] == "mixed":
            # Fv (detached) compensates the text of a random part of the batch, the rest gets
            # the inference query: the compositor is trained on what inference gives it
            # (in eval mode a fixed split, the first fv_drop of the rows uncompensated)
            draw = (torch.rand(fc.shape[0], 1, device=fc.device) if self.training else
                    (torch.arange(fc.shape[0], device=fc.device)[:, None] + 0.5) / fc.shape[0])
            keep = (draw >= o["fv_drop"]).to(fc.dtype)
            train_query = self._query(ref, fc + keep * fv.detach())
        else:
            train_query = inference_query
        match = batch_contrastive(train_query, target_vec, o["match_scale"])
        loss = o["w_match"] * match
        out["match"] = match.detach()
        if train_query is inference_query:
            out["match_inference"] = out["match"]
        else:
            with torch.no_grad():
                out["match_inference"] = batch_contrastive(inference_query, target_vec, o["match_scale"])
        if self.uses_implicit:
            aligned = F.normalize(self.align_head(fv), dim=-1)
            implicit = batch_contrastive(F.normalize(fc, dim=-1), aligned, o["implicit_scale"])
            loss = loss + o["w_implicit"] * implicit
            out["implicit"] = implicit.detach()
        if self.relation_predictor is not None and bool(self.combiner_in_use) and o["w_relation"] > 0:
            predicted = F.normalize(inference_text - fc, dim=-1)
            relation = batch_contrastive(predicted, F.normalize(fv.detach(), dim=-1), o["implicit_scale"])
            loss = loss + o["w_relation"] * relation
            out["relation"] = relation.detach()
        out["loss"] = loss
        return out
