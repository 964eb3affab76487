"""Grad-CAM for a noun on the image tower, and the masks it gives (masked zero-shot training).

CAM (Selvaraju et al.'s Grad-CAM, applied to a CLIP-style pair): the score is the cosine
similarity between the image's pooled feature and the text feature of the noun; the map is
ReLU(sum_c w_c A_c) with w_c the spatial mean of d score / d A_c, where A is the image tower's
last spatial activation. Grad-CAM's spatial mean assumes the pooled feature averages over
positions (GAP, attention pooling, a ViT class token); the tiny tower instead projects the
flattened map with position-specific weights, and there Grad-CAM lit up the empty background
rather than the shapes (seen on the synthetic images). For it the default (``weighting="auto"``)
is LayerCAM's per-location weighting (Jiang et al. 2021): ReLU(sum_c ReLU(dS/dA_c(x, y)) A_c(x, y)). The map is min-max normalised to [0, 1] per image and bilinearly
upsampled to the image; pixels whose value is above ``tau`` form the noun's region. Which side
of it a masked query image loses is :func:`cam_drop_mask`'s ``region``.

Which activation A is, per tower (it must lie on the path to the pooled feature, so its
gradient is not zero):

* tiny: the CNN backbone output ``[B, C, g, g]`` (the map the pooled feature is projected from);
* open_clip ResNet: ``visual.layer4`` output (the map entering attention pooling);
* open_clip ViT: the patch tokens at the *input* of the last residual block -- the patch
  outputs of ``ln_post`` do not reach the pooled class token, so their gradient is zero.

Masked pixels are set to 0 in normalised space, i.e. to the normalisation mean colour
(``fill="mean"``), or copied from the next image of the batch (``fill="batch"``).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..encoders.base import EncoderPair


def _cam_site(encoder: EncoderPair) -> tuple[nn.Module, str, Any]:
    """(module, how to read its activation, layout info)."""
    from ..encoders.tiny import TinyEncoder

    if isinstance(encoder, TinyEncoder):
        return encoder.visual.backbone, "map", None
    kind = getattr(encoder, "_kind", None)
    if kind == "resnet":
        return encoder.model.visual.layer4, "map", None  # type: ignore[attr-defined]
    if kind == "vit":
        tr = encoder.model.visual.transformer  # type: ignore[attr-defined]
        return tr.resblocks[-1], "vit_input", (bool(getattr(tr, "batch_first", True)), encoder._n_patches)  # type: ignore[attr-defined]
    raise NotImplementedError(f"no CAM site known for encoder {type(encoder).__name__}")


def _position_aware(encoder: EncoderPair) -> bool:
    """True when the pooled feature is a position-specific map of the spatial activation (the
    tiny tower's flatten + linear), where Grad-CAM's spatially averaged weights do not apply."""
    from ..encoders.tiny import TinyEncoder
    return isinstance(encoder, TinyEncoder)


def grad_cam(encoder: EncoderPair, pixels: torch.Tensor, text_pooled: torch.Tensor,
             weighting: str = "auto") -> torch.Tensor:
    """CAM ``[B, H, W]`` in [0, 1] of each image for its own text feature ``text_pooled[b]``.

    Works with frozen towers: the graph is built from the pixels, never touching parameters'
    gradients (``torch.autograd.grad`` on the activation only).
    """
    module, how, info = _cam_site(encoder)
    captured: dict[str, torch.Tensor] = {}
    if how == "map":
        handle = module.register_forward_hook(lambda _m, _i, out: captured.__setitem__("a", out))
    else:
        handle = module.register_forward_pre_hook(lambda _m, args: captured.__setitem__("a", args[0]))
    try:
        with torch.enable_grad():
            x = pixels.detach().clone().requires_grad_(True)
            pooled = encoder.encode_image(x).pooled.float()
            score = (F.normalize(pooled, dim=-1) * F.normalize(text_pooled.float().detach(), dim=-1)).sum()
            act = captured["a"]
            (grad,) = torch.autograd.grad(score, act)
    finally:
        handle.remove()
    act, grad = act.detach().float(), grad.float()
    if weighting == "auto":
        weighting = "layercam" if _position_aware(encoder) else "gradcam"
    if weighting not in ("gradcam", "layercam"):
        raise ValueError(f"CAM weighting must be 'gradcam', 'layercam' or 'auto', got {weighting!r}")
    if how == "map":                                      # [B, C, h, w]
        weights = grad.mean(dim=(2, 3), keepdim=True) if weighting == "gradcam" else F.relu(grad)
        raw = (weights * act).sum(dim=1)                  # [B, h, w]
    else:
        batch_first, n_patches = info
        if not batch_first:
            act, grad = act.transpose(0, 1), grad.transpose(0, 1)
        act, grad = act[:, -n_patches:], grad[:, -n_patches:]   # drop the class token
        weights = grad.mean(dim=1, keepdim=True) if weighting == "gradcam" else F.relu(grad)
        side = int(math.isqrt(n_patches))
        raw = (weights * act).sum(dim=-1).reshape(-1, side, side)
    cam = F.relu(raw)
    flat = cam.flatten(1)
    # an all-zero ReLU map (every location votes against the noun) falls back to the raw map,
    # so a region is always defined
    empty = flat.amax(dim=1) <= 1e-12
    if bool(empty.any()):
        flat = torch.where(empty[:, None], raw.flatten(1), flat)
    lo, hi = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    flat = (flat - lo) / (hi - lo).clamp_min(1e-12)
    cam = flat.reshape(cam.shape)[:, None]
    up = F.interpolate(cam, size=pixels.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return up.clamp_(0.0, 1.0)


@torch.no_grad()
def noun_text_features(encoder: EncoderPair, nouns: Sequence[str], prompt: str = "a {noun}") -> torch.Tensor:
    return encoder.encode_texts([prompt.format(noun=n) for n in nouns]).pooled


def noun_cams(encoder: EncoderPair, pixels: torch.Tensor, nouns: Sequence[str], prompt: str = "a {noun}",
              weighting: str = "auto") -> torch.Tensor:
    """CAM of each image for its own noun."""
    return grad_cam(encoder, pixels, noun_text_features(encoder, nouns, prompt).to(pixels.device), weighting)


#: which side of the CAM threshold a masked query image loses (old names still accepted)
CAM_REGIONS = ("unrelated", "noun")
REGION_ALIASES = {"rest": "unrelated", "highlighted": "noun"}


def cam_region_name(region: str) -> str:
    """The canonical direction name; ``"rest"``/``"highlighted"`` were the names before the
    complementary pairing became the default."""
    region = REGION_ALIASES.get(region, region)
    if region not in CAM_REGIONS:
        raise ValueError(f"cam region must be 'unrelated' or 'noun', got {region!r}")
    return region


def cam_drop_mask(cam: torch.Tensor, tau: float, region: str = "unrelated") -> torch.Tensor:
    """``[B, H, W]`` True where the query image is replaced.

    ``"unrelated"``: everything *outside* the noun's CAM region (CAM <= tau): the image keeps
    the noun's object, so with the noun masked in the caption the pair is complementary, like
    a CIR query (phi has to carry the object, the text carries its context).
    ``"noun"``: the noun's CAM region itself (CAM > tau): with noun masking, the noun leaves
    the caption *and* the image (the direction this code used before)."""
    inside = cam > float(tau)
    return ~inside if cam_region_name(region) == "unrelated" else inside


def apply_cam_mask(pixels: torch.Tensor, cam: torch.Tensor, tau: float, region: str = "unrelated",
                   fill: str = "mean") -> torch.Tensor:
    """Replace the pixels :func:`cam_drop_mask` selects.

    ``fill="mean"`` sets them to 0 (the normalisation mean colour); ``fill="batch"`` copies the
    same positions from the next image of the batch, so the query stays a natural-looking image.
    The batch fill is this project's choice: no source read here (the paper's abstract, the
    paper summary in ``/work/shared/papers``, a third-party digest) describes how the masked
    part is filled."""
    drop = cam_drop_mask(cam, tau, region)[:, None].expand_as(pixels)
    if fill == "mean":
        return pixels.masked_fill(drop, 0.0)
    if fill == "batch":
        return torch.where(drop, pixels.roll(1, dims=0), pixels)
    raise ValueError(f"cam fill must be 'mean' or 'batch', got {fill!r}")


def region_iou(region: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image IoU ``[B]`` of two boolean masks ``[B, H, W]`` (1 when both are empty)."""
    region, target = region.flatten(1).bool(), target.flatten(1).bool()
    inter = (region & target).sum(dim=1).float()
    union = (region | target).sum(dim=1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def object_survival(pixels: torch.Tensor, masked: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image fraction ``[B]`` of the object's pixels (``target`` ``[B, H, W]``) that the
    masked query image still shows unchanged (NaN for an image without object pixels)."""
    same = (masked == pixels).all(dim=1) & target.bool()
    n = target.flatten(1).bool().sum(dim=1).float()
    return same.flatten(1).sum(dim=1).float() / n
