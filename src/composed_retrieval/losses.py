"""Losses shared by every method (one implementation each)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def batch_contrastive(query: torch.Tensor, target: torch.Tensor, scale: float = 100.0,
                      labels: torch.Tensor | None = None) -> torch.Tensor:
    """Batch-based classification (CLIP4Cir): CE of ``scale * q @ t.T`` against the diagonal.

    ``query`` and ``target`` are L2-normalised ``[B, d]``; under DDP the caller passes the
    gathered targets and the matching global ``labels``.
    """
    logits = scale * query @ target.t()
    if labels is None:
        labels = torch.arange(query.shape[0], device=query.device)
    return F.cross_entropy(logits, labels)


def symmetric_contrastive(a: torch.Tensor, b: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """CLIP-style loss in both directions (used for alignment terms and pre-training)."""
    logits = scale * a @ b.t()
    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
