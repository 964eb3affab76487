"""Generate the bad-input corpus (images and text files) into a folder at test time.

Nothing here is committed as a binary: every file is built from a few bytes or a tiny Pillow
image, so the corpus is seeded, small and cheap to make (the decompression bomb is a 100-byte
PNG whose header claims 100000 x 100000 pixels).

``BAD_IMAGES`` name files that must be refused with a one-line error; ``ODD_IMAGES`` name valid
images in unusual modes that must load as RGB.
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A well-formed PNG header announcing ``width x height`` grey pixels, with one tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _noise(seed: int, size: tuple[int, int] = (40, 30)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def _save(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def png_bytes(seed: int = 0, size: tuple[int, int] = (40, 30)) -> bytes:
    return _save(Image.fromarray(_noise(seed, size)), "PNG")


def jpeg_bytes(seed: int = 0, size: tuple[int, int] = (40, 30)) -> bytes:
    return _save(Image.fromarray(_noise(seed, size)), "JPEG", quality=90)


def _bad_crc() -> bytes:
    data = bytearray(png_bytes(1))
    data[29] ^= 0xFF  # inside the IHDR CRC
    return bytes(data)


def _huge_dimensions() -> bytes:
    # a real, fully encoded 1-bit image of 9000 x 8000 = 72 Mpx (above the 64 Mpx default)
    return _save(Image.new("1", (9000, 8000)), "PNG")


def _wide_strip() -> bytes:
    # 70000 x 1000 = 70 Mpx: legal PNG sizes, but above the limit
    return bomb_png(70_000, 1_000)


BAD_IMAGES: dict[str, Callable[[], bytes]] = {
    "empty.png": lambda: b"",
    "truncated.png": lambda: png_bytes(2)[:60],
    "truncated_body.png": lambda: png_bytes(3, (200, 150))[:-200],
    "truncated.jpg": lambda: jpeg_bytes(4, (200, 150))[:300],
    "garbage.jpg": lambda: np.random.default_rng(5).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    "text_as_image.png": lambda: b"this is not an image\n" * 10,
    "bad_crc.png": _bad_crc,
    "only_signature.png": lambda: b"\x89PNG\r\n\x1a\n",
    "bomb.png": lambda: bomb_png(),
    "wide_strip.png": _wide_strip,
    "huge_dimensions.png": _huge_dimensions,
    "html.gif": lambda: b"<html><script>alert(1)</script></html>",
}


def _rgb(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    return Image.fromarray(_noise(seed, size))


def _png16() -> bytes:
    arr = (np.random.default_rng(7).integers(0, 65536, (30, 40))).astype(np.uint16)
    return _save(Image.fromarray(arr), "PNG")  # uint16 -> mode I;16


def _palette_transparent() -> bytes:
    im = _rgb(8).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return _save(im, "PNG", transparency=0)


def _animated_gif() -> bytes:
    frames = [_rgb(9 + i).convert("P") for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50)
    return buf.getvalue()


ODD_IMAGES: dict[str, Callable[[], bytes]] = {
    "cmyk.jpg": lambda: _save(_rgb(10).convert("CMYK"), "JPEG"),
    "cmyk.tif": lambda: _save(_rgb(11).convert("CMYK"), "TIFF"),
    "gray16.png": _png16,
    "int32.tif": lambda: _save(Image.fromarray(np.arange(1200, dtype=np.int32).reshape(30, 40) * 1000), "TIFF"),
    "palette.png": lambda: _save(_rgb(12).convert("P"), "PNG"),
    "palette_transparent.png": _palette_transparent,
    "rgba.png": lambda: _save(_rgb(13).convert("RGBA"), "PNG"),
    "gray_alpha.png": lambda: _save(_rgb(14).convert("LA"), "PNG"),
    "gray.jpg": lambda: _save(_rgb(15).convert("L"), "JPEG"),
    "bilevel.png": lambda: _save(_rgb(16).convert("1"), "PNG"),
    "float.tif": lambda: _save(Image.fromarray(np.random.default_rng(17).random((30, 40), dtype=np.float32)), "TIFF"),
    "animated.gif": _animated_gif,
    "rgb.webp": lambda: _save(_rgb(18), "WEBP"),
    "rgb.bmp": lambda: _save(_rgb(19), "BMP"),
}


def write_corpus(folder: str | Path, which: dict[str, Callable[[], bytes]] | None = None) -> dict[str, Path]:
    """Write ``which`` (default: bad and odd images) into ``folder``; returns name -> path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    which = which if which is not None else {**BAD_IMAGES, **ODD_IMAGES}
    out = {}
    for name, make in which.items():
        out[name] = folder / name
        out[name].write_bytes(make())
    return out


if __name__ == "__main__":  # pragma: no cover
    import sys
    for name, path in write_corpus(sys.argv[1] if len(sys.argv) > 1 else "badinput_corpus").items():
        print(path, path.stat().st_size)
