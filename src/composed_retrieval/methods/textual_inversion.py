"""Zero-shot CIR by textual inversion: phi maps an image feature to a pseudo-word embedding
that fills the "$" slot of a prompt; both CLIP towers stay frozen, only phi trains, and it
trains on image-caption pairs (``train_on = "pairs"``), never on CIR triplets.

phi = MLP(d -> 4d -> 4d -> d_tok) with GELU and dropout (SEARLE ``src/phi.py``: three linear
layers, hidden = 4 x visual output dim, dropout 0.5, AdamW lr 1e-4, weight decay 0.01). d is
the pooled feature size and d_tok the text transformer width (the word-embedding size):
ViT-L/14 768 -> 3072 -> 3072 -> 768, which is what the paper summary of 2406.18836
(the project's shared ``papers/002_e97f42742b7771b2.txt``: "MLP Textual Inversion Network (3 layers,
768-3072-768)") describes; ViT-B/32 512 -> 2048 -> 2048 -> 512, RN50x4 640 -> 2560 -> 2560 ->
640, tiny 256 -> 1024 -> 1024 -> 128.

Objectives (weighted sum ``w_plain * plain + w_masked * masked``):

* plain (Pic2Word ``get_loss_img2text``): the prompt "a photo of $" with phi(image) must match
  the image's own feature, symmetric contrastive over the batch at a fixed logit scale
  (Pic2Word uses the frozen CLIP's, 100).
* masked (arXiv 2406.18836): per caption one noun is chosen; ``noun_mask`` replaces it by "$"
  (else the query text is ``prompt`` around the full caption); ``cam_mask`` masks the query
  image by a Grad-CAM for that noun (methods/cam.py), on one side of ``tau``:

  - ``cam_region="unrelated"`` (default): the part of the image *unrelated* to the noun (CAM
    <= tau) is masked, the noun's region is kept. With ``noun_mask`` the pair is
    complementary, as a CIR query is: the image keeps the noun's object, the text keeps its
    context, and phi(masked image) must supply what the "$" stands for. This follows the only
    method-level description found, a third-party digest of the paper ("one word of the text
    is masked and the part of the image unrelated to that word is masked", complementary
    image-text pairs); the paper's own method section could not be read here.
  - ``cam_region="noun"``: the noun's CAM region is masked. With ``noun_mask`` the noun leaves
    both the caption and the image, so the query carries nothing about it (this code's
    behaviour before; the paper summary's "masking one noun word in the text and
    corresponding image regions" can be read this way). ``"highlighted"``/``"rest"``, the
    old names, are accepted for ``"noun"``/``"unrelated"``.

  The masked pixels are replaced by the same pixels of another image in the batch
  (``cam_fill="batch"``) or by the mean colour (``"mean"``); no source read here says how
  2406.18836 fills them: the batch fill is this project's choice. The query text with
  phi(masked image) must match the *full* image (symmetric contrastive). The paper's loss
  weights and its tau were not checked: the defaults (1, 1, 0.3) are ours.

Inference (SEARLE ``validate.py``): "a photo of $ that {caption}" with phi(reference). The
caption reaches ``compose`` as token ids (the shared evaluation code tokenizes it), so the
prompt is spliced in at the id level: [BOS] prompt-prefix ids, caption ids, [EOS].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..encoders.base import EncoderPair, Features
from ..errors import ConfigError
from ..losses import symmetric_contrastive
from .base import CIRMethod
from .registry import register_method

DEFAULTS: dict[str, Any] = {
    "prompt": "a photo of $ that {caption}",   # inference (SEARLE validate.py)
    "train_prompt": "a photo of $",            # plain objective (Pic2Word)
    "dropout": 0.5,                            # SEARLE --phi-dropout
    "hidden_mult": 4,                          # SEARLE hidden_dim = 4 x output_dim of CLIP
    "logit_scale": 100.0,                      # Pic2Word: the frozen CLIP's logit scale
    "noun_mask": False,
    "cam_mask": False,
    "tau": 0.3,
    "cam_region": "unrelated",                 # what the query image loses: "unrelated" | "noun"
    "cam_fill": "batch",                       # another batch image's pixels (our choice) or "mean"
    "cam_prompt": "a {noun}",
    "nouns": "pos",                            # 'synthetic' | 'pos' | list of words (data/nouns.py)
    "w_plain": 1.0,
    "w_masked": 1.0,
}


class Phi(nn.Module):
    """Image feature -> pseudo-word embedding."""

    def __init__(self, dim: int, hidden: int, out: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                    nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout),
                                    nn.Linear(hidden, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@dataclass
class TextIds(Features):
    """A text not encoded yet: the pseudo-word needs the reference image, which ``compose``
    has and ``text_features`` has not."""

    token_ids: torch.Tensor | None = None


def splice_prompt(encoder: EncoderPair, prefix: str, token_ids: torch.Tensor) -> torch.Tensor:
    """Token ids of "{prefix} {caption}" from the caption's ids, for both tokenizers here
    (padding id 0, a begin token first, an end token last); too long: truncated, end kept."""
    pre = encoder.tokenize([prefix])[0]
    pre = pre[pre != 0][:-1].to(token_ids.device)          # [BOS, prefix...] without the end token
    length = token_ids.shape[1]
    rows = []
    for row in token_ids:
        body = row[row != 0][1:]                            # caption..., end token
        ids = torch.cat([pre, body])
        if ids.numel() > length:
            ids = torch.cat([ids[: length - 1], body[-1:]])
        rows.append(F.pad(ids, (0, length - ids.numel())))
    return torch.stack(rows)


@register_method("textual_inversion")
class TextualInversion(CIRMethod):
    train_on = "pairs"

    def __init__(self, encoder: EncoderPair, config: dict[str, Any] | None = None) -> None:
        unknown = set(config or {}) - set(DEFAULTS) - {"train_image_tower", "train_text_tower"}
        if unknown:
            raise ConfigError(f"unknown textual_inversion options: {', '.join(sorted(unknown))}")
        super().__init__(encoder, {**DEFAULTS, **(config or {})})
        c = self.config
        if not c["prompt"].endswith("{caption}") or c["prompt"].count("$") != 1:
            raise ConfigError("textual_inversion 'prompt' must contain one '$' and end with '{caption}'")
        from .cam import REGION_ALIASES, cam_region_name
        if c["cam_region"] not in ("unrelated", "noun", *REGION_ALIASES):
            raise ConfigError("textual_inversion 'cam_region' must be 'unrelated' (mask what is unrelated to "
                              "the noun: complementary to the caption) or 'noun' (mask the noun's region)")
        c["cam_region"] = cam_region_name(c["cam_region"])
        if c["cam_fill"] not in ("batch", "mean"):
            raise ConfigError("textual_inversion 'cam_fill' must be 'batch' or 'mean'")
        if not 0.0 <= float(c["tau"]) < 1.0:
            raise ConfigError("textual_inversion 'tau' must be in [0, 1)")
        self.prompt_prefix = c["prompt"][: -len("{caption}")].strip()
        self.phi = Phi(encoder.embed_dim, int(c["hidden_mult"]) * encoder.embed_dim,
                       encoder.text_token_dim, float(c["dropout"]))
        self._nouns = None

    # both towers are frozen by design: only phi trains, whatever a stage asks for
    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.head_parameters())

    @property
    def masked(self) -> bool:
        return bool(self.config["noun_mask"] or self.config["cam_mask"])

    @property
    def needs_pixels(self) -> bool:
        return bool(self.config["cam_mask"])

    def noun_spans(self, caption: str) -> list[tuple[int, int]]:
        if self._nouns is None:
            from ..data.nouns import noun_finder
            from ..synth.world import NOUNS   # the synthetic benchmark's vocabulary, by name
            self._nouns = noun_finder(self.config["nouns"], {"synthetic": NOUNS})
        return self._nouns(caption)

    # ---- inference ------------------------------------------------------------------------
    def text_features(self, token_ids: torch.Tensor, slot_embeddings: torch.Tensor | None = None) -> Features:
        if slot_embeddings is not None:
            return self.encoder.encode_text(token_ids, slot_embeddings)
        empty = token_ids.new_zeros((token_ids.shape[0], 0), dtype=torch.float32)
        return TextIds(empty, empty[:, :, None], None, token_ids=token_ids)

    def pseudo_words(self, reference: Features) -> torch.Tensor:
        return self.phi(reference.pooled.float())

    def compose(self, reference: Features, text: Features) -> torch.Tensor:
        if not isinstance(text, TextIds) or text.token_ids is None:
            raise TypeError("textual_inversion composes from caption token ids (use its text_features)")
        ids = splice_prompt(self.encoder, self.prompt_prefix, text.token_ids)
        out = self.encoder.encode_text(ids, self.pseudo_words(reference)).pooled
        return F.normalize(out.float(), dim=-1)

    # ---- training -------------------------------------------------------------------------
    def _encode_slot(self, texts: list[str], slots: torch.Tensor) -> torch.Tensor:
        ids = self.encoder.tokenize(texts).to(slots.device)
        return F.normalize(self.encoder.encode_text(ids, slots).pooled.float(), dim=-1)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        x = batch["reference"]
        captions: list[str] = list(batch["caption"])
        scale = float(self.config["logit_scale"])
        feats = self.image_features(x)
        image = F.normalize(feats.pooled.float(), dim=-1)
        plain_q = self._encode_slot([self.config["train_prompt"]] * len(captions), self.pseudo_words(feats))
        plain = symmetric_contrastive(plain_q, image, scale)
        out = {"plain": plain.detach()}
        loss = float(self.config["w_plain"]) * plain
        if self.masked:
            masked, used = self._masked_loss(x, feats, image, captions, scale)
            out["masked_used"] = torch.tensor(float(used))
            if masked is not None:
                out["masked"] = masked.detach()
                loss = loss + float(self.config["w_masked"]) * masked
        out["loss"] = loss
        return out

    def _masked_loss(self, x: Any, feats: Features, image: torch.Tensor, captions: list[str],
                     scale: float) -> tuple[torch.Tensor | None, int]:
        """Pairs whose caption has no noun get the plain loss only; ``masked_used`` counts the
        pairs that had one, so nothing is skipped silently."""
        from ..data.nouns import mask_noun
        from .cam import apply_cam_mask, noun_cams

        rows, texts, nouns = [], [], []
        slot = self.encoder.slot_token_id
        for i, cap in enumerate(captions):
            spans = self.noun_spans(cap)
            if not spans:
                continue
            choice = int(torch.randint(len(spans), (1,)))
            masked_cap, noun = mask_noun(cap, spans, choice)
            if self.config["noun_mask"] and not bool((self.encoder.tokenize([masked_cap]) == slot).any()):
                # the chosen noun lies past the context length: take the first noun instead
                masked_cap, noun = mask_noun(cap, spans, 0)
                if not bool((self.encoder.tokenize([masked_cap]) == slot).any()):
                    continue
            rows.append(i)
            nouns.append(noun.lower())
            texts.append(masked_cap if self.config["noun_mask"] else self.config["prompt"].format(caption=cap))
        if len(rows) < 2:   # a contrastive loss needs at least two pairs
            return None, len(rows)
        idx = torch.tensor(rows, device=image.device)
        if self.config["cam_mask"]:
            if isinstance(x, Features):
                raise ConfigError("cam_mask needs pixels, but the batch holds cached features")
            pix = x[idx]
            cam = noun_cams(self.encoder, pix, nouns, self.config["cam_prompt"])
            pix = apply_cam_mask(pix, cam, float(self.config["tau"]), self.config["cam_region"],
                                 self.config["cam_fill"])
            with torch.no_grad():
                query_feats = self.encoder.encode_image(pix).detach()
        else:
            query_feats = Features(feats.pooled[idx], feats.tokens[idx])
        q = self._encode_slot(texts, self.pseudo_words(query_feats))
        return symmetric_contrastive(q, image[idx], scale), len(rows)
