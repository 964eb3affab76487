"""BLIP-2 (frozen ViT + Q-Former) behind the EncoderPair interface, built on Hugging Face transformers.

No LAVIS (it pins timm/transformers versions that conflict with open_clip and downloads BERT and
EVA weights whenever it builds a model). Weights come from local files only:

* a Hugging Face ``Blip2ForImageTextRetrieval`` folder (``blip2:DIR``; ``from_pretrained(DIR,
  local_files_only=True)``; its tokenizer files are read from the same folder). A ``Blip2Model``
  / captioning folder is refused: its Q-Former has no text input.
* a LAVIS checkpoint (``blip2:FILE.pth``, ``blip2_pretrained.pth`` = EVA ViT-g,
  ``blip2_pretrained_vitL.pth`` = CLIP ViT-L): read with ``torch.load(weights_only=True)`` and
  renamed key by key (:func:`lavis_to_hf`); a BERT tokenizer folder is given with
  ``tokenizer=DIR``; ViT weights missing from the file come from ``vit_checkpoint`` (LAVIS's
  ``eva_vit_g.pth`` / ``clip_vit_L.pth``). LAVIS keeps 39 of EVA's 40 blocks and 21 of CLIP
  ViT-L's blocks; ``vit_layers`` overrides.
* ``random_weights=True`` with a ``preset`` (``tiny``, ``vit_g``, ``vit_l``): tests, the
  synthetic benchmark and speed benchmarks. A ``blip2`` spec without weights is refused instead of
  silently random.

What the interface exposes (``space="hidden"``, CaLa's choice, the default):

* image: ``tokens`` = the 32 query outputs ``[B, 32, 768]`` of the *visual* Q-Former, ``pooled``
  = query 0's un-projected hidden state ``[B, 768]``;
* text: ``pooled`` = the *textual* Q-Former's CLS hidden state, ``tokens`` = its token outputs,
  ``mask`` = True at real tokens; "$" is the pseudo-word slot (its word embedding is replaced);
* multimodal (:meth:`Blip2Encoder.encode_multimodal`): query tokens and text together through
  the *multimodal* Q-Former, cross-attending to the reference image's ViT states; ``tokens`` =
  the 32 query outputs, ``pooled`` = query 0 (what CaLa's query and SPRC's prompt are made of).

``space="projected"`` gives BLIP-2's retrieval space instead: image tokens = the L2-normalised
256-d ``vision_projection`` of the query outputs, image pooled = projected query 0, text pooled =
normalised ``text_projection(CLS)``; :func:`max_over_queries` is BLIP-2's (and SPRC's) score, the
max over the 32 projected tokens. :meth:`Blip2Encoder.named_image_features` returns every named
variant at once.

Roles: one Q-Former serves all three roles (``qformer_roles="shared"``) until a method that trains
them apart (CaLa) calls :meth:`Blip2Encoder.split_roles`, which copies it into textual, multimodal
and visual Q-Formers (+2 copies: ViT-g Q-Former with its embeddings and projections is 0.19 B
parameters, so +0.37 B parameters, +1.5 GB in float32 and +3.0 GB more of AdamW moments).
``image_parameters`` = visual Q-Former + its query tokens + vision projection; ``text_parameters``
= textual Q-Former + text projection; ``multimodal_parameters`` = multimodal Q-Former + its query
tokens. The ViT is never trained: it runs under ``no_grad`` and is never in those lists.

ViT cache (``vit_cache_items`` > 0 in memory, ``vit_cache_dir`` on disk): the frozen ViT's output
for one preprocessed image is keyed by sha256(ViT weights) + sha256(pixel tensor bytes, shape,
dtype), so any change of weights, preprocessing or image is a miss, never a stale hit. Stored in
``vit_cache_dtype`` (float16 default). Cost per image: 257 x 1408 x 2 B = 724 KB (ViT-g) or
257 x 1024 x 2 B = 526 KB (ViT-L) at 224 px; CIRR's ~21.5 k train+val+test1 images: 15.5 GB
(ViT-g) / 11.3 GB (ViT-L) on disk, one safetensors file per image.

Deliberate deviations: the LAVIS layout's ``ln_vision`` keeps LAVIS's eps 1e-5 (transformers'
converted folders use the ViT's 1e-6); the HF ``qkv`` k-bias is zero, as in LAVIS.
"""
from __future__ import annotations

import copy
import hashlib
import json
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..data.preprocess import Preprocess
from ..errors import CheckpointError, ConfigError
from ..fileio import atomic_write, atomic_write_text
from .base import EncoderPair, Features, replace_slots
from .weights import _one_line

SLOT_WORD = "$"
SPACES = ("hidden", "projected")
ROLES = ("visual", "textual", "multimodal")
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")

# preset -> (vision kind, vision config, qformer config, num query tokens, image_text_hidden_size)
PRESETS: dict[str, dict[str, Any]] = {
    # random ViTs get std 0.02 (transformers' BLIP-2 vision default, 1e-10, gives constant features)
    "vit_g": {"vision": "eva_vit_g", "vision_config": {"initializer_range": 0.02}, "qformer_config": {},
              "num_query_tokens": 32},
    "vit_l": {"vision": "clip_vit_l", "vision_config": {
        "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 21, "num_attention_heads": 16,
        "image_size": 224, "patch_size": 14, "initializer_range": 0.02}, "qformer_config": {},
        "num_query_tokens": 32},
    "tiny": {"vision": "eva_vit_g", "vision_config": {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "image_size": 64, "patch_size": 8, "initializer_range": 0.02},
        "qformer_config": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                           "intermediate_size": 128, "max_position_embeddings": 64,
                           # BERT's 0.02 maps every input of a random Q-Former to nearly one vector
                           # (cosine 0.99999 between images and between texts): training from scratch stalls
                           "initializer_range": 0.2},
        "num_query_tokens": 8, "image_text_hidden_size": 32},
}
PRESETS["tiny_vit_l"] = {**PRESETS["tiny"], "vision": "clip_vit_l"}


