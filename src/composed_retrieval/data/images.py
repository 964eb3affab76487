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

#: file endings taken as images; the ones Pillow cannot decode here (.heic without a plugin)
#: are listed as skipped with the reason instead of being ignored silently
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff",
                    ".jfif", ".jpe", ".avif", ".heic", ".heif")
#: colour transparent pixels are composited on (white: a black logo on a transparent background
#: must stay visible); ``load_image(background=...)`` or this module attribute change it
ALPHA_BACKGROUND: tuple[int, int, int] = (255, 255, 255)
#: EXIF tag of the orientation (1 upright ... 8); phones store rotated pixels plus this tag
EXIF_ORIENTATION = 0x0112
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
               gate: Callable[[int], ContextManager] | None = None,
               background: tuple[int, int, int] | None = None) -> Image.Image:
    """Open an image as upright RGB (EXIF orientation applied, alpha composited on
    ``background``, default ``ALPHA_BACKGROUND``), or raise a one-line DataError naming the file
    and the problem.

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
                # Read before draft, which drops the tag (JPEG). PNG's and TIFF's are read after the
                # load, inside the gate: PNG's getexif decodes the whole image (the eXIf chunk may
                # follow the pixels; read outside, 8 concurrent 40 Mpx PNGs passed the budget
                # fourfold), and Pillow turns a TIFF upright itself and drops its tag on load (read
                # before, a TIFF was rotated twice).
                orientation = None if im.format in ("PNG", "TIFF") else exif_orientation(im)
                bg = ALPHA_BACKGROUND if background is None else tuple(background)
                if reduce_to and im.format == "JPEG":
                    im.draft("RGB", (reduce_to, reduce_to))
                with gate(decode_cost(im)) if gate else nullcontext():
                    im.load()
                    if orientation is None:
                        orientation = exif_orientation(im)
                    factor = min(im.size) // reduce_to if reduce_to else 1
                    if factor < 2:
                        return _orient(_to_rgb(im, bg), orientation)
                    if im.mode in ("RGB", "RGBA", "L", "LA"):  # reduce averages these correctly
                        return _orient(_to_rgb(im.reduce(factor), bg), orientation)
                    return _orient(_to_rgb(im, bg).reduce(factor), orientation)   # palette, 16-bit, CMYK: convert first
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"image is too large, refused as a possible decompression bomb ({exc})", path) from None
    except UnidentifiedImageError as exc:
        if path.suffix.lower() in (".heic", ".heif", ".avif"):
            raise DataError(f"not a readable image: this Pillow cannot decode {path.suffix} files "
                            f"(install a plugin such as pillow-heif, or convert them to JPEG/PNG)", path) from None
        raise DataError(f"not a readable image ({type(exc).__name__})", path) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"corrupt or truncated image ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})", path) from None


def upright_rgb(im: Image.Image, background: tuple[int, int, int] | None = None) -> Image.Image:
    """The one place decoded pixels become what the model sees: the EXIF orientation applied
    (a phone JPEG with Orientation=6 is stored sideways) and every mode made RGB, alpha on
    ``background`` (default ``ALPHA_BACKGROUND``). Decoders other than ``load_image`` (a fast
    JPEG path) call this, or ``orient_array`` on their array, so all paths agree."""
    return _orient(_to_rgb(im, ALPHA_BACKGROUND if background is None else tuple(background)),
                   exif_orientation(im))


def _orient(rgb: Image.Image, orientation: int) -> Image.Image:
    return rgb.transpose(_TRANSPOSE[orientation]) if orientation in _TRANSPOSE else rgb


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation tag of an opened image (1 when absent or unreadable)."""
    try:
        value = im.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a damaged EXIF block must not make a readable image unreadable
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def jpeg_orientation(data: bytes) -> int:
    """The EXIF orientation of JPEG bytes, reading only the header (for decoders that turn
    the bytes into an array themselves, e.g. simplejpeg)."""
    import io
    try:
        with Image.open(io.BytesIO(data)) as im:
            return exif_orientation(im)
    except Exception:
        return 1


def orient_array(arr: "np.ndarray", orientation: int) -> "np.ndarray":
    """An H x W (x C) array turned upright for an EXIF orientation, the same as ``upright_rgb``."""
    import numpy as np
    ops = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: np.swapaxes(a, 0, 1), 6: lambda a: np.swapaxes(a, 0, 1)[:, ::-1],
           7: lambda a: np.swapaxes(a, 0, 1)[::-1, ::-1], 8: lambda a: np.swapaxes(a, 0, 1)[::-1]}
    op = ops.get(orientation)
    return np.ascontiguousarray(op(arr)) if op else arr


_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def _to_rgb(im: Image.Image, background: tuple[int, ...] = ALPHA_BACKGROUND) -> Image.Image:
    """RGB for every mode: palette and alpha composited on ``background``, 16-bit scaled, CMYK converted."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np
        arr = np.asarray(im, dtype=np.float32)
        top = 65535.0 if arr.max() > 255 else 255.0
        im = Image.fromarray((arr / top * 255.0).clip(0, 255).astype("uint8"), mode="L")
    if im.mode == "P" or (im.mode in ("RGB", "L") and "transparency" in im.info):
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGB", im.size, background)
        canvas.paste(rgba, mask=rgba.split()[-1])
        return canvas
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
