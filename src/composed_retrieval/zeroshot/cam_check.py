"""How well a noun's CAM finds the noun's object, and what each masking direction leaves of it.

Scored on synthetic scenes, whose renderer knows every object's pixels
(``synth.render.render_scene(masks=...)``): per scene one noun of the caption is picked as the
masked objective picks it (a shape word, ``data.nouns``), its object is the union of the scene's
objects of that shape, and the CAM region is the CAM above ``tau`` (``methods.cam``). Reported
per tau, as means over scenes:

* ``iou``: IoU of the CAM region with the noun's object (``iou_any_object``: with all objects,
  which tells a CAM on the wrong object from one on the background);
* ``survival_unrelated`` / ``survival_noun``: the fraction of the object's pixels the masked
  query image still shows, when the part unrelated to the noun is masked (the default,
  complementary pairing) and when the noun's region is masked. Both come from the real
  ``apply_cam_mask`` output (mean fill), so they measure the code the objective runs;
* ``region_area`` / ``object_area``: fractions of the image, for scale.

``benchmarks/cam_masking.py`` prints these for a pre-trained tower and a random one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch


@dataclass
class SceneBatch:
    """Rendered scenes ready for the CAM: normalised pixels, captions, picked nouns, masks."""

    pixels: torch.Tensor          # [N, 3, S, S], the encoder's normalisation
    captions: list[str]
    masked_captions: list[str]
    nouns: list[str]
    objects: torch.Tensor         # [N, S, S] bool: the noun's object pixels
    any_object: torch.Tensor      # [N, S, S] bool: every object's pixels (is the CAM on objects at all?)


def synthetic_scenes(encoder: Any, n: int, seed: int = 0, min_cover: float = 0.5) -> SceneBatch:
    """``n`` fresh random scenes at the encoder's resolution, one noun picked per caption."""
    from ..data.nouns import mask_noun, noun_finder
    from ..synth.render import render_scene
    from ..synth.world import NOUNS, caption, sample_scene

    rng = np.random.default_rng([seed, 0xCA3])
    find = noun_finder(list(NOUNS))
    transform = encoder.image_transform("targetpad")
    size = int(encoder.image_size)
    pixels, caps, masked, nouns, objects, every = [], [], [], [], [], []
    for _ in range(n):
        scene = sample_scene(rng, frozenset())
        masks: list[np.ndarray] = []
        img = render_scene(scene, size, rng, masks=masks)
        cap = caption(scene)
        spans = find(cap)
        masked_cap, noun = mask_noun(cap, spans, int(rng.integers(len(spans))))
        obj = np.zeros((size, size), dtype=bool)
        anything = np.zeros((size, size), dtype=bool)
        for o, m in zip(scene, masks):
            anything |= m >= min_cover
            if o.shape == noun:
                obj |= m >= min_cover
        pixels.append(transform(img))
        caps.append(cap)
        masked.append(masked_cap)
        nouns.append(noun)
        objects.append(torch.from_numpy(obj))
        every.append(torch.from_numpy(anything))
    return SceneBatch(torch.stack(pixels), caps, masked, nouns, torch.stack(objects), torch.stack(every))


def masking_report(encoder: Any, scenes: SceneBatch, taus: Sequence[float] = (0.2, 0.3, 0.4),
                   cam: torch.Tensor | None = None, batch_size: int = 64,
                   weighting: str = "auto") -> dict[str, dict[str, float]]:
    """``{str(tau): {iou, iou_any_object, survival_unrelated, survival_noun, region_area, object_area}}``.

    ``cam`` overrides the encoder's CAM (``[N, S, S]`` in [0, 1]), e.g. a perfect one in tests."""
    from ..methods.cam import apply_cam_mask, noun_cams, object_survival, region_iou

    if cam is None:
        encoder.eval()
        cam = torch.cat([noun_cams(encoder, scenes.pixels[s:s + batch_size], scenes.nouns[s:s + batch_size],
                                   weighting=weighting)
                         for s in range(0, len(scenes.nouns), batch_size)])
    obj = scenes.objects
    out: dict[str, dict[str, float]] = {}
    for tau in taus:
        region = cam > float(tau)
        row = {"iou": region_iou(region, obj).mean().item(),
               "iou_any_object": region_iou(region, scenes.any_object).mean().item()}
        for direction in ("unrelated", "noun"):
            masked = apply_cam_mask(scenes.pixels, cam, float(tau), region=direction, fill="mean")
            row[f"survival_{direction}"] = object_survival(scenes.pixels, masked, obj).nanmean().item()
        row["region_area"] = region.float().mean().item()
        row["object_area"] = obj.float().mean().item()
        out[f"{float(tau):g}"] = row
    return out
