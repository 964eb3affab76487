"""CLIP4Cir's image preprocessing: targetpad / squarepad, resize, centre crop, CLIP mean/std.

A pretrained model folder brings its own resize rule, interpolation and mean/std (open_clip's
``preprocess_cfg``, a Hugging Face ``preprocessor_config.json``); the CIR padding kind is applied
first either way. Resize modes follow open_clip's names: ``shortest`` (short side to ``size``,
then centre crop: CLIP's default), ``squash`` (both sides to ``size``, e.g. SigLIP) and
``longest`` (long side to ``size``, then pad to a square).
"""
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
RESIZE_MODES = ("shortest", "squash", "longest")
INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}


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


def longest_size(w: int, h: int, size: int) -> tuple[int, int]:
    """(height, width) of a w x h image resized so its longest side is ``size`` ("longest" mode)."""
    scale = size / max(w, h)
    return max(1, round(h * scale)), max(1, round(w * scale))


def centre_pad_amounts(w: int, h: int, size: int) -> list[int]:
    """[left, top, right, bottom] padding that centres a w x h image on a size x size canvas."""
    left, top = (size - w) // 2, (size - h) // 2
    return [left, top, size - w - left, size - h - top]


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
                 mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD,
                 resize_mode: str = "shortest", interpolation: str = "bicubic") -> None:
        if kind not in PREPROCESS_KINDS:
            raise ConfigError(f"unknown preprocessing {kind!r}; expected one of {', '.join(PREPROCESS_KINDS)}")
        if resize_mode not in RESIZE_MODES:
            raise ConfigError(f"unknown resize mode {resize_mode!r}; expected one of {', '.join(RESIZE_MODES)}")
        if interpolation not in INTERPOLATIONS:
            raise ConfigError(f"unknown interpolation {interpolation!r}; expected one of {', '.join(INTERPOLATIONS)}")
        self.kind, self.size, self.target_ratio = kind, int(size), float(target_ratio)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(x) for x in std)
        self.resize_mode, self.interpolation = resize_mode, interpolation

    def pil(self, image: Image.Image) -> Image.Image:
        """Padding, resize and crop only: the PIL image the model sees (also for thumbnails)."""
        if self.kind == "targetpad":
            image = target_pad(image, self.target_ratio)
        elif self.kind == "squarepad":
            image = square_pad(image)
        mode = INTERPOLATIONS[self.interpolation]
        if self.resize_mode == "squash":
            return TF.resize(image, [self.size, self.size], interpolation=mode).convert("RGB")
        if self.resize_mode == "longest":
            image = TF.resize(image, list(longest_size(*image.size, self.size)), interpolation=mode)
            image = TF.pad(image, centre_pad_amounts(*image.size, self.size), fill=0)
            return image.convert("RGB")
        image = TF.resize(image, self.size, interpolation=mode)
        image = TF.center_crop(image, [self.size, self.size])
        return image.convert("RGB")

    def tensor(self, pixels: torch.Tensor) -> torch.Tensor:
        """:meth:`pil` on a uint8 ``[3, H, W]`` tensor (CPU or CUDA): the same padding, resize mode
        and crop, and torchvision's antialiased resize with the same filter, which follows
        Pillow's; Pillow rounds to 8 bits between its two passes, so a few pixels near hard edges
        differ by up to 3 grey levels, nearly all by at most 1 (tests/test_fast_decode.py)."""
        from torchvision.transforms.v2 import functional as F2

        h, w = int(pixels.shape[-2]), int(pixels.shape[-1])
        hp = vp = 0
        if self.kind == "targetpad":
            hp, vp = target_pad_amounts(w, h, self.target_ratio)
        elif self.kind == "squarepad":
            hp, vp = square_pad_amounts(w, h)
        if hp or vp:
            pixels = F2.pad(pixels, [hp, vp, hp, vp], fill=0, padding_mode="constant")
        mode = INTERPOLATIONS[self.interpolation]
        if self.resize_mode == "squash":
            return F2.resize(pixels, [self.size, self.size], interpolation=mode, antialias=True)
        if self.resize_mode == "longest":
            size = longest_size(int(pixels.shape[-1]), int(pixels.shape[-2]), self.size)
            pixels = F2.resize(pixels, list(size), interpolation=mode, antialias=True)
            return F2.pad(pixels, centre_pad_amounts(int(pixels.shape[-1]), int(pixels.shape[-2]), self.size), fill=0)
        pixels = F2.resize(pixels, [self.size], interpolation=mode, antialias=True)
        return F2.center_crop(pixels, [self.size, self.size])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return TF.normalize(TF.to_tensor(self.pil(image)), self.mean, self.std)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, 3, S, S]`` -> the float tensor ``__call__`` gives each image: the same
        arithmetic as to_tensor + normalize, once per batch. Batches travel as uint8 (4x fewer
        bytes through workers, shared and pinned memory) and become floats where the model runs;
        a loop over batches takes :meth:`normaliser` once instead."""
        return self.normaliser(pixels.device)(pixels)

    def normaliser(self, device: torch.device | str) -> "Normalise":
        """:meth:`normalise` with mean and std already on ``device`` (on CUDA, building them
        per batch is a blocking copy that waits for the work queued before it)."""
        return Normalise(self.mean, self.std, device)

    def key(self) -> str:
        """A string that identifies this preprocessing in cache keys."""
        base = f"{self.kind}-{self.size}-{self.target_ratio:g}"
        if (self.resize_mode, self.interpolation, self.mean, self.std) == ("shortest", "bicubic", CLIP_MEAN, CLIP_STD):
            return base   # the key every cache written before model-specific preprocessing used
        stats = ",".join(f"{v:g}" for v in (*self.mean, *self.std))
        key = f"{base}-{self.resize_mode}-{self.interpolation}-{stats}"
        # before this suffix the fast gallery path resized every image "shortest" + bicubic, so
        # features cached under the old key for another mode or filter are not reused
        return key if (self.resize_mode, self.interpolation) == ("shortest", "bicubic") else key + "-t2"

    def __repr__(self) -> str:
        return f"Preprocess({self.key()})"


def make_preprocess(kind: str, size: int, target_ratio: float = 1.25) -> Callable[[Image.Image], torch.Tensor]:
    return Preprocess(kind, size, target_ratio)


class Normalise:
    """uint8 batch -> normalised float32 batch with mean/std kept on one device."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device | str) -> None:
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.to(torch.float32).div_(255).sub_(self.mean).div_(self.std)
