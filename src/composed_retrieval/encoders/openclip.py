"""open_clip backbones (RN50x4, ViT-B-32, ViT-L-14, ...) behind the EncoderPair interface.

Weights come from a local file only (open_clip state dict, safetensors, or an OpenAI CLIP
archive/state dict); ``checkpoint=None`` gives random weights (tests). Nothing is downloaded:
open_clip treats a ``pretrained`` string that names a known tag as a download request, so the
model is always created with ``pretrained=None`` and the file is loaded afterwards.

Token features come from forward hooks on the model's own modules, registered for the duration
of one call (so copies of the model and DDP wrappers carry no stale hooks):

* ResNet (ModifiedResNet): the output of ``visual.layer4``, i.e. the map that enters attention
  pooling, as ``[B, h*w, C]`` (RN50x4 at 288 px: ``[B, 81, 2560]``); ``image_token_dim = C``.
* ViT: the output of ``visual.ln_post`` without the class token, i.e. the patch tokens after
  the final LayerNorm and *before* ``visual.proj`` (ViT-B-32 at 224 px: ``[B, 49, 768]``);
  ``image_token_dim`` is the ViT width, not the projected output dim.
* Text: the transformer output after ``ln_final`` ``[B, 77, width]``; the mask is True up to and
  including the EOT token. The text path runs the model's own submodules so a pseudo-word
  can be put at the "$" slot; without slots it equals ``model.encode_text`` exactly.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..data.preprocess import Preprocess
from ..errors import CheckpointError, ConfigError
from .base import EncoderPair, Features, replace_slots
from .weights import _one_line, is_torchscript_archive, read_state_dict

SLOT_WORD = "$"


class _RandomWeightsFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


_FILTER = _RandomWeightsFilter()


def _quiet_open_clip() -> None:
    """open_clip logs a root-logger warning for every random-weight model, which is the intended
    use here (weights are loaded right after); drop only that message."""
    root = logging.getLogger()
    if _FILTER not in root.filters:
        root.addFilter(_FILTER)


class OpenCLIPEncoder(EncoderPair):
    """An open_clip CLIP model with hooked token outputs and slot-aware text encoding."""

    def __init__(self, model_name: str, checkpoint: str | Path | None = None,
                 quick_gelu: bool | None = None, grad_checkpointing: bool = False) -> None:
        super().__init__()
        import open_clip

        _quiet_open_clip()
        if model_name not in open_clip.list_models():
            raise ConfigError(f"unknown open_clip model {model_name!r}; e.g. RN50x4, ViT-B-32, ViT-L-14 "
                              f"(open_clip.list_models() has {len(open_clip.list_models())})")
        jit_state = None
        if checkpoint is not None:
            checkpoint = Path(checkpoint)
            if not checkpoint.is_file():
                raise CheckpointError("checkpoint file not found", checkpoint)
            if is_torchscript_archive(checkpoint):
                jit_state = read_state_dict(checkpoint)
                for key in ("input_resolution", "context_length", "vocab_size"):
                    jit_state.pop(key, None)
                # OpenAI's archives were trained with QuickGELU; their config names lack the suffix
                quick_gelu = True if quick_gelu is None else quick_gelu
        model = open_clip.create_model(model_name, pretrained=None, force_quick_gelu=bool(quick_gelu))
        if checkpoint is not None:
            try:
                if jit_state is not None:
                    model.load_state_dict(jit_state, strict=True)
                else:
                    open_clip.load_checkpoint(model, str(checkpoint), strict=True, weights_only=True)
            except Exception as exc:  # open_clip raises RuntimeError/KeyError/StopIteration/...
                raise CheckpointError(f"cannot load into open_clip {model_name}: {_one_line(exc)}",
                                      checkpoint) from None
        if grad_checkpointing:
            # recompute each transformer block in backward instead of keeping its activations
            # (memory for compute; same values). open_clip checkpoints ViT and text towers; its
            # ResNet towers ignore the switch (batch-norm statistics would update twice)
            model.set_grad_checkpointing(True)
        self.model = model
        self.model_name = model_name
        self.config: dict[str, Any] = {
            "name": f"open_clip:{model_name}",
            "kwargs": {"quick_gelu": quick_gelu, **({"grad_checkpointing": True} if grad_checkpointing else {})},
            "checkpoint": None if checkpoint is None else str(Path(checkpoint).resolve()),
        }
        self._setup_dims(open_clip)

    def _setup_dims(self, open_clip: Any) -> None:
        from open_clip.modified_resnet import ModifiedResNet
        from open_clip.transformer import VisionTransformer

        m, visual = self.model, self.model.visual
        if not all(hasattr(m, a) for a in ("token_embedding", "transformer", "ln_final", "text_projection")):
            raise ConfigError(f"open_clip model {self.model_name!r} has a custom text tower; "
                              "only CLIP-style text towers are supported")
        if getattr(m, "text_pool_type", "argmax") != "argmax":
            raise ConfigError(f"open_clip model {self.model_name!r} pools text by "
                              f"{m.text_pool_type!r}; only 'argmax' (EOT) is supported")
        if isinstance(visual, ModifiedResNet):
            self._kind = "resnet"
            self._token_module = visual.layer4
            self.image_token_dim = int(visual.attnpool.k_proj.in_features)
        elif isinstance(visual, VisionTransformer):
            if visual.attn_pool is not None or visual.final_ln_after_pool:
                raise ConfigError(f"open_clip model {self.model_name!r}: ViTs with attention pooling or "
                                  "final_ln_after_pool are not supported")
            self._kind = "vit"
            self._token_module = visual.ln_post
            self._n_patches = int(visual.grid_size[0] * visual.grid_size[1])
            self.image_token_dim = int(visual.ln_post.normalized_shape[0])
        else:
            raise ConfigError(f"open_clip model {self.model_name!r}: vision tower "
                              f"{type(visual).__name__} is not supported (ResNet or ViT only)")
        size = visual.image_size
        if isinstance(size, (tuple, list)):
            if size[0] != size[1]:
                raise ConfigError(f"open_clip model {self.model_name!r} has non-square input {size}")
            size = size[0]
        self.image_size = int(size)
        proj = m.text_projection
        self.embed_dim = int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])
        self.text_token_dim = int(m.transformer.width)
        self.tokenizer = open_clip.get_tokenizer(self.model_name)
        ids = self.tokenizer([SLOT_WORD])[0]
        inner = ids[1: int(ids.argmax())]
        if inner.numel() != 1:
            raise ConfigError(f"open_clip tokenizer splits {SLOT_WORD!r} into {inner.numel()} tokens")
        self.slot_token_id = int(inner[0])

    # --- EncoderPair -------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def image_transform(self, kind: str = "targetpad") -> Callable:
        return Preprocess(kind, self.image_size)

    def encode_image(self, pixels: torch.Tensor) -> Features:
        captured: dict[str, torch.Tensor] = {}

        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            captured["out"] = output

        handle = self._token_module.register_forward_hook(hook)
        try:
            pooled = self.model.encode_image(pixels)
        finally:
            handle.remove()
        out = captured["out"]
        if self._kind == "resnet":
            tokens = out.flatten(2).transpose(1, 2)          # [B, h*w, C]
        else:
            tokens = out[:, -self._n_patches:]               # drop the class token
        return Features(pooled, tokens, None)

    def encode_text(self, token_ids: torch.Tensor, slot_embeddings: torch.Tensor | None = None) -> Features:
        m = self.model
        cast_dtype = m.transformer.get_cast_dtype()
        length = token_ids.shape[1]
        x = m.token_embedding(token_ids).to(cast_dtype)
        x = replace_slots(x, token_ids, self.slot_token_id, slot_embeddings)
        x = x + m.positional_embedding[:length].to(cast_dtype)
        attn_mask = m.attn_mask
        if attn_mask is not None and attn_mask.shape[0] != length:
            attn_mask = attn_mask[:length, :length]
        x = m.transformer(x, attn_mask=attn_mask)
        x = m.ln_final(x)                                    # [B, L, width]
        eot = token_ids.argmax(dim=-1)                       # EOT has the largest id
        pooled = x[torch.arange(x.shape[0], device=x.device), eot]
        proj = m.text_projection
        pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        mask = torch.arange(length, device=token_ids.device)[None, :] <= eot[:, None]
        return Features(pooled, x, mask)

    def image_parameters(self) -> list[nn.Parameter]:
        return list(self.model.visual.parameters())

    def text_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.model.named_parameters()
                if not n.startswith("visual.") and n not in ("logit_scale", "logit_bias")]
