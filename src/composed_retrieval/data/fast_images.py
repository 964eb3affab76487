"""Fast decoding for gallery embedding: image file -> uint8 ``[3, H, W]`` tensor.

Plain 8-bit RGB/greyscale JPEGs are decoded by simplejpeg (libjpeg-turbo, the decoder Pillow
wraps too: same pixels, ~2x faster here), plain 8-bit RGB/greyscale PNGs by
``torchvision.io.decode_png``. Every other file goes to :func:`data.images.load_image`, the
Pillow path, so its rules stay the only ones for everything unusual: alpha and palettes, 16-bit,
CMYK, PNG transparency keys and eXIf chunks, size limits, and the one-line error of a corrupt
file. Only the file's header bytes are read to decide.

EXIF orientation is read from the JPEG's APP1 segment without decoding (:func:`jpeg_orientation`);
:func:`orient` is its tensor counterpart of ``PIL.ImageOps.exif_transpose`` (pinned by a test).
``load_image`` turns EXIF-rotated images upright, so the fast path does the same on the tensor
(``ORIENT_ON_TENSOR``; False hands such JPEGs to Pillow instead). tests/test_fast_decode.py
checks both paths give identical pixels, a rotated JPEG included.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from .images import MAX_IMAGE_PIXELS, load_image

#: apply EXIF orientation to the decoded tensor (True) or hand such JPEGs to Pillow (False)
ORIENT_ON_TENSOR = True

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def jpeg_orientation(data: bytes) -> int:
    """EXIF orientation (1-8) of a JPEG from its header bytes; 1 when absent or unreadable."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return 1
        marker = data[i + 1]
        if marker == 0xFF:          # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if marker in (0xDA, 0xD9):  # start of scan / end: no EXIF before the image data
            return 1
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker == 0xE1 and data[i + 4:i + 10] == b"Exif\x00\x00":
            return _tiff_orientation(data[i + 10:i + 2 + length])
        i += 2 + length
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    end = "<" if tiff[:2] == b"II" else ">"
    ifd = struct.unpack(end + "I", tiff[4:8])[0]
    if ifd + 2 > len(tiff):
        return 1
    count = struct.unpack(end + "H", tiff[ifd:ifd + 2])[0]
    for k in range(count):
        entry = ifd + 2 + 12 * k
        if entry + 12 > len(tiff):
            return 1
        tag, kind = struct.unpack(end + "HH", tiff[entry:entry + 4])
        if tag == 0x0112:
            value = struct.unpack(end + "H", tiff[entry + 8:entry + 10])[0] if kind == 3 else 1
            return value if 1 <= value <= 8 else 1
    return 1


def orient(pixels: torch.Tensor, orientation: int) -> torch.Tensor:
    """``[C, H, W]`` turned upright as ``ImageOps.exif_transpose`` turns the PIL image."""
    if orientation == 2:
        return pixels.flip(-1)
    if orientation == 3:
        return pixels.flip(-1, -2)
    if orientation == 4:
        return pixels.flip(-2)
    if orientation == 5:                      # PIL TRANSPOSE
        return pixels.transpose(-1, -2)
    if orientation == 6:                      # PIL ROTATE_270 (90 degrees clockwise)
        return torch.rot90(pixels, -1, dims=(-2, -1))
    if orientation == 7:                      # PIL TRANSVERSE
        return pixels.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:                      # PIL ROTATE_90 (90 degrees counter-clockwise)
        return torch.rot90(pixels, 1, dims=(-2, -1))
    return pixels


def _plain_png(data: bytes, max_pixels: int) -> bool:
    """8-bit greyscale or RGB, no transparency key, no EXIF chunk, within the size limit."""
    if len(data) < 33 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        return False
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    if depth != 8 or colour not in (0, 2) or width * height > max_pixels:
        return False
    i = 8
    while i + 8 <= len(data):
        length = struct.unpack(">I", data[i:i + 4])[0]
        kind = data[i + 4:i + 8]
        if kind in (b"tRNS", b"eXIf"):
            return False
        if kind in (b"IDAT", b"IEND"):
            return True
        i += 12 + length
    return False


def _png_to_tensor(data: bytes) -> torch.Tensor:
    """torchvision's PNG decoder, its deprecation notice (pointing to TorchCodec) silenced."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_png
        return decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def jpeg_plain(data: bytes, max_pixels: int) -> tuple[bool, int]:
    """(decodable by the fast path, EXIF orientation) for JPEG bytes."""
    import simplejpeg

    try:
        height, width, colourspace, _ = simplejpeg.decode_jpeg_header(data)
    except (ValueError, RuntimeError):
        return False, 1
    if colourspace not in ("YCbCr", "Gray") or width * height > max_pixels:
        return False, 1
    orientation = jpeg_orientation(data)
    return orientation == 1 or ORIENT_ON_TENSOR, orientation


def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def read_bytes(path: str | Path) -> bytes:
    """The file's bytes, or b"" when it cannot be read (load_image then names the problem)."""
    try:
        return Path(path).read_bytes()
    except OSError:
        return b""


def decode_file(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS, data: bytes | None = None) -> torch.Tensor:
    """uint8 ``[3, H, W]`` of an image file, equal to ``pil_to_tensor(load_image(path))``
    (``data``: the file's bytes when already read)."""
    path = Path(path)
    data = read_bytes(path) if data is None else data
    try:
        if is_jpeg(data):
            ok, orientation = jpeg_plain(data, max_pixels)
            if ok:
                import simplejpeg
                arr = simplejpeg.decode_jpeg(data, colorspace="RGB")
                return orient(torch.from_numpy(arr).permute(2, 0, 1), orientation)
        elif _plain_png(data, max_pixels):
            return _png_to_tensor(data)
    except (ValueError, RuntimeError):
        pass   # a damaged file: Pillow names the problem in its one-line error
    image = load_image(path, max_pixels)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
