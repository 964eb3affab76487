"""The global batch: contrastive losses gather every rank's rows, with gradient.

A ground-floor module (torch only) because losses, methods and the training loop all use it;
``train/distributed.py`` keeps process-group set-up, samplers and batch norm. Outside
``global_batch`` or with one process every function here is the identity, so single-process
code never enters a collective.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.distributed as dist


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


_GATHER = {"on": False}


@contextlib.contextmanager
def global_batch(enabled: bool = True) -> Iterator[None]:
    """Inside, the shared losses treat each rank's rows as part of one global batch. The
    trainer turns it on around the training forward only, so code that runs on rank 0 alone
    (evaluation) never enters a collective."""
    before = _GATHER["on"]
    _GATHER["on"] = bool(enabled)
    try:
        yield
    finally:
        _GATHER["on"] = before


def gathering() -> bool:
    return _GATHER["on"] and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def row_counts(n: int, device: torch.device) -> list[int]:
    """Rows each rank holds (one small collective)."""
    t = torch.tensor([n], dtype=torch.long, device=_comm_device())
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [int(x.item()) for x in out]


class _GatherRows(torch.autograd.Function):
    """All ranks' rows concatenated in rank order; backward sums every rank's gradient for
    this rank's rows (each rank's loss used them as negatives)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:  # type: ignore[override]
        rank = dist.get_rank()
        ctx.sizes, ctx.rank = sizes, rank
        padded = x.new_zeros((max(sizes),) + tuple(x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        lo = sum(ctx.sizes[: ctx.rank])
        return grad[lo: lo + ctx.sizes[ctx.rank]], None


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of each rank's input is the sum of every rank's gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = x.contiguous().clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """``[n_r, ...]`` on each rank -> ``[sum n_r, ...]`` on every rank, differentiable; the
    identity outside ``global_batch`` or with one process."""
    if not gathering():
        return x
    return _GatherRows.apply(x, row_counts(x.shape[0], x.device))


def global_labels_and_norm(local_rows: int, columns: int, device: torch.device) -> tuple[torch.Tensor, float] | None:
    """For ``[local_rows, columns]`` logits whose columns are the gathered global batch: the
    global diagonal labels and the divisor that makes DDP's gradient average equal the global
    mean (``total / world``). None when the logits are local (columns != global row count)."""
    if not gathering():
        return None
    sizes = row_counts(local_rows, device)
    total = sum(sizes)
    if columns != total:
        return None
    lo = sum(sizes[: dist.get_rank()])
    return torch.arange(lo, lo + local_rows, device=device), total / dist.get_world_size()