class _QuietTransformers:
    """transformers draws a progress bar for every weight load; a CLI error or result is one line."""

    def __enter__(self) -> None:
        from transformers.utils import logging as hf_logging
        self.was = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc: Any) -> None:
        from transformers.utils import logging as hf_logging
        if self.was:
            hf_logging.enable_progress_bar()


# ---- tokenizer --------------------------------------------------------------------------------
def write_vocab(folder: str | Path, words: list[str] | tuple[str, ...] = ()) -> Path:
    """A BERT tokenizer folder (``vocab.txt`` + tokenizer config) that needs no download: the
    specials, "$", punctuation, digits, letters and their ``##`` continuations (so any lowercase
    text tokenizes), then ``words``. Tests and the synthetic benchmark use it."""
    from transformers import BertTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = list(SPECIALS) + list(SLOT_WORD + ".,;:!?'\"-()/&") + chars + ["##" + c for c in chars]
    for w in words:
        w = w.strip().lower()
        if w and w not in vocab:
            vocab.append(w)
    atomic_write_text(folder / "vocab.txt", "\n".join(vocab) + "\n")
    BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(str(folder))
    return folder


class BertIds:
    """A BERT tokenizer called like the toolkit's others: ``(texts, context_length=None)`` ->
    padded ids ``[B, L]``; every other attribute is the wrapped tokenizer's."""

    def __init__(self, tokenizer: Any, context_length: int = 32) -> None:
        self.tokenizer = tokenizer
        self.context_length = int(context_length)

    def __call__(self, texts: list[str] | str, context_length: int | None = None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = self.tokenizer(texts, padding="max_length", truncation=True,
                             max_length=int(context_length or self.context_length), return_tensors="pt")
        return out["input_ids"].long()

    def __len__(self) -> int:
        return len(self.tokenizer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["tokenizer"], name)


def load_tokenizer(folder: str | Path) -> Any:
    from transformers import BertTokenizer

    folder = Path(folder)
    if not folder.is_dir() or not any((folder / n).is_file() for n in ("vocab.txt", "tokenizer.json")):
        raise CheckpointError("expected a BERT tokenizer folder (vocab.txt or tokenizer.json)", folder)
    try:
        return BertTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read the BERT tokenizer: {_one_line(exc)}", folder) from None


# ---- the ViT -----------------------------------------------------------------------------------
class ClipViT(nn.Module):
    """LAVIS's CLIP ViT-L for BLIP-2 (``pretrain_vitL``): transformers' CLIP vision transformer
    (quick-GELU, pre-LayerNorm) without its final LayerNorm, then BLIP-2's ``ln_vision``."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        config = CLIPVisionConfig(hidden_act="quick_gelu", layer_norm_eps=1e-5, **cfg)
        self.vision_model = CLIPVisionModel(config)
        self.vision_model.post_layernorm = nn.Identity()   # LAVIS has no final LayerNorm (ln_vision instead)
        self.ln_vision = nn.LayerNorm(config.hidden_size, eps=1e-5)
        self.config = config

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.ln_vision(self.vision_model(pixel_values=pixels).last_hidden_state)


class EvaViT(nn.Module):
    """transformers' ``Blip2VisionModel`` (EVA ViT-g layout); its ``post_layernorm`` is ``ln_vision``."""

    def __init__(self, cfg: dict[str, Any] | None = None, model: nn.Module | None = None) -> None:
        super().__init__()
        from transformers import Blip2VisionConfig, Blip2VisionModel

        self.vision_model = model if model is not None else Blip2VisionModel(Blip2VisionConfig(**(cfg or {})))
        self.config = self.vision_model.config

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values=pixels).last_hidden_state


