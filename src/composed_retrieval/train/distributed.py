"""Running on several processes (GPUs, nodes) with ``torch.distributed`` as torchrun sets it up.

One process per device; torchrun exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT, and
``setup`` joins that process group (NCCL on CUDA, gloo on CPU). Without torchrun, or with a
world of one, everything here is a no-op, so single-process runs are untouched.

What makes N ranks with batch B/N each train like one process with batch B:

* ``RankSliceBatchSampler``: every rank draws the *same* global permutation (the generator the
  single-process DataLoader uses, consumed in the same order) and takes its contiguous slice of
  each global batch.
* ``gather_rows``: contrastive losses (``losses.py``) gather the batch's features from every
  rank *with gradient*, so the negatives are the global batch; each rank scores its own rows
  against all of them and the loss is normalised by the global row count (DDP then averages
  gradients over ranks, which gives the gradient of the global mean).
* ``sync_batchnorm``: batch-norm statistics over the global batch (``torch.nn.SyncBatchNorm``
  on CUDA; on CPU, where that class refuses to run, ``GlobalBatchNorm`` below).
* Dropout and other random ops draw different numbers on different ranks (seed + rank), so
  runs that use them agree with one process in distribution, not bit for bit.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, RandomSampler, Sampler

from ..errors import CIRError, ConfigError
from ..gather import (  # noqa: F401  (re-exported: the trainer's API)
    _AllReduceSum, _comm_device, gather_rows, gathering, global_batch, global_labels_and_norm, row_counts)

T = TypeVar("T")
DEFAULT_TIMEOUT_MIN = 60.0


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, the world size and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer "
                          "(set by torchrun; launch with `torchrun ... -m composed_retrieval ...`)") from None


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the torchrun environment; (0, 1, 0) without it."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    return rank, world, local


def _resolve(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def setup(device: str = "auto", timeout_minutes: float | None = None) -> DistInfo:
    """Join the process group described by the torchrun environment.

    A CUDA device (``auto`` with a GPU, ``cuda`` or ``cuda:K``) becomes ``cuda:LOCAL_RANK``
    with NCCL: one process per GPU. Otherwise gloo on the CPU. Idempotent.
    ``timeout_minutes`` bounds how long a rank waits at a barrier (rank 0 evaluating, the
    slowest index shard); default 60, or ``CIR_DIST_TIMEOUT_MIN``.
    """
    rank, world, local = env_world()
    wanted = _resolve(device)
    if world == 1:
        return DistInfo(device=wanted)
    if wanted.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device} asks for CUDA, but no GPU is visible to rank {rank}")
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local} has no GPU ({torch.cuda.device_count()} visible); "
                              "use --nproc_per_node <= the number of GPUs")
        torch.cuda.set_device(local)
        wanted, backend = torch.device("cuda", local), "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        minutes = timeout_minutes if timeout_minutes is not None else float(
            os.environ.get("CIR_DIST_TIMEOUT_MIN", DEFAULT_TIMEOUT_MIN))
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(minutes=minutes)}
        if backend == "nccl":
            kwargs["device_id"] = wanted
        dist.init_process_group(**kwargs)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, device=wanted)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def current() -> DistInfo:
    """The process group already joined (or the single-process default)."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = _env_int("LOCAL_RANK", rank)
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        return DistInfo(rank, world, local, device)
    return DistInfo()


def is_main_process() -> bool:
    return current().is_main


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def run_on_main(fn: Callable[[], T], share: Callable[[T], Any] = lambda result: None) -> tuple[T | None, Any]:
    """Run ``fn`` on rank 0 only and tell every rank how it went.

    Returns ``(result, share(result))`` on rank 0 and ``(None, share(result))`` elsewhere. An
    error on rank 0 is raised on every rank (a user error keeps its one-line message), so no
    rank is left waiting for a rank that already gave up.
    """
    info = current()
    if not info.active:
        result = fn()
        return result, share(result)
    payload: list[Any] = [None]
    result = None
    if info.is_main:
        try:
            result = fn()
            payload = [("ok", share(result))]
        except CIRError as exc:
            payload = [("user", str(exc))]
            dist.broadcast_object_list(payload, src=0, device=_comm_device())
            raise
        except Exception as exc:
            payload = [("crash", f"{type(exc).__name__}: {exc}")]
            dist.broadcast_object_list(payload, src=0, device=_comm_device())
            raise
    dist.broadcast_object_list(payload, src=0, device=_comm_device())
    status, value = payload[0]
    if status == "user":
        raise CIRError(value)
    if status == "crash":
        raise RuntimeError(f"rank 0 failed: {value}")
    return result, value


