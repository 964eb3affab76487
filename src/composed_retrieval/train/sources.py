"""Where the training loop and evaluation get image inputs: pixels or encoded features.

Trainable image tower -> pixels (preloaded into memory when the split is small enough);
frozen image tower -> features from the on-disk cache, computed once per encoder weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader
from torchvision.transforms import functional as TF
from tqdm import tqdm

from ..data.images import ImageDataset, collate_images
from ..data.preprocess import Preprocess
from ..encoders.base import EncoderPair, Features


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
        if self.pixels is not None and name in self.index:
            x = self.pixels[self.index[name]].float().div_(255.0)
            return TF.normalize(x, self.transform.mean, self.transform.std)
        from ..data.images import load_image
        return self.transform(load_image(self.path_of(name)))


class _ToUint8:
    """Picklable: PIL -> padded/resized/cropped uint8 tensor (normalisation happens later)."""

    def __init__(self, transform: Preprocess) -> None:
        self.transform = transform

    def __call__(self, image):  # type: ignore[no-untyped-def]
        return TF.pil_to_tensor(self.transform.pil(image))


class FeatureTable:
    """Encoded images by name: ``lookup(name)`` for datasets, ``take(names)`` for batches."""

    def __init__(self, names: Sequence[str], features: Features) -> None:
        self.names = list(names)
        self.features = features
        self.index = {n: i for i, n in enumerate(self.names)}

    def rows(self, names: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self.index[n] for n in names], dtype=torch.long)

    def take(self, names: Sequence[str]) -> Features:
        return self.features.rows(self.rows(names))

    def lookup(self, name: str) -> Features:
        return self.features.rows(self.index[name])


@torch.no_grad()
def encode_with(encoder: EncoderPair, names: Sequence[str], pixels: Callable[[str], torch.Tensor],
                batch_size: int = 256, device: torch.device | str = "cpu", progress: bool = True,
                keep_tokens: bool = True) -> FeatureTable:
    """Encode images given by a pixel source with the encoder's current weights."""
    names = list(dict.fromkeys(names))
    pooled, tokens, masks, vision = [], [], [], []
    was_training = encoder.training
    encoder.eval()
    for start in tqdm(range(0, len(names), batch_size), desc="encode images", disable=not progress, leave=False):
        chunk = names[start:start + batch_size]
        x = torch.stack([pixels(n) for n in chunk]).to(device)
        f = encoder.encode_image(x)
        pooled.append(f.pooled.float().cpu())
        tokens.append(f.tokens.cpu() if keep_tokens else f.tokens[:, :0].cpu())
        if f.mask is not None:
            masks.append(f.mask.cpu())
        if f.vision is not None:   # a multimodal method's reference images (encoders/base.py)
            vision.append(f.vision.cpu())
    encoder.train(was_training)
    feats = Features(torch.cat(pooled), torch.cat(tokens), torch.cat(masks) if masks else None,
                     torch.cat(vision) if vision else None)
    return FeatureTable(names, feats)
