"""Hugging Face ``transformers`` CLIP and SigLIP folders behind the EncoderPair interface.

``hf_clip:LOCAL_DIR`` names a folder written by ``save_pretrained`` (``config.json`` with
``model_type`` ``clip`` or ``siglip``, ``model.safetensors`` or ``pytorch_model.bin``, the
tokenizer files, optionally ``preprocessor_config.json``). It is read with
``from_pretrained(local_dir, local_files_only=True)``: nothing is downloaded. A folder without
weights is refused unless ``random_weights=True`` is asked for.

Features (the same places as the open_clip backend):

* image pooled: ``get_image_features`` (CLIP: class token -> post-LayerNorm -> visual
  projection; SigLIP: attention-pooling head). Image tokens: the patch tokens after the vision
  tower's final LayerNorm, before any projection (CLIP: ``post_layernorm`` applied to the
  non-class tokens, as open_clip's ``ln_post``; SigLIP: ``last_hidden_state``).
* text pooled: ``get_text_features`` on the padded ids (CLIP pools at the first EOS, SigLIP at
  the last position, as each was trained; no attention mask is passed, which is how SigLIP was
  trained and changes nothing for CLIP's causal tower at EOS). Text tokens: the final LayerNorm
  output; the mask is True up to and including the first EOS. Deviation: CLIP ids are padded
  with 0 after the EOS (open_clip's convention, which textual_inversion's prompt splicing
  reads) instead of the tokenizer's pad id; the causal tower makes the features identical.
  SigLIP keeps its tokenizer's padding (its pooled output depends on it), so textual
  inversion is not available on SigLIP.
* pseudo-words: a forward hook on the model's own token-embedding module replaces the word
  embedding at the "$" slot (``base.replace_slots``), so the rest is the model's unchanged code.

Images: ``preprocessor_config.json`` gives mean, std, size and resize rule (``shortest_edge`` =
CLIP's resize + centre crop, ``height``/``width`` = squash, as SigLIP), else the model type's
defaults.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..data.preprocess import CLIP_MEAN, CLIP_STD, Preprocess
from ..errors import CheckpointError, ConfigError
from ..fileio import read_json
from .base import EncoderPair, Features, replace_slots

SLOT_WORD = "$"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
MODEL_TYPES = ("clip", "siglip")
_RESAMPLE = {2: "bilinear", 3: "bicubic"}   # PIL codes in preprocessor_config.json


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def _classes(model_type: str) -> tuple[type, type]:
    import transformers
    if model_type == "clip":
        return transformers.CLIPModel, transformers.CLIPConfig
    return transformers.SiglipModel, transformers.SiglipConfig


class HFCLIPEncoder(EncoderPair):
    """A transformers CLIPModel / SiglipModel read from a local folder."""

    def __init__(self, path: str | Path, random_weights: bool = False) -> None:
        super().__init__()
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise ConfigError(f"hf_clip:{path}: not a Hugging Face model folder (no config.json)")
        cfg = read_json(folder / "config.json", "Hugging Face model config")
        model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"{folder / 'config.json'}: model_type {model_type!r} is not supported "
                              f"(expected one of {', '.join(MODEL_TYPES)})")
        has_weights = any((folder / n).is_file() for n in WEIGHT_FILES)
        if not has_weights and not random_weights:
            raise ConfigError(f"hf_clip folder {folder} has no weights ({' or '.join(WEIGHT_FILES[::2])}); "
                              "ask for random weights explicitly with --random-weights")
        model_cls, config_cls = _classes(model_type)
        from transformers.utils import logging as hf_logging
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()   # one small folder: no "Loading weights" bar on stderr
        try:
            if has_weights:
                model = model_cls.from_pretrained(str(folder), local_files_only=True)
            else:
                model = model_cls(config_cls.from_pretrained(str(folder), local_files_only=True))
        except Exception as exc:  # transformers raises OSError/ValueError/RuntimeError/...
            raise CheckpointError(f"cannot load the {model_type} model: {_one_line(exc)}", folder) from None
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        self.model = model.float().eval()
        self.model_type = model_type
        self.folder = folder.resolve()
        self._setup_tokenizer(folder)
        self._setup_dims()
        self._preprocess = self._read_preprocess(folder)
        self.config: dict[str, Any] = {
            "name": f"hf_clip:{self.folder}",
            "kwargs": {"random_weights": True} if not has_weights else {},
            "checkpoint": None,
        }

    # --- set-up ------------------------------------------------------------------------------
    def _setup_tokenizer(self, folder: Path) -> None:
        from transformers import AutoTokenizer
        try:
            tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # e.g. a SentencePiece tokenizer without the sentencepiece package
            raise ConfigError(f"hf_clip folder {folder}: cannot load its tokenizer ({_one_line(exc)})") from None
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        self.tokenizer = tok
        self.context_length = int(self.model.config.text_config.max_position_embeddings)
        ids = tok(SLOT_WORD, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ConfigError(f"the tokenizer of {folder} splits {SLOT_WORD!r} into {len(ids)} tokens")
        self.slot_token_id = int(ids[0])
        eos = self.model.config.text_config.eos_token_id
        # CLIP configs written before transformers PR #24773 say eos_token_id 2 and pool at the
        # largest id (the real EOS); the mask follows the same rule as the pooling
        self._eos_is_max = self.model_type == "clip" and eos == 2
        self._eos_id = tok.eos_token_id if eos is None or self._eos_is_max else int(eos)

    def _setup_dims(self) -> None:
        m = self.model
        vision = m.config.vision_config
        text = m.config.text_config
        self.image_size = int(vision.image_size)
        self.image_token_dim = int(vision.hidden_size)
        self.text_token_dim = int(text.hidden_size)
        if self.model_type == "clip":
            self.embed_dim = int(m.config.projection_dim)
        else:
            if not getattr(vision, "vision_use_head", True):
                raise ConfigError("SigLIP models without the vision attention-pooling head are not supported")
            self.embed_dim = int(getattr(text, "projection_size", None) or text.hidden_size)
        self._token_embedding: nn.Module = m.text_model.embeddings.token_embedding

    def _read_preprocess(self, folder: Path) -> dict[str, Any]:
        clip = self.model_type == "clip"
        out: dict[str, Any] = {"mean": CLIP_MEAN if clip else (0.5, 0.5, 0.5),
                               "std": CLIP_STD if clip else (0.5, 0.5, 0.5),
                               "resize_mode": "shortest" if clip else "squash",
                               "interpolation": "bicubic" if clip else "bilinear"}
        path = folder / "preprocessor_config.json"
        if not path.is_file():
            return out
        cfg = read_json(path, "image preprocessor config")
        if not isinstance(cfg, dict):
            raise ConfigError(f"{path}: expected an object")
        for src, dst in (("image_mean", "mean"), ("image_std", "std")):
            if src in cfg:
                value = cfg[src]
                if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)):
                    raise ConfigError(f"{path}: {src} must be a list of 3 numbers, got {value!r}")
                out[dst] = tuple(float(v) for v in value)
        if "resample" in cfg:
            if cfg["resample"] not in _RESAMPLE:
                raise ConfigError(f"{path}: resample {cfg['resample']!r} is not supported (2 bilinear, 3 bicubic)")
            out["interpolation"] = _RESAMPLE[cfg["resample"]]
        size = cfg.get("size")
        if isinstance(size, dict) and "shortest_edge" in size:
            out["resize_mode"] = "shortest"
        elif isinstance(size, dict) and "height" in size:
            if size.get("height") != size.get("width"):
                raise ConfigError(f"{path}: non-square size {size} is not supported")
            out["resize_mode"] = "squash"
        crop = cfg.get("crop_size")
        side = (crop.get("height") if isinstance(crop, dict) else crop) if cfg.get("do_center_crop", True) and crop else None
        side = side or (size.get("shortest_edge") or size.get("height") if isinstance(size, dict) else size)
        if side is not None and int(side) != self.image_size:
            raise ConfigError(f"{path}: image size {side} differs from the model's {self.image_size}")
        return out

    # --- EncoderPair -------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=self.context_length, return_tensors="pt")["input_ids"].long()
        if self.model_type == "clip":
            # CLIP's causal tower never sees what follows the end token, so padding is written
            # as 0 as open_clip does: the prompt splicing of textual_inversion reads it that way
            ids = ids.masked_fill(~self._text_mask(ids), 0)
        return ids

    def image_transform(self, kind: str = "targetpad") -> Callable:
        return Preprocess(kind, self.image_size, **self._preprocess)

    def encode_image(self, pixels: torch.Tensor) -> Features:
        m = self.model
        out = m.vision_model(pixel_values=pixels, return_dict=True)
        if self.model_type == "clip":
            pooled = m.visual_projection(out.pooler_output)
            tokens = m.vision_model.post_layernorm(out.last_hidden_state[:, 1:])
        else:
            pooled, tokens = out.pooler_output, out.last_hidden_state
        return Features(pooled, tokens, None)

    def encode_text(self, token_ids: torch.Tensor, slot_embeddings: torch.Tensor | None = None) -> Features:
        m = self.model
        handle = None
        if slot_embeddings is not None:
            def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
                return replace_slots(output, token_ids, self.slot_token_id, slot_embeddings)
            handle = self._token_embedding.register_forward_hook(hook)
        try:
            out = m.text_model(input_ids=token_ids, return_dict=True)
        finally:
            if handle is not None:
                handle.remove()
        pooled = m.text_projection(out.pooler_output) if self.model_type == "clip" else out.pooler_output
        return Features(pooled, out.last_hidden_state, self._text_mask(token_ids))

    def _text_mask(self, token_ids: torch.Tensor) -> torch.Tensor:
        """True up to and including the first end token (the one the CLIP tower pools at)."""
        is_eos = (token_ids == token_ids.max(dim=1, keepdim=True).values) if self._eos_is_max \
            else token_ids == self._eos_id
        first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1),
                            torch.full_like(token_ids[:, 0], token_ids.shape[1] - 1))
        return torch.arange(token_ids.shape[1], device=token_ids.device)[None, :] <= first[:, None]

    def image_parameters(self) -> list[nn.Parameter]:
        params = list(self.model.vision_model.parameters())
        if self.model_type == "clip":
            params += list(self.model.visual_projection.parameters())
        return params

    def text_parameters(self) -> list[nn.Parameter]:
        params = list(self.model.text_model.parameters())
        if self.model_type == "clip":
            params += list(self.model.text_projection.parameters())
        return params
