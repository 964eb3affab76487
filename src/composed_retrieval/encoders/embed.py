"""THE gallery/text embedding functions: the cache, evaluation and the index all call these, so
batching, workers, precision and error handling are decided in one place."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.images import ImageDataset, collate_images
from ..errors import DataError
from .base import EncoderPair, Features


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_num_workers(device: torch.device) -> int:
    """Decoding workers. On CUDA the GPU is rarely the bottleneck: use every spare core (up to 8).
    On CPU the workers take cores from the forward pass itself, so keep one decoder running
    ahead of the model (its decode overlaps the forward) and only when there are >= 2 cores."""
    cpus = available_cpus()
    if device.type == "cuda":
        return max(0, min(8, cpus - 1))
    return 1 if cpus >= 2 else 0


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def embed_images(encoder: EncoderPair, names: Sequence[str], path_of: Callable[[str], Path],
                 transform: Callable | None = None, batch_size: int = 64,
                 num_workers: int | None = None, device: torch.device | str | None = None,
                 progress: bool = True, skip_bad: bool = False, *, tokens: bool = True,
                 out_dtype: torch.dtype = torch.float32
                 ) -> tuple[Features, list[str], list[tuple[str, str]]]:
    """Embed images by name, in order. Returns (features on CPU, names kept, [(name, error)]).

    Unreadable images stop the run with a one-line DataError, or with ``skip_bad=True`` are
    left out and listed in the errors (never silently dropped). ``tokens=False`` keeps memory
    small for large galleries (``Features.tokens`` is then ``[N, 0, d_tok]``); ``out_dtype``
    (e.g. float16) halves what is kept in memory.
    """
    device = torch.device(device) if device is not None else encoder.device
    if device != encoder.device:
        encoder.to(device)
    transform = transform if transform is not None else encoder.image_transform("targetpad")
    workers = default_num_workers(device) if num_workers is None else int(num_workers)
    # The dataset always captures errors so that a worker's failure reaches this process as
    # its one-line message, not as DataLoader's re-raised multi-line traceback text.
    dataset = ImageDataset(names, path_of, transform, skip_bad=True)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate_images, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if workers > 0 else None)
    n = len(dataset)
    pooled_out: torch.Tensor | None = None
    tokens_out: torch.Tensor | None = None
    kept: list[str] = []
    errors: list[tuple[str, str]] = []
    with _eval_mode(encoder), torch.inference_mode(), _autocast(device):
        for batch in tqdm(loader, total=len(loader), disable=not progress, desc="embedding images",
                          unit="batch", dynamic_ncols=True):
            if batch["errors"]:
                if not skip_bad:
                    raise DataError(batch["errors"][0][1])
                errors.extend(batch["errors"])
            if batch["image"].numel() == 0:
                continue
            feats = encoder.encode_image(batch["image"].to(device, non_blocking=True))
            if pooled_out is None:  # sizes are known after the first batch: fill in place
                pooled_out = torch.empty(n, feats.pooled.shape[1], dtype=out_dtype)
                tok_len = feats.tokens.shape[1] if tokens else 0
                tokens_out = torch.empty(n, tok_len, feats.tokens.shape[2], dtype=out_dtype)
            start, stop = len(kept), len(kept) + len(batch["name"])
            pooled_out[start:stop] = feats.pooled.to("cpu", out_dtype)
            if tokens:
                tokens_out[start:stop] = feats.tokens.to("cpu", out_dtype)
            kept.extend(batch["name"])
    if pooled_out is None:
        pooled_out = torch.empty(0, encoder.embed_dim, dtype=out_dtype)
        tokens_out = torch.empty(0, 0, encoder.image_token_dim, dtype=out_dtype)
    assert tokens_out is not None
    return Features(pooled_out[: len(kept)], tokens_out[: len(kept)], None), kept, errors


def embed_texts(encoder: EncoderPair, texts: Sequence[str], batch_size: int = 256,
                device: torch.device | str | None = None, progress: bool = False,
                slot_embeddings: torch.Tensor | None = None) -> Features:
    """Embed texts in order (eval mode, no grad); returns CPU float32 Features with the mask."""
    device = torch.device(device) if device is not None else encoder.device
    if device != encoder.device:
        encoder.to(device)
    texts = list(texts)
    parts: list[Features] = []
    with _eval_mode(encoder), torch.inference_mode(), _autocast(device):
        for start in tqdm(range(0, len(texts), batch_size), disable=not progress,
                          desc="embedding texts", unit="batch"):
            ids = encoder.tokenize(texts[start:start + batch_size]).to(device)
            slots = None if slot_embeddings is None else slot_embeddings[start:start + batch_size].to(device)
            f = encoder.encode_text(ids, slots)
            parts.append(Features(f.pooled.float().cpu(), f.tokens.float().cpu(),
                                  None if f.mask is None else f.mask.cpu()))
    if not parts:
        ids = encoder.tokenize([""])
        return Features(torch.empty(0, encoder.embed_dim), torch.empty(0, ids.shape[1], encoder.text_token_dim),
                        torch.empty(0, ids.shape[1], dtype=torch.bool))
    masks = [p.mask for p in parts]
    return Features(torch.cat([p.pooled for p in parts]), torch.cat([p.tokens for p in parts]),
                    None if any(m is None for m in masks) else torch.cat(masks))  # type: ignore[arg-type]
