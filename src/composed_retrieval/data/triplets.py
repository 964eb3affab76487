"""Torch datasets over a CIRSplit: training triplets and evaluation queries.

``image_fn(name)`` decides what an image is (pixels from disk, or cached features), so the same
datasets serve end-to-end training and training on a feature cache.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from ..features import Features
from ..errors import DataError
from .base import CIRSplit


class TripletDataset(Dataset):
    """(reference, caption, target) items; a query's ``caption_choices`` (FashionIQ "random"
    policy) are sampled per epoch, deterministically in (seed, epoch, index), so runs repeat and
    data-loader workers agree."""

    def __init__(self, split: CIRSplit, image_fn: Callable[[str], Any], seed: int = 0) -> None:
        without = [q["query_id"] for q in split.queries if "target" not in q]
        if without:
            raise DataError(f"the {split.dataset} {split.split} split has {len(without)} queries without a "
                            f"target (e.g. query {without[0]}); training needs targets, so use a train/val split")
        self.split = split
        self.queries = split.queries
        self.image_fn = image_fn
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def caption(self, index: int) -> str:
        q = self.queries[index]
        choices = q.get("caption_choices")
        if not choices:
            return q["caption"]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return choices[int(rng.integers(len(choices)))]

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        q = self.queries[index]
        return {"reference": self.image_fn(q["reference"]), "target": self.image_fn(q["target"]),
                "caption": self.caption(index), "reference_name": q["reference"],
                "target_name": q["target"], "index": index}


class QueryDataset(Dataset):
    """Evaluation/prediction queries: reference image and the evaluated caption, no target."""

    def __init__(self, split: CIRSplit, image_fn: Callable[[str], Any]) -> None:
        self.split = split
        self.queries = split.queries
        self.image_fn = image_fn

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        q = self.queries[index]
        return {"reference": self.image_fn(q["reference"]), "caption": q["caption"],
                "reference_name": q["reference"], "query_index": index}


def collate_triplets(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch item dicts: tensors stacked, Features stacked field-wise, ints to a long tensor,
    everything else (names, captions) left as lists."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        first = values[0]
        if isinstance(first, torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(first, Features):
            out[key] = stack_features(values)
        elif isinstance(first, (int, np.integer)) and not isinstance(first, bool):
            out[key] = torch.tensor(values, dtype=torch.long)
        else:
            out[key] = list(values)
    return out


def stack_features(values: list[Features]) -> Features:
    """One batched Features from per-image ones: unbatched fields (pooled ``[d]``) are stacked,
    batched ones (pooled ``[1, d]``) concatenated."""
    join = torch.stack if values[0].pooled.dim() == 1 else torch.cat
    masks = [v.mask for v in values]
    if any(m is None for m in masks) and not all(m is None for m in masks):
        masks = [torch.ones(v.tokens.shape[:-1], dtype=torch.bool) if m is None else m
                 for v, m in zip(values, masks)]
    return Features(pooled=join([v.pooled for v in values]), tokens=join([v.tokens for v in values]),
                    mask=None if masks[0] is None else join(masks))
