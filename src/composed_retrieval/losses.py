"""Losses shared by every method (one implementation each)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .gather import gather_rows, gathering, global_labels_and_norm


def batch_contrastive(query: torch.Tensor, target: torch.Tensor, scale: float = 100.0,
                      labels: torch.Tensor | None = None) -> torch.Tensor:
    """Batch-based classification (CLIP4Cir): CE of ``scale * q @ t.T`` against the diagonal.

    ``query`` and ``target`` are L2-normalised ``[B, d]``; under DDP the caller passes the
    gathered targets and the matching global ``labels``. Inside the trainer's global batch
    (several ranks) the targets are gathered here, so every method's negatives span all ranks.
    """
    if labels is None and gathering():
        target = gather_rows(target)
    return diagonal_cross_entropy(scale * query @ target.t(), labels)


def diagonal_cross_entropy(logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """CE of ready-made ``[B, N]`` logits against the diagonal (or ``labels``): for methods that
    mix several logit matrices before the softmax (CaLa).

    With several ranks, logits whose columns are the gathered global batch (``gather_rows``)
    get labels offset by this rank's first row and are normalised by the global row count.
    """
    if labels is None and gathering():
        distributed = global_labels_and_norm(logits.shape[0], logits.shape[1], logits.device)
        if distributed is not None:
            labels, norm = distributed
            return F.cross_entropy(logits, labels, reduction="sum") / norm
    if labels is None:
        labels = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, labels)


def symmetric_contrastive(a: torch.Tensor, b: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """CLIP-style loss in both directions (used for alignment terms and pre-training)."""
    if gathering():
        all_a, all_b = gather_rows(a), gather_rows(b)
        return 0.5 * (diagonal_cross_entropy(scale * a @ all_b.t()) + diagonal_cross_entropy(scale * b @ all_a.t()))
    logits = scale * a @ b.t()
    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
