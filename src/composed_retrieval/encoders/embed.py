"""THE gallery/text embedding functions: the cache, evaluation and the index all call these, so
batching, workers, precision and error handling are decided in one place.

Data path for the standard preprocessing (``Preprocess``): workers read each file and decode it
to a uint8 tensor (simplejpeg / torchvision for plain JPEG and PNG, Pillow for everything else:
data/fast_images.py), pad/resize/crop it as a tensor (``Preprocess.tensor``), and batches are
normalised on the target device. On CUDA, batches are pinned and copied on a side stream while
the previous batch computes, and plain JPEGs are decoded on the GPU (nvJPEG through
``torchvision.io.decode_jpeg``), so the CPU only reads files. ``decoder="pillow"`` keeps the
Pillow decode + PIL resize of every image (the reference the fast path is tested against).
"""
from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data import fast_images
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
    On CPU the forward already uses every core, so images are decoded in this process between
    forwards, by a thread per core (``_in_process``): embed_speed.py measured that against one
    low-priority worker process beside the forward (``--compare-workers 1``)."""
    cpus = available_cpus()
    if device.type == "cuda":
        return max(0, min(16, cpus - 1))
    return 0


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
    """Worker half of a Preprocess, Pillow decoder: pad/resize/crop to a uint8 ``[3, H, W]``.

    Normalising to float happens after batching, on the target device (``Preprocess.normalise``):
    a worker does less per image, and 4x fewer bytes go through shared and pinned memory.
    """

    def __init__(self, preprocess: Preprocess) -> None:
        self.preprocess = preprocess

    def __call__(self, image) -> torch.Tensor:  # noqa: ANN001 (PIL image)
        arr = np.asarray(self.preprocess.pil(image), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)


class _FastPixels:
    """Worker half of a Preprocess, fast decoder: file -> uint8 ``[3, S, S]`` as tensors; with
    ``gpu_jpeg`` a plain JPEG is passed on as its file bytes for the GPU to decode."""

    def __init__(self, preprocess: Preprocess, gpu_jpeg: bool = False) -> None:
        self.preprocess = preprocess
        self.gpu_jpeg = gpu_jpeg

    def __call__(self, path: Path) -> dict:
        data = fast_images.read_bytes(path)
        if self.gpu_jpeg and fast_images.is_jpeg(data):
            ok, orientation = fast_images.jpeg_plain(data, fast_images.MAX_IMAGE_PIXELS)
            if ok:
                return {"jpeg": torch.frombuffer(bytearray(data), dtype=torch.uint8), "orientation": orientation}
        return {"image": self.preprocess.tensor(fast_images.decode_file(path, data=data))}


class _FileDataset(torch.utils.data.Dataset):
    """Images by name for a decoder that reads the file itself; errors are captured per item
    (as ``ImageDataset(skip_bad=True)`` does) so that a worker's failure arrives as one line."""

    def __init__(self, names: Sequence[str], path_of: Callable[[str], Path], decode: _FastPixels) -> None:
        self.names, self.path_of, self.decode = list(names), path_of, decode

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> dict:
        name = self.names[i]
        try:
            return {"name": name, "index": i, "error": None, **self.decode(self.path_of(name))}
        except DataError as exc:
            return {"name": name, "index": i, "error": str(exc)}


def _collate_fast(items: list[dict]) -> dict:
    """Pixels stacked, GPU-bound JPEG bytes listed, both with their places in the batch."""
    good = [it for it in items if it["error"] is None]
    pix = [k for k, it in enumerate(good) if "image" in it]
    jpg = [k for k, it in enumerate(good) if "jpeg" in it]
    return {"image": torch.stack([good[k]["image"] for k in pix]) if pix else torch.empty(0, dtype=torch.uint8),
            "pix_pos": pix, "jpeg": [good[k]["jpeg"] for k in jpg], "jpeg_pos": jpg,
            "orientation": [good[k]["orientation"] for k in jpg],
            "name": [it["name"] for it in good], "index": torch.tensor([it["index"] for it in good], dtype=torch.long),
            "errors": [(it["name"], it["error"]) for it in items if it["error"] is not None]}


