"""Image files: find them (extension detected, never assumed), open them safely, batch them."""
from __future__ import annotations

import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, ContextManager, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: refuse images larger than this many pixels (decompression bombs); configurable per call
MAX_IMAGE_PIXELS = 64_000_000


def find_image(folder: Path, stem: str) -> Path | None:
    """The file ``folder/stem.<ext>`` for the first known extension that exists, else None."""
    for ext in IMAGE_EXTENSIONS:
        p = folder / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


def detect_extension(folder: Path, stems: Sequence[str]) -> str | None:
    """The extension used in ``folder`` for these stems (checked on the first that exists)."""
    for stem in stems[:50]:
        p = find_image(folder, stem)
        if p is not None:
            return p.suffix
    return None


def decode_cost(im: Image.Image) -> int:
    """Bytes a decode of ``im`` (header read, not decoded) may hold at its peak: the decoded
    pixels plus one converted copy, at least 3 bytes a pixel (RGB)."""
    w, h = im.size
    per_pixel = max(3, len(im.getbands()) * (2 if im.mode.startswith("I;16") else 4 if im.mode in ("I", "F") else 1))
    return 2 * w * h * per_pixel


def load_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS, *, reduce_to: int | None = None,
               gate: Callable[[int], ContextManager] | None = None) -> Image.Image:
    """Open an image as RGB, or raise a one-line DataError naming the file and the problem.

    ``reduce_to``: a consumer that needs no more than this many pixels on the short side lets
    JPEG decode at 1/2, 1/4 or 1/8 scale (``draft``) and box-reduces any other format right after
    decoding, always keeping the short side >= ``reduce_to``. ``gate(cost)``: a context held
    around the decode with its :func:`decode_cost` (the service's memory budget).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("image file not found", path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise DataError(f"image is {w}x{h} pixels, above the limit of {max_pixels}", path)
                if reduce_to and im.format == "JPEG":
                    im.draft("RGB", (reduce_to, reduce_to))
                with gate(decode_cost(im)) if gate else nullcontext():
                    im.load()
                    factor = min(im.size) // reduce_to if reduce_to else 1
                    if factor < 2:
                        return _to_rgb(im)
                    if im.mode in ("RGB", "RGBA", "L", "LA"):  # reduce averages these correctly
                        return _to_rgb(im.reduce(factor))
                    return _to_rgb(im).reduce(factor)          # palette, 16-bit, CMYK: convert first
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"image is too large, refused as a possible decompression bomb ({exc})", path) from None
    except UnidentifiedImageError as exc:
        raise DataError(f"not a readable image ({type(exc).__name__})", path) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"corrupt or truncated image ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})", path) from None


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB for every mode: palette and alpha composited on black, 16-bit scaled, CMYK converted."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np
        arr = np.asarray(im, dtype=np.float32)
        top = 65535.0 if arr.max() > 255 else 255.0
        im = Image.fromarray((arr / top * 255.0).clip(0, 255).astype("uint8"), mode="L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA"):
        background = Image.new("RGB", im.size, (0, 0, 0))
        background.paste(im.convert("RGBA"), mask=im.convert("RGBA").split()[-1])
        return background
    return im.convert("RGB")


class ImageDataset(Dataset):
    """Images by name, for embedding a gallery or filling the feature cache.

    Returns dicts {"image": tensor, "name": str, "index": int}. With ``skip_bad=True`` an
    unreadable image yields ``image=None`` and its error text instead of stopping the run;
    ``collate_images`` drops those and reports them.
    """

    def __init__(self, names: Sequence[str], path_of: Callable[[str], Path],
                 transform: Callable[[Image.Image], torch.Tensor], skip_bad: bool = False) -> None:
        self.names = list(names)
        self.path_of = path_of
        self.transform = transform
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> dict:
        name = self.names[i]
        try:
            image = self.transform(load_image(self.path_of(name)))
            return {"image": image, "name": name, "index": i, "error": None}
        except DataError as exc:
            if not self.skip_bad:
                raise
            return {"image": None, "name": name, "index": i, "error": str(exc)}


def collate_images(items: list[dict]) -> dict:
    good = [it for it in items if it["image"] is not None]
    return {
        "image": torch.stack([it["image"] for it in good]) if good else torch.empty(0),
        "name": [it["name"] for it in good],
        "index": torch.tensor([it["index"] for it in good], dtype=torch.long),
        "errors": [(it["name"], it["error"]) for it in items if it["image"] is None],
    }
