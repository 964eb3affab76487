"""THE gallery/text embedding functions: the cache, evaluation and the index all call these, so
batching, workers, precision and error handling are decided in one place."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.images import ImageDataset, collate_images
from ..data.preprocess import Preprocess
from ..errors import DataError
from .base import EncoderPair, Features


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_num_workers(device: torch.device) -> int:
    """Decoding workers. On CUDA the GPU outruns image decoding: use every spare core (up to 16).
    On CPU the forward already uses every core, so one low-priority decoder (see
    ``_background_worker``) fills the gaps, and only when there are >= 2 cores."""
    cpus = available_cpus()
    if device.type == "cuda":
        return max(0, min(16, cpus - 1))
    return 1 if cpus >= 2 else 0


def _background_worker(_worker_id: int) -> None:
    """On CPU, decoding competes with the model's own threads; a preempted thread stalls the
    whole parallel region at its next barrier. At the lowest priority the decoder runs in the
    forward's idle moments, and at full speed whenever the forward waits for its next batch."""
    try:
        os.nice(19)
    except OSError:
        pass


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


class _Uint8Pixels:
    """Worker half of a Preprocess: pad/resize/crop to a uint8 ``[3, H, W]`` tensor.

    Normalising to float happens after batching, on the target device (see ``_Normalise``):
    a worker does less per image, and 4x fewer bytes go through shared and pinned memory.
    """

    def __init__(self, preprocess: Preprocess) -> None:
        self.preprocess = preprocess

    def __call__(self, image) -> torch.Tensor:  # noqa: ANN001 (PIL image)
        arr = np.asarray(self.preprocess.pil(image), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)


class _Normalise:
    """Batch half of a Preprocess; the same arithmetic as to_tensor + normalize, batched."""

    def __init__(self, preprocess: Preprocess, device: torch.device) -> None:
        self.mean = torch.tensor(preprocess.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(preprocess.std, device=device).view(1, -1, 1, 1)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.to(torch.float32).div_(255).sub_(self.mean).div_(self.std)


def _split_transform(transform: Callable, device: torch.device) -> tuple[Callable, Callable]:
    if type(transform) is Preprocess:  # exact type: a subclass may change __call__
        return _Uint8Pixels(transform), _Normalise(transform, device)
    return transform, lambda batch: batch


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
    errors: list[tuple[str, str]] = []
    # The dataset always captures errors so that a worker's failure reaches this process as
    # its one-line message, not as DataLoader's re-raised multi-line traceback text.
    worker_transform, finish = _split_transform(transform, device)
    dataset = ImageDataset(names, path_of, worker_transform, skip_bad=True)
    loader = DataLoader(dataset, batch_size=worker_chunk(batch_size, workers), shuffle=False,
                        num_workers=workers, collate_fn=collate_images,
                        pin_memory=device.type == "cuda", prefetch_factor=4 if workers > 0 else None,
                        worker_init_fn=_background_worker if device.type == "cpu" and workers > 0 else None)
    out = _Gather(len(dataset), tokens, out_dtype)
    pending: list[torch.Tensor] = []
    pending_names: list[str] = []

    def run(pixels: torch.Tensor, batch_names: list[str]) -> None:
        out.add(encoder.encode_image(finish(pixels)), batch_names)

    with _eval_mode(encoder), torch.inference_mode(), _autocast(device), \
            tqdm(total=len(dataset), disable=not progress, desc="embedding images", unit="img",
                 dynamic_ncols=True) as bar:
        for chunk in loader:
            if chunk["errors"]:
                if not skip_bad:
                    raise DataError(chunk["errors"][0][1])
                errors.extend(chunk["errors"])
            if chunk["image"].numel():
                pending.append(chunk["image"].to(device, non_blocking=True))
                pending_names.extend(chunk["name"])
            while len(pending_names) >= batch_size:  # full model batches from worker chunks
                pixels = torch.cat(pending) if len(pending) > 1 else pending[0]
                run(pixels[:batch_size], pending_names[:batch_size])
                rest = pixels[batch_size:]
                pending, pending_names = ([rest] if len(rest) else []), pending_names[batch_size:]
            bar.update(len(chunk["name"]) + len(chunk["errors"]))
        if pending_names:
            run(torch.cat(pending), pending_names)
    return out.result(encoder), out.names, errors


def worker_chunk(batch_size: int, workers: int) -> int:
    """Images per worker task. A worker builds a whole DataLoader batch alone, so with model-sized
    batches the first batch takes batch_size decodes and few workers have work on a small
    gallery; chunks of ~batch_size/workers keep every worker busy and are joined on the device."""
    if workers <= 1:
        return batch_size
    return max(1, min(batch_size, -(-batch_size // workers)))


class _Gather:
    """Outputs in name order, filled in place (no list of parts + concatenation = half the peak
    memory for a large gallery)."""

    def __init__(self, n: int, tokens: bool, dtype: torch.dtype) -> None:
        self.n, self.tokens, self.dtype = n, tokens, dtype
        self.pooled: torch.Tensor | None = None
        self.token_rows: torch.Tensor | None = None
        self.names: list[str] = []

    def add(self, feats: Features, names: list[str]) -> None:
        if self.pooled is None:  # sizes are known after the first batch
            self.pooled = torch.empty(self.n, feats.pooled.shape[1], dtype=self.dtype)
            tok_len = feats.tokens.shape[1] if self.tokens else 0
            self.token_rows = torch.empty(self.n, tok_len, feats.tokens.shape[2], dtype=self.dtype)
        start, stop = len(self.names), len(self.names) + len(names)
        self.pooled[start:stop] = feats.pooled.to("cpu", self.dtype)
        if self.tokens:
            self.token_rows[start:stop] = feats.tokens.to("cpu", self.dtype)  # type: ignore[index]
        self.names.extend(names)

    def result(self, encoder: EncoderPair) -> Features:
        if self.pooled is None or self.token_rows is None:
            return Features(torch.empty(0, encoder.embed_dim, dtype=self.dtype),
                            torch.empty(0, 0, encoder.image_token_dim, dtype=self.dtype), None)
        k = len(self.names)
        return Features(self.pooled[:k], self.token_rows[:k], None)


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