# ---- one Q-Former role ---------------------------------------------------------------------------
class QFormerRole(nn.Module):
    """Query tokens, text embeddings, Q-Former and the two projections (transformers' names)."""

    def __init__(self, qformer_config: Any, num_query_tokens: int, proj_dim: int) -> None:
        super().__init__()
        from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2TextEmbeddings

        h = qformer_config.hidden_size
        self.query_tokens = nn.Parameter(torch.zeros(1, num_query_tokens, h))
        self.embeddings = Blip2TextEmbeddings(qformer_config)
        self.qformer = Blip2QFormerModel(qformer_config)
        self.vision_projection = nn.Linear(h, proj_dim)
        self.text_projection = nn.Linear(h, proj_dim)

    def _text_embeddings(self, ids: torch.Tensor, slot_id: int, slots: torch.Tensor | None) -> torch.Tensor:
        emb = self.embeddings
        x = replace_slots(emb.word_embeddings(ids), ids, slot_id, slots)
        return x + emb.position_embeddings(emb.position_ids[:, : ids.shape[1]])

    def image(self, vision: torch.Tensor) -> torch.Tensor:
        queries = self.query_tokens.expand(vision.shape[0], -1, -1)
        ones = torch.ones(vision.shape[:-1], dtype=torch.long, device=vision.device)
        return self.qformer(query_embeds=queries, encoder_hidden_states=vision,
                            encoder_attention_mask=ones).last_hidden_state

    def text(self, ids: torch.Tensor, mask: torch.Tensor, slot_id: int, slots: torch.Tensor | None) -> torch.Tensor:
        x = self._text_embeddings(ids, slot_id, slots)
        return self.qformer(query_embeds=x, query_length=0, attention_mask=mask.long()).last_hidden_state

    def multimodal(self, vision: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, slot_id: int,
                   slots: torch.Tensor | None) -> torch.Tensor:
        queries = self.query_tokens.expand(vision.shape[0], -1, -1)
        x = torch.cat([queries.to(self.embeddings.word_embeddings.weight.dtype),
                       self._text_embeddings(ids, slot_id, slots)], dim=1)
        q = queries.shape[1]
        attn = torch.cat([torch.ones(mask.shape[0], q, dtype=torch.long, device=mask.device), mask.long()], dim=1)
        ones = torch.ones(vision.shape[:-1], dtype=torch.long, device=vision.device)
        out = self.qformer(query_embeds=x, query_length=q, attention_mask=attn, encoder_hidden_states=vision,
                           encoder_attention_mask=ones).last_hidden_state
        return out[:, :q]


def max_over_queries(image_projected: torch.Tensor, text_projected: torch.Tensor) -> torch.Tensor:
    """BLIP-2's image-text score: ``[N_img, Q, d] x [N_txt, d] -> [N_img, N_txt]``, the max over
    the query tokens of the cosine similarities (inputs already normalised)."""
    return torch.einsum("nqd,md->nqm", image_projected, text_projected).max(dim=1).values


