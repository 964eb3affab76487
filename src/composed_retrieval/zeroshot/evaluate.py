"""Zero-shot evaluation through the shared code (runner.split_vectors, protocols.evaluate_split).

The one zero-shot specific: FashionIQ queries are encoded in both caption orders and the two
normalised query vectors averaged and renormalised (SEARLE ``validate.py``
``fiq_generate_val_predictions``: "c1 and c2" and "c2 and c1", each caption stripped of ".?, ").
CIRR and CIRCO use the single caption as loaded.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F

from ..data.base import CIRSplit
from ..methods.base import CIRMethod
from ..cache import FeatureTable

_STRIP = ".?, "


def fashioniq_orders(split: CIRSplit) -> tuple[CIRSplit, CIRSplit]:
    """The split twice, with captions "c1 and c2" and "c2 and c1"."""
    def with_order(first: int) -> CIRSplit:
        queries = []
        for q in split.queries:
            caps = q.get("captions")
            if not caps or len(caps) != 2:
                return split
            a, b = caps[first].strip(_STRIP), caps[1 - first].strip(_STRIP)
            queries.append({**q, "caption": f"{a} and {b}"})
        return dataclasses.replace(split, queries=queries)
    return with_order(0), with_order(1)


def zeroshot_vectors(method: CIRMethod, split: CIRSplit, table: FeatureTable, batch_size: int = 256,
                     device: torch.device | str = "cpu", both_orders: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    from ..evaluation.runner import split_vectors

    if split.protocol != "fashioniq" or not both_orders:
        return split_vectors(method, split, table, batch_size, device)
    first, second = fashioniq_orders(split)
    q1, g = split_vectors(method, first, table, batch_size, device)
    q2, _ = split_vectors(method, second, table, batch_size, device)
    return F.normalize(F.normalize(q1, dim=-1) + F.normalize(q2, dim=-1), dim=-1), g


def zeroshot_evaluate(method: CIRMethod, splits: Sequence[CIRSplit], tables: Sequence[FeatureTable],
                      batch_size: int = 256, device: torch.device | str = "cpu",
                      both_orders: bool = True) -> dict[str, float]:
    """Metrics in percent by each split's protocol (FashionIQ categories summarised)."""
    from ..evaluation.runner import evaluate_method

    return evaluate_method(method, splits, tables, batch_size, device,
                           vectors=lambda m, s, t, b, d: zeroshot_vectors(m, s, t, b, d, both_orders))