def _gpu_jpegs(chunk: dict, preprocess: Preprocess, device: torch.device) -> torch.Tensor:
    """Decode a chunk's JPEG bytes on the GPU and preprocess them there; a decoder failure
    (nvJPEG refusing a file) decodes that chunk on the CPU instead."""
    import warnings
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_jpeg
            images = decode_jpeg(chunk["jpeg"], mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        import simplejpeg
        images = [torch.from_numpy(simplejpeg.decode_jpeg(data.numpy().tobytes(), colorspace="RGB"))
                  .permute(2, 0, 1).to(device) for data in chunk["jpeg"]]
    return torch.stack([preprocess.tensor(fast_images.orient(im, o)) for im, o in zip(images, chunk["orientation"])])


def _assemble(chunk: dict, preprocess: Preprocess | None, device: torch.device) -> torch.Tensor:
    """The chunk's uint8 batch on the device, in name order."""
    pixels = chunk["image"]
    if not chunk.get("jpeg"):
        return pixels.to(device, non_blocking=True)
    out = torch.empty((len(chunk["name"]), 3, preprocess.size, preprocess.size), dtype=torch.uint8, device=device)  # type: ignore[union-attr]
    if chunk["pix_pos"]:
        out[torch.tensor(chunk["pix_pos"], device=device)] = pixels.to(device, non_blocking=True)
    out[torch.tensor(chunk["jpeg_pos"], device=device)] = _gpu_jpegs(chunk, preprocess, device)  # type: ignore[arg-type]
    return out


def _on_device(loader: Iterator[dict], preprocess: Preprocess | None, device: torch.device) -> Iterator[tuple[dict, torch.Tensor]]:
    """(chunk, its uint8 pixels on the device). On CUDA the next chunk is copied (and its JPEGs
    decoded) on a side stream while the caller computes on the current one."""
    if device.type != "cuda":
        for chunk in loader:
            yield chunk, _assemble(chunk, preprocess, device)
        return
    side = torch.cuda.Stream(device)
    main = torch.cuda.current_stream(device)

    def start(chunk: dict) -> tuple[dict, torch.Tensor, torch.cuda.Event]:
        side.wait_stream(main)   # memory freed by earlier compute may be reused here
        with torch.cuda.stream(side):
            pixels = _assemble(chunk, preprocess, device)
            ready = torch.cuda.Event()
            ready.record(side)
        return chunk, pixels, ready

    pending = None
    for chunk in loader:
        nxt = start(chunk)
        if pending is not None:
            yield _finish_copy(pending, main)
        pending = nxt
    if pending is not None:
        yield _finish_copy(pending, main)


def _finish_copy(pending: tuple, main: "torch.cuda.Stream") -> tuple[dict, torch.Tensor]:
    chunk, pixels, ready = pending
    main.wait_event(ready)
    pixels.record_stream(main)
    return chunk, pixels


def _split_transform(transform: Callable, device: torch.device, decoder: str) -> tuple[Callable, Callable, bool]:
    """(worker transform, batch finish on the device, whether the worker reads files itself)."""
    if type(transform) is Preprocess:  # exact type: a subclass may change __call__
        if decoder == "fast":
            gpu_jpeg = device.type == "cuda" and torch.cuda.is_available()
            return _FastPixels(transform, gpu_jpeg), transform.normaliser(device), True
        return _Uint8Pixels(transform), transform.normaliser(device), False
    return transform, lambda batch: batch, False


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
                 out_dtype: torch.dtype = torch.float32, decoder: str = "fast"
                 ) -> tuple[Features, list[str], list[tuple[str, str]]]:
    """Embed images by name, in order. Returns (features on CPU, names kept, [(name, error)]).

    Unreadable images stop the run with a one-line DataError, or with ``skip_bad=True`` are
    left out and listed in the errors (never silently dropped). ``tokens=False`` keeps memory
    small for large galleries (``Features.tokens`` is then ``[N, 0, d_tok]``); ``out_dtype``
    (e.g. float16) halves what is kept in memory. ``decoder``: "fast" (module docstring) or
    "pillow".
    """
    if decoder not in ("fast", "pillow"):
        raise ValueError(f"decoder must be 'fast' or 'pillow', got {decoder!r}")
    device = torch.device(device) if device is not None else encoder.device
    if device != encoder.device:
        encoder.to(device)
    transform = transform if transform is not None else encoder.image_transform("targetpad")
    workers = default_num_workers(device) if num_workers is None else int(num_workers)
    errors: list[tuple[str, str]] = []
    # The dataset always captures errors so that a worker's failure reaches this process as
    # its one-line message, not as DataLoader's re-raised multi-line traceback text.
    worker_transform, finish, reads_files = _split_transform(transform, device, decoder)
    dataset = _FileDataset(names, path_of, worker_transform) if reads_files else \
        ImageDataset(names, path_of, worker_transform, skip_bad=True)
    collate = _collate_fast if reads_files else collate_images
    if workers == 0:
        # threads only through the toolkit's own transforms: a user's callable may keep state
        loader: Iterable[dict] = _in_process(dataset, batch_size, collate,
                                             None if type(transform) is Preprocess else 1)
    else:
        loader = DataLoader(dataset, batch_size=worker_chunk(batch_size, workers), shuffle=False,
                            num_workers=workers, collate_fn=collate, pin_memory=device.type == "cuda",
                            prefetch_factor=4, worker_init_fn=_background_worker if device.type == "cpu" else None)
    out = _Gather(len(dataset), tokens, out_dtype)
    pending: list[torch.Tensor] = []
    pending_names: list[str] = []

    def run(pixels: torch.Tensor, batch_names: list[str]) -> None:
        out.add(encoder.encode_image(finish(pixels)), batch_names)

    with _eval_mode(encoder), torch.inference_mode(), _autocast(device), \
            tqdm(total=len(dataset), disable=not progress, desc="embedding images", unit="img",
                 dynamic_ncols=True) as bar:
        for chunk, pixels in _on_device(loader, transform if reads_files else None, device):
            if chunk["errors"]:
                if not skip_bad:
                    raise DataError(chunk["errors"][0][1])
                errors.extend(chunk["errors"])
            if chunk["name"]:
                pending.append(pixels)
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


def _in_process(dataset: torch.utils.data.Dataset, batch_size: int, collate: Callable[[list], dict],
                threads: int | None = None) -> Iterator[dict]:
    """Batches decoded in this process, one batch at a time between forwards, by a thread per
    core (file reads, libjpeg-turbo / zlib and torch's resize run without the GIL). On CPU the
    forward already uses every core: decoding beside it in a worker process preempts its
    threads, while decoding between forwards costs only the decode itself, spread over the cores."""
    n = len(dataset)  # type: ignore[arg-type]
    threads = available_cpus() if threads is None else threads
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode") if threads > 1 and n > 1 else None
    try:
        for start in range(0, n, batch_size):
            ids = range(start, min(n, start + batch_size))
            items = list(pool.map(dataset.__getitem__, ids)) if pool is not None else [dataset[i] for i in ids]
            yield collate(items)
    finally:
        if pool is not None:
            pool.shutdown(wait=True)


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