# ---- the ViT cache -------------------------------------------------------------------------------
class ViTCache:
    """Frozen-ViT outputs by content key; see the module docstring for the key and its cost."""

    def __init__(self, items: int = 0, folder: str | Path | None = None, dtype: str = "float16") -> None:
        if dtype not in ("float16", "bfloat16", "float32"):
            raise ConfigError(f"vit_cache_dtype must be float16, bfloat16 or float32, got {dtype!r}")
        self.items = int(items)
        self.folder = Path(folder) if folder else None
        self.dtype = getattr(torch, dtype)
        self.memory: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        self.hits = self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.items > 0 or self.folder is not None

    @staticmethod
    def keys(weights: str, pixels: torch.Tensor) -> list[str]:
        out = []
        cpu = pixels.detach().to("cpu").contiguous()
        for x in cpu:
            h = hashlib.sha256(f"{weights}|{x.dtype}|{tuple(x.shape)}\n".encode())
            h.update(x.reshape(-1).view(torch.uint8).numpy().tobytes())
            out.append(h.hexdigest())
        return out

    def get(self, key: str) -> torch.Tensor | None:
        if key in self.memory:
            self.memory.move_to_end(key)
            return self.memory[key]
        if self.folder is not None:
            path = self.folder / key[:2] / f"{key}.safetensors"
            if path.is_file():
                from safetensors.torch import load_file
                try:
                    t = load_file(str(path))["vision"]
                except Exception:   # derived data: a damaged file is recomputed
                    return None
                self._remember(key, t)
                return t
        return None

    def put(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().to("cpu", self.dtype).contiguous()
        self._remember(key, value)
        if self.folder is not None:
            from safetensors.torch import save_file

            path = self.folder / key[:2] / f"{key}.safetensors"
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(path, lambda p: save_file({"vision": value}, str(p)))

    def _remember(self, key: str, value: torch.Tensor) -> None:
        if self.items <= 0:
            return
        self.memory[key] = value
        self.memory.move_to_end(key)
        while len(self.memory) > self.items:
            self.memory.popitem(last=False)


# ---- LAVIS checkpoints ---------------------------------------------------------------------------
def read_lavis(path: str | Path) -> dict[str, torch.Tensor]:
    """A LAVIS checkpoint's state dict (``{"model": ...}`` or flat), refusing Python objects
    (``weights.read_state_dict`` wants a file of tensors only; LAVIS's also hold the epoch etc.)."""
    import pickle

    path = Path(path)
    if not path.is_file():
        raise CheckpointError("checkpoint file not found", path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError("checkpoint refused: it holds Python objects other than tensors "
                              "(nothing was executed)", path) from None
    except Exception as exc:
        raise CheckpointError(f"corrupt or unsupported checkpoint ({_one_line(exc)})", path) from None
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError("expected a state dict (or {'model': state dict})", path)
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _count(state: dict[str, torch.Tensor], prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def lavis_to_hf(state: dict[str, torch.Tensor], vision: str, vit_layers: int | None = None,
                vit_prefix: str = "visual_encoder.") -> dict[str, torch.Tensor]:
    """LAVIS Blip2Qformer keys -> this encoder's keys (``vit.vision_model.*``, ``vit.ln_vision``
    for CLIP ViT-L, ``qformer.*`` for the Q-Former role). ``Qformer.cls.*`` (the LM head),
    ``itm_head``, ``temp`` and ViT blocks past ``vit_layers`` are dropped."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.startswith("Qformer.bert.embeddings."):
            rest = k[len("Qformer.bert.embeddings."):]
            if rest.startswith("LayerNorm."):
                out["qformer.qformer.layernorm." + rest[len("LayerNorm."):]] = v
            elif rest.split(".")[0] in ("word_embeddings", "position_embeddings"):
                out["qformer.embeddings." + rest] = v
        elif k.startswith("Qformer.bert.encoder."):
            out["qformer.qformer." + k[len("Qformer.bert."):].replace(".self.", ".attention.")] = v
        elif k == "query_tokens":
            out["qformer.query_tokens"] = v
        elif k.startswith("vision_proj."):
            out["qformer.vision_projection." + k.split(".", 1)[1]] = v
        elif k.startswith("text_proj."):
            out["qformer.text_projection." + k.split(".", 1)[1]] = v
        elif k.startswith("ln_vision."):
            name = "post_layernorm" if vision == "eva_vit_g" else "ln_vision"
            out[("vit.vision_model." if vision == "eva_vit_g" else "vit.") + name + "." + k.split(".", 1)[1]] = v
    vit = {k[len(vit_prefix):]: v for k, v in state.items() if k.startswith(vit_prefix)}
    if vision == "eva_vit_g":
        out.update(_eva_keys(vit, vit_layers))
    else:
        out.update(_clip_keys(vit, vit_layers))
    return out


def _eva_keys(vit: dict[str, torch.Tensor], layers: int | None) -> dict[str, torch.Tensor]:
    p = "vit.vision_model."
    out: dict[str, torch.Tensor] = {}
    simple = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
              "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
              "patch_embed.proj.bias": "embeddings.patch_embedding.bias"}
    for a, b in simple.items():
        if a in vit:
            out[p + b] = vit[a]
    n = _count(vit, "blocks.") if layers is None else layers
    names = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.projection",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i in range(n):
        src, dst = f"blocks.{i}.", f"{p}encoder.layers.{i}."
        for a, b in names.items():
            for w in ("weight", "bias"):
                if f"{src}{a}.{w}" in vit:
                    out[f"{dst}{b}.{w}"] = vit[f"{src}{a}.{w}"]
        if f"{src}attn.qkv.weight" in vit:
            out[f"{dst}self_attn.qkv.weight"] = vit[f"{src}attn.qkv.weight"]
        if f"{src}attn.q_bias" in vit:
            q, v = vit[f"{src}attn.q_bias"], vit[f"{src}attn.v_bias"]
            out[f"{dst}self_attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    return out


def _clip_keys(vit: dict[str, torch.Tensor], layers: int | None) -> dict[str, torch.Tensor]:
    p = "vit.vision_model."
    out: dict[str, torch.Tensor] = {}
    if "conv1.weight" in vit:
        out[p + "embeddings.patch_embedding.weight"] = vit["conv1.weight"]
    if "class_embedding" in vit:
        out[p + "embeddings.class_embedding"] = vit["class_embedding"]
    if "positional_embedding" in vit:
        out[p + "embeddings.position_embedding.weight"] = vit["positional_embedding"]
    for w in ("weight", "bias"):
        if f"ln_pre.{w}" in vit:
            out[f"{p}pre_layrnorm.{w}"] = vit[f"ln_pre.{w}"]
    n = _count(vit, "transformer.resblocks.") if layers is None else layers
    for i in range(n):
        src, dst = f"transformer.resblocks.{i}.", f"{p}encoder.layers.{i}."
        if f"{src}attn.in_proj_weight" in vit:
            for name, t in zip(("q_proj", "k_proj", "v_proj"), vit[f"{src}attn.in_proj_weight"].chunk(3)):
                out[f"{dst}self_attn.{name}.weight"] = t
            for name, t in zip(("q_proj", "k_proj", "v_proj"), vit[f"{src}attn.in_proj_bias"].chunk(3)):
                out[f"{dst}self_attn.{name}.bias"] = t
        for a, b in {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                     "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}.items():
            for w in ("weight", "bias"):
                if f"{src}{a}.{w}" in vit:
                    out[f"{dst}{b}.{w}"] = vit[f"{src}{a}.{w}"]
    return out


def _lavis_configs(state: dict[str, torch.Tensor], vit_state: dict[str, torch.Tensor], vision: str,
                   vit_layers: int | None, vision_heads: int | None = None, qformer_heads: int | None = None
                   ) -> tuple[dict[str, Any], dict[str, Any], int, int]:
    """Vision and Q-Former configs read off the tensors' shapes (so tiny test checkpoints load);
    head counts are not in the shapes: BLIP-2's (width / 88 for EVA, width / 64 otherwise) unless given."""
    def need(d: dict[str, torch.Tensor], k: str, where: str) -> torch.Tensor:
        if k not in d:
            raise CheckpointError(f"not a LAVIS BLIP-2 checkpoint: no {k!r} in the {where}")
        return d[k]

    word = need(state, "Qformer.bert.embeddings.word_embeddings.weight", "checkpoint")
    pos = need(state, "Qformer.bert.embeddings.position_embeddings.weight", "checkpoint")
    inter = need(state, "Qformer.bert.encoder.layer.0.intermediate_query.dense.weight", "checkpoint")
    hidden = int(word.shape[1])
    heads = int(qformer_heads) if qformer_heads else max(1, hidden // 64)
    n_q_layers = _count(state, "Qformer.bert.encoder.layer.")
    cross = [i for i in range(n_q_layers) if f"Qformer.bert.encoder.layer.{i}.crossattention.self.query.weight" in state]
    freq = cross[1] - cross[0] if len(cross) > 1 else max(1, n_q_layers)
    queries = need(state, "query_tokens", "checkpoint")
    proj = need(state, "vision_proj.weight", "checkpoint")
    qcfg = {"vocab_size": int(word.shape[0]), "hidden_size": hidden, "num_hidden_layers": n_q_layers,
            "num_attention_heads": heads, "intermediate_size": int(inter.shape[0]),
            "max_position_embeddings": int(pos.shape[0]), "cross_attention_frequency": freq}
    if vision == "eva_vit_g":
        patch = need(vit_state, "patch_embed.proj.weight", "ViT weights")
        fc1 = need(vit_state, "blocks.0.mlp.fc1.weight", "ViT weights")
        n_pos = int(need(vit_state, "pos_embed", "ViT weights").shape[1])
        blocks = _count(vit_state, "blocks.")
        width = int(patch.shape[0])
    else:
        patch = need(vit_state, "conv1.weight", "ViT weights")
        fc1 = need(vit_state, "transformer.resblocks.0.mlp.c_fc.weight", "ViT weights")
        n_pos = int(need(vit_state, "positional_embedding", "ViT weights").shape[0])
        blocks = _count(vit_state, "transformer.resblocks.")
        width = int(patch.shape[0])
    layers = blocks if vit_layers is None else int(vit_layers)
    if layers > blocks:
        raise CheckpointError(f"vit_layers={layers} but the ViT weights have {blocks} blocks")
    ps = int(patch.shape[-1])
    grid = int(round((n_pos - 1) ** 0.5))
    vcfg = {"hidden_size": width, "intermediate_size": int(fc1.shape[0]), "num_hidden_layers": layers,
            "num_attention_heads": int(vision_heads) if vision_heads else
            max(1, width // (88 if vision == "eva_vit_g" and width % 88 == 0 else 64)),
            "image_size": grid * ps, "patch_size": ps}
    return vcfg, qcfg, int(queries.shape[1]), int(proj.shape[0])


# ---- the encoder ---------------------------------------------------------------------------------
class Blip2Encoder(EncoderPair):
    """Frozen ViT + Q-Former roles; see the module docstring."""

    supports_multimodal = True

    def __init__(self, path: str | Path | None = None, *, random_weights: bool = False, preset: str | None = None,
                 tokenizer: str | Path | None = None, vit_checkpoint: str | Path | None = None,
                 vision: str | None = None, vit_layers: int | None = None, vocab_words: list[str] | None = None,
                 space: str = "hidden", max_text_length: int = 32, qformer_roles: str = "shared",
                 vit_cache_items: int = 0, vit_cache_dir: str | None = None, vit_cache_dtype: str = "float16",
                 gradient_checkpointing: bool = False, vision_heads: int | None = None,
                 qformer_heads: int | None = None) -> None:
        super().__init__()
        if space not in SPACES:
            raise ConfigError(f"blip2 encoder: space must be one of {', '.join(SPACES)}, got {space!r}")
        if qformer_roles not in ("shared", "separate"):
            raise ConfigError(f"blip2 encoder: qformer_roles must be 'shared' or 'separate', got {qformer_roles!r}")
        if max_text_length < 3:
            raise ConfigError("blip2 encoder: max_text_length must be at least 3")
        self.space = space
        self.max_text_length = int(max_text_length)
        kwargs = dict(random_weights=random_weights, preset=preset, tokenizer=tokenizer,
                      vit_checkpoint=vit_checkpoint, vision=vision, vit_layers=vit_layers, vocab_words=vocab_words,
                      space=space, max_text_length=max_text_length, qformer_roles="shared",
                      vit_cache_items=vit_cache_items, vit_cache_dir=vit_cache_dir, vit_cache_dtype=vit_cache_dtype,
                      gradient_checkpointing=gradient_checkpointing, vision_heads=vision_heads,
                      qformer_heads=qformer_heads)
        for key in ("tokenizer", "vit_checkpoint"):
            if kwargs[key] is not None:
                kwargs[key] = str(Path(kwargs[key]).resolve())
        if path is not None:
            p = Path(path)
            if p.is_dir():
                self._from_hf_folder(p, tokenizer)
            elif p.is_file():
                if preset is not None:   # head counts are not in the tensors' shapes
                    pr = PRESETS.get(preset) or {}
                    vision_heads = vision_heads or pr.get("vision_config", {}).get("num_attention_heads")
                    qformer_heads = qformer_heads or pr.get("qformer_config", {}).get("num_attention_heads")
                self._from_lavis(p, tokenizer, vit_checkpoint, vision, vit_layers, vision_heads, qformer_heads)
            else:
                raise CheckpointError("BLIP-2 weights not found (expected a Hugging Face folder or a LAVIS .pth file)", p)
            name = f"blip2:{p.resolve()}"
        elif random_weights:
            self._random(preset or "tiny", tokenizer, vocab_words, vision_heads)
            name = "blip2"
        else:
            raise ConfigError("the blip2 encoder needs weights: blip2:DIR (Hugging Face folder), blip2:FILE.pth "
                              "(LAVIS checkpoint), or encoder_config.random_weights=true with a preset")
        self.config: dict[str, Any] = {"name": name, "kwargs": {k: v for k, v in kwargs.items() if v is not None}}
        for p_ in self.vit.parameters():
            p_.requires_grad_(False)
        self.vit_cache = ViTCache(vit_cache_items, vit_cache_dir, vit_cache_dtype)
        self._vit_hash: str | None = None
        #: methods with a multimodal path set this so image Features carry the ViT states
        self.keep_vision = False
        self._roles = {r: "qformer" for r in ROLES}
        if gradient_checkpointing:   # non-reentrant: the Q-Former's inputs need no grad of their own
            from transformers.utils import logging as hf_logging
            level = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self.qformer.qformer.gradient_checkpointing_enable(
                        gradient_checkpointing_kwargs={"use_reentrant": False})
            finally:
                hf_logging.set_verbosity(level)
        if qformer_roles == "separate":
            self.split_roles()
        self._setup_dims()

    # --- construction ----------------------------------------------------------------------
    def _build(self, vision_kind: str, vcfg: dict[str, Any], qcfg: dict[str, Any], n_query: int, proj: int) -> None:
        from transformers import Blip2QFormerConfig

        self.vision_kind = vision_kind
        self.vit = EvaViT(vcfg) if vision_kind == "eva_vit_g" else ClipViT(vcfg)
        qconf = Blip2QFormerConfig(**{"use_qformer_text_input": True, **qcfg,
                                      "encoder_hidden_size": self.vit.config.hidden_size})
        self.qformer = QFormerRole(qconf, n_query, proj)

    def _random(self, preset: str, tokenizer: Any, vocab_words: list[str] | None, vision_heads: int | None) -> None:
        if preset not in PRESETS:
            raise ConfigError(f"blip2 encoder: unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
        pr = PRESETS[preset]
        vcfg = dict(pr["vision_config"])
        if vision_heads:
            vcfg["num_attention_heads"] = int(vision_heads)
        if tokenizer is not None:
            self.tokenizer = load_tokenizer(tokenizer)
        else:
            import tempfile
            with tempfile.TemporaryDirectory() as tmp:
                self.tokenizer = load_tokenizer(write_vocab(tmp, vocab_words or []))
        qcfg = {"vocab_size": max(len(self.tokenizer), 8), **pr["qformer_config"]}
        if preset != "tiny":
            qcfg["vocab_size"] = max(qcfg["vocab_size"], 30523)
        torch.manual_seed(0)  # a random-weight model is the same model in every process
        self._build(pr["vision"], vcfg, qcfg, pr["num_query_tokens"], pr.get("image_text_hidden_size", 256))
        with torch.no_grad():  # transformers zero-initialises query tokens; BLIP-2 trains them from N(0, 0.02)
            self.qformer.query_tokens.normal_(0.0, 0.02)

    def _from_hf_folder(self, folder: Path, tokenizer: Any) -> None:
        from transformers import Blip2ForImageTextRetrieval

        cfg_path = folder / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError("not a Hugging Face model folder (no config.json)", folder)
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"unreadable config.json ({_one_line(exc)})", cfg_path) from None
        archs = cfg.get("architectures") or []
        qcfg = cfg.get("qformer_config") or {}
        if cfg.get("model_type") != "blip-2":
            raise CheckpointError(f"not a BLIP-2 folder (model_type {cfg.get('model_type')!r})", cfg_path)
        if "Blip2ForImageTextRetrieval" not in archs and not qcfg.get("use_qformer_text_input"):
            raise CheckpointError(f"a {'/'.join(archs) or 'Blip2Model'} folder: its Q-Former has no text input; use a "
                                  "Blip2ForImageTextRetrieval folder (e.g. blip2-itm-vit-g)", folder)
        try:
            with warnings.catch_warnings(), _QuietTransformers():
                warnings.simplefilter("ignore")
                model = Blip2ForImageTextRetrieval.from_pretrained(str(folder), local_files_only=True,
                                                                   dtype=torch.float32)
        except Exception as exc:
            raise CheckpointError(f"cannot load the BLIP-2 folder: {_one_line(exc)}", folder) from None
        self.vision_kind = "eva_vit_g"
        self.vit = EvaViT(model=model.vision_model)
        role = QFormerRole.__new__(QFormerRole)
        nn.Module.__init__(role)
        role.query_tokens, role.embeddings, role.qformer = model.query_tokens, model.embeddings, model.qformer
        role.vision_projection, role.text_projection = model.vision_projection, model.text_projection
        self.qformer = role
        self.tokenizer = load_tokenizer(tokenizer if tokenizer is not None else folder)

    def _from_lavis(self, file: Path, tokenizer: Any, vit_checkpoint: Any, vision: str | None,
                    vit_layers: int | None, vision_heads: int | None, qformer_heads: int | None) -> None:
        state = read_lavis(file)
        vision = vision or ("clip_vit_l" if "vitl" in file.name.lower() else "eva_vit_g")
        if vision not in ("eva_vit_g", "clip_vit_l"):
            raise ConfigError(f"blip2 encoder: vision must be eva_vit_g or clip_vit_l, got {vision!r}")
        prefix = "visual_encoder."
        vit_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not vit_state:
            if vit_checkpoint is None:
                raise CheckpointError("the LAVIS checkpoint has no visual_encoder.* weights; pass "
                                      "encoder_config.vit_checkpoint (eva_vit_g.pth or clip_vit_L.pth)", file)
            vit_state = read_lavis(vit_checkpoint)
            if vit_layers is None:
                vit_layers = 39 if vision == "eva_vit_g" else 21   # LAVIS's truncation
        if tokenizer is None:
            raise ConfigError("a LAVIS checkpoint needs encoder_config.tokenizer (a bert-base-uncased tokenizer folder)")
        vcfg, qcfg, n_query, proj = _lavis_configs(state, vit_state, vision, vit_layers, vision_heads, qformer_heads)
        self._build(vision, vcfg, qcfg, n_query, proj)
        if vision == "eva_vit_g":
            self.vit.vision_model.post_layernorm.eps = 1e-5   # LAVIS's ln_vision
        mapped = lavis_to_hf({**state, **{prefix + k: v for k, v in vit_state.items()}}, vision,
                             vcfg["num_hidden_layers"])
        own = {k: v for k, v in self.state_dict().items() if k.startswith(("vit.", "qformer."))}
        missing = sorted(k for k in own if k not in mapped and not k.endswith("position_ids"))
        if missing:
            raise CheckpointError(f"LAVIS checkpoint lacks {len(missing)} weights, e.g. {missing[0]!r}", file)
        bad = [k for k in own if k in mapped and tuple(mapped[k].shape) != tuple(own[k].shape)]
        if bad:
            raise CheckpointError(f"LAVIS weight {bad[0]!r} has shape {tuple(mapped[bad[0]].shape)}, "
                                  f"expected {tuple(own[bad[0]].shape)}", file)
        self.load_state_dict({k: mapped[k] for k in own if k in mapped}, strict=False)
        self.tokenizer = load_tokenizer(tokenizer)

    def _setup_dims(self) -> None:
        self.tokenizer = BertIds(self.tokenizer, self.max_text_length)
        q = self.qformer
        h = q.query_tokens.shape[-1]
        proj = q.vision_projection.out_features
        self.embed_dim = h if self.space == "hidden" else proj
        self.image_token_dim = self.embed_dim
        self.text_token_dim = h
        self.num_query_tokens = int(q.query_tokens.shape[1])
        size = self.vit.config.image_size
        self.image_size = int(size[0] if isinstance(size, (list, tuple)) else size)
        ids = self.tokenizer.convert_tokens_to_ids([SLOT_WORD])
        unk = self.tokenizer.unk_token_id
        if not ids or ids[0] is None or ids[0] == unk:
            raise ConfigError(f"the BLIP-2 tokenizer has no {SLOT_WORD!r} token for pseudo-word slots")
        self.slot_token_id = int(ids[0])
        self.pad_token_id = int(self.tokenizer.pad_token_id or 0)
        vocab = q.embeddings.word_embeddings.num_embeddings
        if len(self.tokenizer) > vocab:
            raise ConfigError(f"the BLIP-2 tokenizer has {len(self.tokenizer)} tokens but the Q-Former embeds {vocab}")

    # --- roles -----------------------------------------------------------------------------
    def role(self, name: str) -> QFormerRole:
        return getattr(self, self._roles[name])

    def split_roles(self) -> None:
        """Give the textual and multimodal roles their own copies of the (visual) Q-Former, as
        CaLa's public code loads three BLIP-2 models; idempotent."""
        if self._roles["textual"] != "qformer":
            return
        self.qformer_textual = copy.deepcopy(self.qformer)
        self.qformer_multimodal = copy.deepcopy(self.qformer)
        self._roles = {"visual": "qformer", "textual": "qformer_textual", "multimodal": "qformer_multimodal"}
        self.config["kwargs"]["qformer_roles"] = "separate"

    def _role_params(self, name: str, parts: tuple[str, ...]) -> list[nn.Parameter]:
        r = self.role(name)
        return [p for part in parts for p in ([r.query_tokens] if part == "query_tokens" else getattr(r, part).parameters())]

    def image_parameters(self) -> list[nn.Parameter]:
        return self._role_params("visual", ("query_tokens", "qformer", "vision_projection"))

    def text_parameters(self) -> list[nn.Parameter]:
        return self._role_params("textual", ("embeddings", "qformer", "text_projection"))

    def multimodal_parameters(self) -> list[nn.Parameter]:
        return self._role_params("multimodal", ("query_tokens", "embeddings", "qformer"))

    # --- EncoderPair -------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def image_transform(self, kind: str = "targetpad") -> Callable:
        return Preprocess(kind, self.image_size)

    def train(self, mode: bool = True) -> "Blip2Encoder":
        super().train(mode)
        self.vit.eval()   # frozen: never dropout or statistics updates
        return self

    @torch.no_grad()
    def vision_states(self, pixels: torch.Tensor) -> torch.Tensor:
        """The frozen ViT's output ``[B, N, D]`` (through the ViT cache when it is on)."""
        cache = self.vit_cache
        dtype = next(self.vit.parameters()).dtype
        if not cache.enabled:
            return self.vit(pixels.to(dtype)).float()
        if self._vit_hash is None:
            h = hashlib.sha256()
            for k, t in self.vit.state_dict().items():
                t = t.detach().to("cpu").contiguous()
                h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            self._vit_hash = h.hexdigest()
        keys = cache.keys(self._vit_hash, pixels)
        found = [cache.get(k) for k in keys]
        cache.hits += sum(f is not None for f in found)
        todo = [i for i, f in enumerate(found) if f is None]
        cache.misses += len(todo)
        if todo:
            fresh = self.vit(pixels[todo].to(dtype))
            for i, out in zip(todo, fresh):
                cache.put(keys[i], out)
                found[i] = out.detach().to("cpu", cache.dtype)
        return torch.stack([f.to(pixels.device) for f in found]).float()  # type: ignore[union-attr]

    def _vision(self, x: torch.Tensor | Features) -> torch.Tensor:
        if isinstance(x, Features):
            if x.vision is None:
                raise ConfigError("the BLIP-2 multimodal path needs the reference image's ViT states, but these "
                                  "image features carry none (set encoder.keep_vision, or pass pixels)")
            return x.vision.float()
        if x.dim() == 4:
            return self.vision_states(x)
        if x.dim() == 3:
            return x.float()
        raise ValueError(f"expected pixels [B,3,H,W] or ViT states [B,N,D], got {tuple(x.shape)}")

    def named_image_features(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every named image output: ``query_tokens`` [B,Q,H], ``query0`` [B,H] (CaLa),
        ``projected_tokens`` [B,Q,P] L2-normalised (BLIP-2 retrieval / SPRC), ``projected_query0``."""
        vision = self._vision(pixels)
        role = self.role("visual")
        hidden = role.image(vision)
        projected = F.normalize(role.vision_projection(hidden), dim=-1)
        return {"vision": vision, "query_tokens": hidden, "query0": hidden[:, 0],
                "projected_tokens": projected, "projected_query0": projected[:, 0]}

    def encode_image(self, pixels: torch.Tensor) -> Features:
        n = self.named_image_features(pixels)
        vision = n["vision"] if self.keep_vision else None
        if self.space == "hidden":
            return Features(n["query0"], n["query_tokens"], None, vision=vision)
        return Features(n["projected_query0"], n["projected_tokens"], None, vision=vision)

    def _text_mask(self, token_ids: torch.Tensor) -> torch.Tensor:
        return token_ids != self.pad_token_id

    def encode_text(self, token_ids: torch.Tensor, slot_embeddings: torch.Tensor | None = None) -> Features:
        role = self.role("textual")
        mask = self._text_mask(token_ids)
        hidden = role.text(token_ids, mask, self.slot_token_id, slot_embeddings)
        cls = hidden[:, 0]
        pooled = cls if self.space == "hidden" else F.normalize(role.text_projection(cls), dim=-1)
        return Features(pooled, hidden, mask)

    def encode_multimodal(self, reference: torch.Tensor | Features, token_ids: torch.Tensor,
                          slot_embeddings: torch.Tensor | None = None) -> Features:
        """Query tokens + text through the multimodal Q-Former, cross-attending to the reference's
        ViT states; ``tokens`` = the query outputs, ``pooled`` = query 0 (hidden or projected)."""
        role = self.role("multimodal")
        hidden = role.multimodal(self._vision(reference), token_ids, self._text_mask(token_ids),
                                 self.slot_token_id, slot_embeddings)
        if self.space == "hidden":
            return Features(hidden[:, 0], hidden, None)
        proj = F.normalize(role.vision_projection(hidden), dim=-1)
        return Features(proj[:, 0], proj, None)


def build_blip2(name: str, checkpoint: str | Path | None = None, **kw: Any) -> Blip2Encoder:
    """``blip2:PATH`` (a Hugging Face folder or a LAVIS file) or ``blip2`` with ``random_weights``;
    ``checkpoint`` (``--encoder-checkpoint``) is the same PATH given apart."""
    path = name[len("blip2:"):] if name.startswith("blip2:") else None
    if path and checkpoint and Path(path).resolve() != Path(checkpoint).resolve():
        raise ConfigError(f"encoder {name!r} and encoder_checkpoint {str(checkpoint)!r} name two BLIP-2 weight sources")
    path = path or (str(checkpoint) if checkpoint else None)
    if not path and not kw.get("random_weights"):
        raise ConfigError("encoder 'blip2' needs weights: blip2:DIR (Hugging Face BLIP-2 folder), blip2:FILE.pth "
                          "(LAVIS checkpoint), or encoder_config.random_weights=true with a preset")
    try:
        return Blip2Encoder(path, **kw)
    except TypeError as exc:
        raise ConfigError(f"bad options for the blip2 encoder: {_one_line(exc)}") from None


def save_random_folder(folder: str | Path, preset: str = "tiny", vocab_words: list[str] | None = None,
                       seed: int = 0) -> Path:
    """Write a random-weight ``Blip2ForImageTextRetrieval`` folder (config, safetensors, tokenizer):
    what a downloaded blip2-itm-vit-g folder looks like, for tests and the off-the-shelf path."""
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    if preset not in PRESETS or PRESETS[preset]["vision"] != "eva_vit_g":
        raise ConfigError(f"a Hugging Face BLIP-2 folder has an EVA-style ViT: preset must be tiny or vit_g, got {preset!r}")
    folder = Path(folder)
    write_vocab(folder, vocab_words or [])
    tok = load_tokenizer(folder)
    pr = PRESETS[preset]
    qcfg = {"use_qformer_text_input": True, **pr["qformer_config"],
            "vocab_size": max(len(tok), 8) if preset == "tiny" else 30523}
    config = Blip2Config(vision_config=pr["vision_config"], qformer_config=qcfg,
                         num_query_tokens=pr["num_query_tokens"],
                         image_text_hidden_size=pr.get("image_text_hidden_size", 256))
    config.architectures = ["Blip2ForImageTextRetrieval"]
    torch.manual_seed(seed)
    model = Blip2ForImageTextRetrieval(config).eval()
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 0.02)
    with _QuietTransformers():
        model.save_pretrained(str(folder))
    return folder
