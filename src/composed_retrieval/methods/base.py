"""What a method is: a module that turns a batch into losses and (reference, text) into a query.

Every method (baselines, Combiner, DRA, CaLa, textual inversion) subclasses :class:`CIRMethod`,
so the one training loop, the evaluation code, the feature cache and the index serve them all.

Batch layout given to ``forward`` by the training loop:
    reference   Tensor [B,3,H,W] pixels, or Features from the cache (frozen image tower)
    target      same as reference
    text        LongTensor [B,L] token ids of the modification text
    target_index LongTensor [B] (optional) index of the target in the SPN negative bank
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..encoders.base import EncoderPair, Features
from ..errors import ConfigError


class StageError(ConfigError, ValueError):
    """An unknown stage name: a config mistake (one-line CLI error), still a ValueError for callers."""


class CIRMethod(nn.Module):
    """Base class. Subclasses implement ``compose`` and ``forward``; most keep the default
    gallery side (the image tower's normalised pooled feature)."""

    name: str = "base"
    #: training stages in order; the loop calls ``set_stage`` before each
    stages: tuple[str, ...] = ("main",)
    #: ``method_config`` keys this method reads; None: the subclass checks its own (DRA, CaLa,
    #: textual inversion). A typo must fail, not silently train the default.
    options: frozenset[str] | None = None

    def __init__(self, encoder: EncoderPair, config: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = dict(config or {})
        if self.options is not None:
            allowed = self.options | {"train_image_tower", "train_text_tower"}
            unknown = sorted(k for k in self.config if not k.startswith("_") and k not in allowed)
            if unknown:
                raise ConfigError(f"method_config.{unknown[0]}: unknown option for {self.name}; expected one of "
                                  f"{', '.join(sorted(allowed))}")
        self.stage = self.stages[0]
        self.train_image_tower = bool(self.config.get("train_image_tower", False))
        self.train_text_tower = bool(self.config.get("train_text_tower", False))

    # ---- stages and what trains -------------------------------------------------------
    def set_stage(self, stage: str) -> None:
        if stage not in self.stages:
            raise StageError(f"method {self.name!r} has stages {', '.join(self.stages)}, not {stage!r} "
                             "(check the config's stages[].name)")
        self.stage = stage

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters of the method's own modules (everything but the encoder)."""
        enc = {id(p) for p in self.encoder.parameters()}
        return [p for p in self.parameters() if id(p) not in enc]

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = list(self.head_parameters())
        if self.train_image_tower:
            params += list(self.encoder.image_parameters())
        if self.train_text_tower:
            params += list(self.encoder.text_parameters())
        return params

    def module_groups(self) -> dict[int, str]:
        """``id(parameter) -> module name``: "image tower", "text tower" or the method's own
        top-level module (combiner, tac, ...). Names what a stage trains (metrics.jsonl
        ``trains``) and what a loss term reaches (benchmarks/grad_report.py)."""
        groups = {id(p): n.split(".")[0] for n, p in self.named_parameters()}
        groups.update({id(p): "text tower" for p in self.encoder.text_parameters()})
        groups.update({id(p): "image tower" for p in self.encoder.image_parameters()})
        return groups

    @property
    def image_tower_frozen(self) -> bool:
        """With a frozen image tower the loop may feed cached features instead of pixels."""
        return not self.train_image_tower

    # ---- encoding ----------------------------------------------------------------------
    def image_features(self, x: torch.Tensor | Features) -> Features:
        if isinstance(x, Features):
            return x
        if self.train_image_tower and self.training:
            return self.encoder.encode_image(x)
        with torch.no_grad():
            return self.encoder.encode_image(x).detach()

    def text_features(self, token_ids: torch.Tensor, slot_embeddings: torch.Tensor | None = None) -> Features:
        if self.train_text_tower and self.training or slot_embeddings is not None:
            return self.encoder.encode_text(token_ids, slot_embeddings)
        with torch.no_grad():
            return self.encoder.encode_text(token_ids).detach()

    # ---- the two things a method defines -----------------------------------------------
    def compose(self, reference: Features, text: Features) -> torch.Tensor:
        """Normalised query ``[B, d]`` from the reference image and the modification text."""
        raise NotImplementedError

    def gallery_embedding(self, image: Features) -> torch.Tensor:
        """Normalised gallery-side vector ``[B, d]``; the index stores these."""
        return F.normalize(image.pooled.float(), dim=-1)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Losses of one batch; key ``loss`` is the one optimised."""
        raise NotImplementedError

    # ---- helpers shared by methods -----------------------------------------------------
    def query_from_batch(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.compose(self.image_features(batch["reference"]), self.text_features(batch["text"]))


# ---- helpers shared by the methods (option parsing, the sum query, parameter groups) ----
#: keys of CIRMethod's own config that every method accepts
BASE_KEYS = {"train_image_tower": False, "train_text_tower": False}


def read_options(method: str, config: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """Defaults overlaid with ``config``, each value checked against its default's type.

    Unknown keys are an error (a typo such as ``w_hac`` must not silently train the default).
    """
    allowed = {**BASE_KEYS, **defaults}
    out = dict(allowed)
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if key not in allowed:
            raise ConfigError(f"method_config.{key}: unknown option for {method}; expected one of "
                              f"{', '.join(sorted(allowed))}")
        default = allowed[key]
        if default is None:
            ok = value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0)
            kind = "a positive integer or null"
        elif isinstance(default, bool):
            ok, kind = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif isinstance(default, float):
            ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        else:
            ok, kind = isinstance(value, type(default)), type(default).__name__
        if not ok:
            raise ConfigError(f"method_config.{key}: expected {kind} for {method}, got {value!r}")
        out[key] = float(value) if isinstance(default, float) else value
    return out


class CaLaLoss:
    """CaLa's loss, shared by its CLIP and BLIP-2 variants (``cala.py``, ``cala_blip2.py``):
    ``w_hca * CE(reason) + (1 - w_hca) * CE(w_tac * align + (1 - w_tac) * match)``, each term
    only when its switch is on and its weight positive (CaLa's ``blip_fine_tune.py``)."""

    options: dict[str, Any]

    @property
    def uses_tac(self) -> bool:
        return self.options["tac"] and self.options["w_tac"] > 0

    @property
    def uses_hca(self) -> bool:
        return self.options["hca"] and self.options["w_hca"] > 0

    def mix_losses(self, logits_match: torch.Tensor, logits_align: torch.Tensor | None,
                   logits_reason: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The loss and every term's CE (detached, for metrics.jsonl)."""
        from ..losses import diagonal_cross_entropy
        o = self.options
        out: dict[str, torch.Tensor] = {"match": diagonal_cross_entropy(logits_match.detach())}
        logits = logits_match
        if logits_align is not None:
            out["align"] = diagonal_cross_entropy(logits_align.detach())
            logits = o["w_tac"] * logits_align + (1 - o["w_tac"]) * logits_match
        contrastive = diagonal_cross_entropy(logits)
        out["contrastive"] = contrastive.detach()
        loss = contrastive
        if logits_reason is not None:
            reasoning = diagonal_cross_entropy(logits_reason)
            out["reasoning"] = reasoning.detach()
            loss = o["w_hca"] * reasoning + (1 - o["w_hca"]) * contrastive
        out["loss"] = loss
        return out


def check_weight(method: str, key: str, value: float, upper_open: bool = False) -> None:
    if not 0.0 <= value <= 1.0 or (upper_open and value == 1.0):
        bound = "[0, 1)" if upper_open else "[0, 1]"
        raise ConfigError(f"method_config.{key}: must be in {bound} for {method}, got {value}")


def require_tokens(features: Features, role: str, method: str) -> None:
    if features.tokens is None or features.tokens.dim() != 3 or features.tokens.shape[1] == 0:
        raise ConfigError(f"{method} needs token-level {role} features [B, L, d_tok]; the feature cache "
                          f"must be built with tokens")


FUSIONS = ("raw", "normalized")


def sum_compose(image: torch.Tensor, text: torch.Tensor, fusion: str = "normalized",
                text_weight: float = 0.5) -> torch.Tensor:
    """Element-wise sum query ``[B, d]``, L2-normalised.

    ``raw``: ``normalize((1 - w) image + w text)`` on the features as the towers give them --
    with ``w = 0.5`` exactly CLIP4Cir's, CaLa's and SPN4CIR's ``element_wise_sum``
    (``F.normalize(image + text)``, github.com/ABaldrati/CLIP4Cir ``src/utils.py``);
    ``normalized``: each side L2-normalised first, ``normalize((1 - w) î + w t̂)``, so neither
    tower dominates by its norm (our variant, not the public code's).
    """
    if fusion not in FUSIONS:
        raise ConfigError(f"method_config.fusion: expected one of {', '.join(FUSIONS)}, got {fusion!r}")
    if fusion == "normalized":
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    return F.normalize((1.0 - text_weight) * image + text_weight * text, dim=-1)


def check_fusion(method: str, options: dict[str, Any]) -> None:
    """``fusion`` and ``text_weight`` of a method's sum, with one-line errors."""
    if options["fusion"] not in FUSIONS:
        raise ConfigError(f"method_config.fusion: expected one of {', '.join(FUSIONS)} for {method}, "
                          f"got {options['fusion']!r}")
    w = options["text_weight"]
    if isinstance(w, bool) or not isinstance(w, (int, float)):
        raise ConfigError(f"method_config.text_weight: expected a number for {method}, got {w!r}")
    check_weight(method, "text_weight", float(w))


def excluding(params: list[nn.Parameter], modules: list[nn.Module]) -> list[nn.Parameter]:
    drop = {id(p) for m in modules for p in m.parameters()}
    return [p for p in params if id(p) not in drop]
