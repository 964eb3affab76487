"""CLIP4Cir's image preprocessing: targetpad / squarepad, resize, centre crop, CLIP mean/std."""
from __future__ import annotations

from typing import Callable

import torch
from PIL import Image
from torchvision.transforms import functional as TF
from torchvision.transforms import InterpolationMode

from ..errors import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESS_KINDS = ("targetpad", "squarepad", "resize")


def target_pad_amounts(w: int, h: int, target_ratio: float = 1.25) -> tuple[int, int]:
    """(left/right, top/bottom) padding of :func:`target_pad` for a w x h image."""
    ratio = max(w, h) / min(w, h)
    if ratio < target_ratio:
        return 0, 0
    scaled = max(w, h) / target_ratio
    return max(int((scaled - w) / 2), 0), max(int((scaled - h) / 2), 0)


def square_pad_amounts(w: int, h: int) -> tuple[int, int]:
    side = max(w, h)
    return (side - w) // 2, (side - h) // 2


def target_pad(image: Image.Image, target_ratio: float = 1.25) -> Image.Image:
    """Pad the short side with black until long/short == target_ratio, only when the image is
    more elongated than that; a less elongated image is returned as it is."""
    hp, vp = target_pad_amounts(*image.size, target_ratio)
    if hp == vp == 0 and max(image.size) / min(image.size) < target_ratio:
        return image
    return TF.pad(image, [hp, vp, hp, vp], fill=0, padding_mode="constant")


def square_pad(image: Image.Image) -> Image.Image:
    """Pad the short side with black so the image becomes (nearly) square, centred."""
    hp, vp = square_pad_amounts(*image.size)
    return TF.pad(image, [hp, vp, hp, vp], fill=0, padding_mode="constant")


class Preprocess:
    """Picklable transform (DataLoader workers need that): PIL image -> normalised tensor."""

    def __init__(self, kind: str, size: int, target_ratio: float = 1.25,
                 mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD) -> None:
        if kind not in PREPROCESS_KINDS:
            raise ConfigError(f"unknown preprocessing {kind!r}; expected one of {', '.join(PREPROCESS_KINDS)}")
        self.kind, self.size, self.target_ratio = kind, int(size), float(target_ratio)
        self.mean, self.std = tuple(mean), tuple(std)

    def pil(self, image: Image.Image) -> Image.Image:
        """Padding, resize and crop only: the PIL image the model sees (also for thumbnails)."""
        if self.kind == "targetpad":
            image = target_pad(image, self.target_ratio)
        elif self.kind == "squarepad":
            image = square_pad(image)
        image = TF.resize(image, self.size, interpolation=InterpolationMode.BICUBIC)
        image = TF.center_crop(image, [self.size, self.size])
        return image.convert("RGB")

    def tensor(self, pixels: torch.Tensor) -> torch.Tensor:
        """:meth:`pil` on a uint8 ``[3, H, W]`` tensor (CPU or CUDA): the same padding and crop,
        and torchvision's antialiased bicubic resize, which follows Pillow's filter; Pillow
        rounds to 8 bits between its two passes, so a few pixels near hard edges differ by up
        to 3 grey levels, nearly all by at most 1 (tests/test_fast_decode.py)."""
        from torchvision.transforms.v2 import functional as F2

        h, w = int(pixels.shape[-2]), int(pixels.shape[-1])
        hp = vp = 0
        if self.kind == "targetpad":
            hp, vp = target_pad_amounts(w, h, self.target_ratio)
        elif self.kind == "squarepad":
            hp, vp = square_pad_amounts(w, h)
        if hp or vp:
            pixels = F2.pad(pixels, [hp, vp, hp, vp], fill=0, padding_mode="constant")
        pixels = F2.resize(pixels, [self.size], interpolation=InterpolationMode.BICUBIC, antialias=True)
        return F2.center_crop(pixels, [self.size, self.size])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return TF.normalize(TF.to_tensor(self.pil(image)), self.mean, self.std)

    def key(self) -> str:
        """A string that identifies this preprocessing in cache keys."""
        return f"{self.kind}-{self.size}-{self.target_ratio:g}"

    def __repr__(self) -> str:
        return f"Preprocess({self.key()})"


def make_preprocess(kind: str, size: int, target_ratio: float = 1.25) -> Callable[[Image.Image], torch.Tensor]:
    return Preprocess(kind, size, target_ratio)
