"""open_clip backbones (RN50x4, ViT-B-32, ViT-L-14, ...) behind the EncoderPair interface.

Weights come from local files only: a model name plus a weights file (open_clip state dict,
safetensors, or an OpenAI CLIP archive/state dict), or an open_clip Hugging Face folder
(``open_clip_config.json`` + ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``),
whose ``preprocess_cfg`` (mean, std, resize mode, interpolation) replaces the CLIP defaults.
Without weights the encoder is refused unless ``random_weights=True`` is asked for (tests, or
towers trained from scratch). Nothing is downloaded: open_clip treats a ``pretrained`` string
that names a known tag as a download request, so the model is always created without weights
and the file is loaded afterwards, with safetensors or ``torch.load(weights_only=True)``.

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

from ..data.preprocess import CLIP_MEAN, CLIP_STD, INTERPOLATIONS, RESIZE_MODES, Preprocess
from ..errors import CheckpointError, ConfigError
from ..fileio import read_json
from .base import EncoderPair, Features, replace_slots
from .weights import _one_line, is_torchscript_archive, read_state_dict

SLOT_WORD = "$"
FOLDER_CONFIG = "open_clip_config.json"
FOLDER_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class _RandomWeightsFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "No pretrained weights loaded" not in message and "no CLIP weights found" not in message


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
                 quick_gelu: bool | None = None, random_weights: bool = False,
                 grad_checkpointing: bool = False) -> None:
        super().__init__()
        import open_clip

        _quiet_open_clip()
        self.preprocess_cfg: dict[str, Any] = {}
        folder = Path(model_name)
        if model_name not in open_clip.list_models() and (folder / FOLDER_CONFIG).is_file():
            self._init_folder(open_clip, folder, checkpoint, quick_gelu, random_weights)
            return
        if model_name not in open_clip.list_models():
            hint = f" ({folder} has no {FOLDER_CONFIG})" if folder.is_dir() else ""
            raise ConfigError(f"unknown open_clip model or folder {model_name!r}{hint}; e.g. RN50x4, ViT-B-32, "
                              f"ViT-L-14 (open_clip.list_models() has {len(open_clip.list_models())}) or a "
                              f"folder with {FOLDER_CONFIG}")
        if checkpoint is None and not random_weights:
            raise ConfigError(f"open_clip:{model_name} has no weights: pass --encoder-checkpoint FILE "
                              "(or encoder_checkpoint), or ask for random weights explicitly with "
                              "--random-weights (encoder_config {\"random_weights\": true})")
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
            "kwargs": {"quick_gelu": quick_gelu, **({"random_weights": True} if random_weights else {}),
                       **({"grad_checkpointing": True} if grad_checkpointing else {})},
            "checkpoint": None if checkpoint is None else str(Path(checkpoint).resolve()),
        }
        self._setup_dims(open_clip, model_name)

    def _init_folder(self, open_clip: Any, folder: Path, checkpoint: str | Path | None,
                     quick_gelu: bool | None, random_weights: bool) -> None:
        """An open_clip Hugging Face folder: its config, its weights, its preprocessing."""
        cfg = read_json(folder / FOLDER_CONFIG, "open_clip config")
        if not isinstance(cfg, dict) or not isinstance(cfg.get("model_cfg"), dict):
            raise ConfigError(f"{folder / FOLDER_CONFIG}: expected an object with a 'model_cfg' object")
        if checkpoint is not None:
            raise ConfigError(f"open_clip folder {folder} carries its own weights ({' or '.join(FOLDER_WEIGHTS)}); "
                              "drop --encoder-checkpoint")
        weights = next((folder / n for n in FOLDER_WEIGHTS if (folder / n).is_file()), None)
        if weights is None and not random_weights:
            raise ConfigError(f"open_clip folder {folder} has no weights ({' or '.join(FOLDER_WEIGHTS)}); "
                              "ask for random weights explicitly with --random-weights")
        self.preprocess_cfg = _folder_preprocess(cfg.get("preprocess_cfg") or {}, folder / FOLDER_CONFIG)
        try:
            model = open_clip.create_model(f"local-dir:{folder}", load_weights=False,
                                           force_quick_gelu=bool(quick_gelu))
        except Exception as exc:  # a model_cfg open_clip cannot build
            raise ConfigError(f"{folder / FOLDER_CONFIG}: open_clip cannot build this model_cfg "
                              f"({_one_line(exc)})") from None
        if weights is not None:
            state = read_state_dict(weights)
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise CheckpointError(f"weights do not fit {FOLDER_CONFIG}: {_one_line(exc)}", weights) from None
        self.model = model
        self.model_name = str(folder.resolve())
        self.config = {
            "name": f"open_clip:{folder.resolve()}",
            "kwargs": {"quick_gelu": quick_gelu, **({"random_weights": True} if weights is None else {})},
            "checkpoint": None,
            "weights_file": None if weights is None else str(weights.resolve()),
        }
        self._setup_dims(open_clip, f"local-dir:{folder}")

    def _setup_dims(self, open_clip: Any, tokenizer_name: str) -> None:
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
        self.tokenizer = open_clip.get_tokenizer(tokenizer_name)
        ids = self.tokenizer([SLOT_WORD])[0]
        inner = ids[1: int(ids.argmax())]
        if inner.numel() != 1:
            raise ConfigError(f"open_clip tokenizer splits {SLOT_WORD!r} into {inner.numel()} tokens")
        self.slot_token_id = int(inner[0])

    # --- EncoderPair -------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def image_transform(self, kind: str = "targetpad") -> Callable:
        return Preprocess(kind, self.image_size, **self.preprocess_cfg)

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


def _folder_preprocess(cfg: dict[str, Any], path: Path) -> dict[str, Any]:
    """open_clip ``preprocess_cfg`` -> Preprocess options (mean, std, resize mode, interpolation)."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: 'preprocess_cfg' must be an object")
    out: dict[str, Any] = {"mean": CLIP_MEAN, "std": CLIP_STD}
    for key in ("mean", "std"):
        if key in cfg:
            value = cfg[key]
            if not (isinstance(value, (list, tuple)) and len(value) == 3
                    and all(isinstance(v, (int, float)) for v in value)):
                raise ConfigError(f"{path}: preprocess_cfg.{key} must be a list of 3 numbers, got {value!r}")
            out[key] = tuple(float(v) for v in value)
    mode = cfg.get("resize_mode", "shortest")
    if mode not in RESIZE_MODES:
        raise ConfigError(f"{path}: preprocess_cfg.resize_mode must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    interp = cfg.get("interpolation", "bicubic")
    if interp not in INTERPOLATIONS:
        raise ConfigError(f"{path}: preprocess_cfg.interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                          f"got {interp!r}")
    out["resize_mode"], out["interpolation"] = mode, interp
    return out