def average(values: dict[str, float], keep: tuple[str, ...] = ("steps",)) -> dict[str, float]:
    """Mean over ranks of per-rank logged numbers (the losses are normalised so that this mean
    is the global batch's loss); keys in ``keep`` are the same on every rank."""
    info = current()
    if not info.active:
        return values
    keys = sorted(k for k in values if k not in keep)
    # a key that only some ranks logged (e.g. a term with no rows there) counts as 0 there
    names: list[Any] = [None] * info.world_size
    dist.all_gather_object(names, keys)
    union = sorted(set().union(*names))
    t = torch.tensor([float(values.get(k, 0.0)) for k in union], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    t /= info.world_size
    return {**{k: values[k] for k in keep if k in values},
            **{k: round(float(v), 6) for k, v in zip(union, t.tolist())}}


# ---- the global batch --------------------------------------------------------------------
class RankSliceBatchSampler(Sampler[list[int]]):
    """This rank's part of each global batch, in the order one process would see them.

    Wraps the very sampler a ``DataLoader(shuffle=True, generator=gen, batch_size=B,
    drop_last=...)`` builds; pass the same ``gen`` to the DataLoader too, since it draws one
    number from it before the permutation, and the sequence must match.
    """

    def __init__(self, length: int, batch_size: int, drop_last: bool, generator: torch.Generator,
                 rank: int, world_size: int) -> None:
        if batch_size < world_size:
            raise ConfigError(f"batch_size {batch_size} (the global batch) is smaller than the "
                              f"{world_size} processes; each needs at least one item per step")
        self.batches = BatchSampler(RandomSampler(range(length), generator=generator), batch_size, drop_last)
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            lo, hi = shard_bounds(len(batch), self.rank, self.world_size)
            yield batch[lo:hi]


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous near-equal split of ``n`` items: sizes differ by at most one."""
    return rank * n // world_size, (rank + 1) * n // world_size


# ---- batch norm over the global batch ----------------------------------------------------
class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics cover every rank's rows (the CPU/gloo counterpart
    of ``torch.nn.SyncBatchNorm``). Same parameters and buffers as BatchNorm, so checkpoints
    are interchangeable; in eval mode, or outside ``global_batch``, it is plain batch norm."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and gathering()):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        c = x.shape[1]
        shape = [1, c] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() / c], dtype=x.dtype, device=x.device)
        stats = _AllReduceSum.apply(torch.cat([x.sum(dims), count]))
        n = stats[-1]
        mean = stats[:c] / n
        # two passes (mean, then squared deviations), as accurate as the local batch norm
        var = _AllReduceSum.apply(((x - mean.view(shape)) ** 2).sum(dims)) / n
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)  # type: ignore[union-attr, operator]
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var.detach() * n / (n - 1).clamp_min(1)
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * unbiased)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Batch-norm layers switched to global-batch statistics (in place where possible)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_cpu(module)


def _convert_cpu(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        tensors = list(module.state_dict().values())
        if tensors:
            new = new.to(tensors[0].device)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        for p_new, p_old in zip(new.parameters(), module.parameters()):
            p_new.requires_grad_(p_old.requires_grad)
        return new
    for name, child in module.named_children():
        converted = _convert_cpu(child)
        if converted is not child:
            setattr(module, name, converted)
    return module


def wrap(method: nn.Module, info: DistInfo, find_unused_parameters: bool = True) -> nn.Module:
    """DistributedDataParallel around ``method`` for one stage (what trains changes between
    stages, and DDP fixes its parameter set when it is built), or ``method`` itself alone."""
    if not info.active:
        return method
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(method, device_ids=ids, output_device=ids[0] if ids else None,
               find_unused_parameters=find_unused_parameters)


def seed_offset(info: DistInfo) -> int:
    """Added to the per-epoch seed: rank 0 draws what one process would, the others differ so
    that their dropout masks are not copies of rank 0's."""
    return info.rank if info.active else 0


__all__ = [
    "DistInfo", "setup", "shutdown", "current", "is_main_process", "barrier", "run_on_main",
    "average", "RankSliceBatchSampler", "shard_bounds", "global_batch", "gathering", "gather_rows",
    "global_labels_and_norm", "GlobalBatchNorm", "sync_batchnorm", "wrap", "seed_offset",
]
