"""Image inputs as tensors by name: decoded once into memory when the split is small enough.

The training loop, evaluation and pair training read pixels through :class:`PixelSource`; a
frozen image tower reads features from the cache instead (``cache.py``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader
from torchvision.transforms import functional as TF
from tqdm import tqdm

from .images import ImageDataset, collate_images
from .preprocess import Preprocess


class PixelSource:
    """name -> preprocessed image tensor. Small splits are decoded once and kept as uint8
    (4x less memory than floats) and normalised per item; large ones decode from disk."""

    def __init__(self, names: Sequence[str], path_of: Callable[[str], Path], transform: Preprocess,
                 preload_max_mb: float = 2048, num_workers: int = 0, progress: bool = True) -> None:
        self.path_of = path_of
        self.transform = transform
        self.index: dict[str, int] = {}
        self.pixels: torch.Tensor | None = None
        size = transform.size
        need_mb = len(names) * 3 * size * size / 2**20
        if need_mb <= preload_max_mb:
            self._preload(list(dict.fromkeys(names)), num_workers, progress)

    def _preload(self, names: list[str], num_workers: int, progress: bool) -> None:
        size = self.transform.size
        self.pixels = torch.empty((len(names), 3, size, size), dtype=torch.uint8)
        ds = ImageDataset(names, self.path_of, _ToUint8(self.transform))
        loader = DataLoader(ds, batch_size=128, num_workers=num_workers, collate_fn=collate_images)
        for batch in tqdm(loader, desc="decode images", disable=not progress, leave=False):
            self.pixels[batch["index"]] = batch["image"]
        self.index = {n: i for i, n in enumerate(names)}

    def __call__(self, name: str) -> torch.Tensor:
        """The normalised float ``[3, S, S]`` the transform gives this image."""
        return self.transform.normalise(self.uint8(name)[None])[0]

    def uint8(self, name: str) -> torch.Tensor:
        """The image as uint8 ``[3, S, S]``, before normalisation: the training loop batches
        these and normalises each batch on its device (``Preprocess.normalise``)."""
        if self.pixels is not None and name in self.index:
            return self.pixels[self.index[name]]
        from .images import load_image
        return _ToUint8(self.transform)(load_image(self.path_of(name)))


class _ToUint8:
    """Picklable: PIL -> padded/resized/cropped uint8 tensor (normalisation happens later)."""

    def __init__(self, transform: Preprocess) -> None:
        self.transform = transform

    def __call__(self, image):  # type: ignore[no-untyped-def]
        return TF.pil_to_tensor(self.transform.pil(image))
