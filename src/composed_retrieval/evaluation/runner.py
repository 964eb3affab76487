"""Run a method over a split: query and gallery vectors, then the split's own protocol."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..data.base import CIRSplit
from ..methods.base import CIRMethod
from ..cache import FeatureTable


@torch.no_grad()
def split_vectors(method: CIRMethod, split: CIRSplit, table: FeatureTable, batch_size: int = 256,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised query vectors ``[Q, d]`` (in query order) and gallery vectors ``[N, d]``
    (rows aligned with ``split.gallery``)."""
    was_training = method.training
    method.eval()
    gallery = []
    for s in range(0, len(split.gallery), batch_size):
        f = table.take(split.gallery[s:s + batch_size]).to(device)
        gallery.append(method.gallery_embedding(f).float().cpu())
    queries = []
    for s in range(0, len(split.queries), batch_size):
        chunk = split.queries[s:s + batch_size]
        ref = table.take([q["reference"] for q in chunk]).to(device)
        ids = method.encoder.tokenize([q["caption"] for q in chunk]).to(device)
        queries.append(method.compose(ref, method.text_features(ids)).float().cpu())
    method.train(was_training)
    d = method.encoder.embed_dim
    g = torch.cat(gallery) if gallery else torch.empty(0, d)
    q = torch.cat(queries) if queries else torch.empty(0, d)
    return q, g


def evaluate_method(method: CIRMethod, splits: Sequence[CIRSplit], tables: Sequence[FeatureTable],
                    batch_size: int = 256, device: torch.device | str = "cpu",
                    vectors: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict[str, float]:
    """Metrics in percent by each split's protocol; FashionIQ categories are summarised.

    ``vectors(method, split, table, batch_size, device)`` makes the query and gallery vectors
    (default :func:`split_vectors`; zero-shot evaluation passes its two-caption-order variant).
    """
    from .protocols import evaluate_split, fashioniq_summary

    vectors = vectors or split_vectors
    per = {}
    for split, table in zip(splits, tables):
        q, g = vectors(method, split, table, batch_size, device)
        per[split.category or split.split] = evaluate_split(split, q, g)
    if splits and splits[0].protocol == "fashioniq":
        return fashioniq_summary(per, require_all=False)
    if len(per) == 1:
        return next(iter(per.values()))
    return {f"{name}_{k}": v for name, m in per.items() for k, v in m.items()}
