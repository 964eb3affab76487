"""The one in-memory shape every dataset loader produces.

A loader turns a dataset's own files into a :class:`CIRSplit`: a list of query dicts and the
gallery they are ranked against. Everything downstream (torch datasets, the feature cache,
training, evaluation, submissions) reads only this shape, so a new dataset needs a loader and
nothing else.

Query dict keys (SEARLE-style dicts, only the ones that apply are present):
    query_id      str   id used in prediction/submission files (CIRR pairid, CIRCO id,
                        FashionIQ "<category>/<index>", user data line index)
    reference     str   reference image name (a key of ``CIRSplit.images``)
    caption       str   the modification text as evaluated (caption policy applied)
    caption_choices list[str]  training-time caption variants sampled per epoch (FashionIQ)
    target        str   the target image name (absent on test splits)
    targets       list[str]  all ground truths (CIRCO gt_img_ids); ``target`` is the first
    subset        list[str]  CIRR img_set members other than the reference
    category      str   FashionIQ category
    shared_concept str  CIRCO shared concept
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError


@dataclass
class CIRSplit:
    """One split of one dataset: queries, the gallery, and where each image lives on disk."""

    dataset: str                      # 'cirr' | 'fashioniq' | 'circo' | 'user'
    split: str                        # 'train' | 'val' | 'test1' | 'test' | ...
    queries: list[dict[str, Any]]
    gallery: list[str]                # image names ranked at evaluation time
    images: dict[str, Path]           # name -> absolute image path (gallery + references)
    protocol: str = "generic"         # evaluation protocol name
    category: str | None = None       # FashionIQ category
    meta: dict[str, Any] = field(default_factory=dict)  # options recorded with results

    @property
    def has_targets(self) -> bool:
        return any("target" in q for q in self.queries)

    def image_path(self, name: str) -> Path:
        try:
            return self.images[name]
        except KeyError:
            raise DataError(f"image name {name!r} is not in the {self.dataset} {self.split} split") from None

    def all_image_names(self) -> list[str]:
        """Every image a query or the gallery refers to, gallery order first, no repeats."""
        seen = dict.fromkeys(self.gallery)
        for q in self.queries:
            seen.setdefault(q["reference"], None)
            if "target" in q:
                seen.setdefault(q["target"], None)
        return list(seen)

    def gallery_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.gallery)}
