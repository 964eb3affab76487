"""Pixels for symbolic scenes: Pillow drawing, supersampled, with jitter and noise.

Each render takes its own numpy Generator, so an image depends only on (scene, seed stream)
and parallel rendering gives the same bytes as serial rendering. Jitter (position, size,
colour) and pixel noise make two renders of one scene differ, as real photos of one scene do.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .world import Scene

COLOR_RGB = {
    "red": (225, 35, 35), "orange": (250, 140, 10), "yellow": (245, 230, 40),
    "green": (30, 175, 60), "cyan": (30, 215, 225), "blue": (40, 80, 235),
    "purple": (150, 55, 215), "white": (240, 240, 240),
}
BACKGROUND = (72, 72, 78)
SUPERSAMPLE = 4
#: object radius as a fraction of a grid cell
RADIUS = {"small": 0.22, "large": 0.38}
JITTER = 0.09        # centre jitter, fraction of a cell
SIZE_JITTER = 0.06   # relative radius jitter
COLOR_JITTER = 12    # per-channel colour jitter
NOISE_STD = 4.0      # per-pixel noise after downsampling
PNG_COMPRESS_LEVEL = 6


def _shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
           fill: tuple[int, int, int] | int) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        h = r * 0.88  # about the area of the circle, so size reads the same across shapes
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "triangle":
        R = r * 1.18  # circumradius; centroid at (cx, cy + r/6) so it sits centred in its cell
        cy2 = cy + r * 0.17
        pts = [(cx, cy2 - R), (cx - R * 0.866, cy2 + R * 0.5), (cx + R * 0.866, cy2 + R * 0.5)]
        draw.polygon(pts, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_scene(scene: Scene, size: int, rng: np.random.Generator,
                 masks: list[np.ndarray] | None = None) -> Image.Image:
    """One independent render of ``scene`` as a ``size`` x ``size`` RGB image.

    ``masks``, when a list is given, receives one ``[size, size]`` float array per object (in
    scene order): the fraction of each pixel the object covers and that no later object hides.
    Drawing them takes nothing from ``rng``, so the image is the same with or without them
    (used to score CAM regions against where the objects really are)."""
    big = size * SUPERSAMPLE
    bg = tuple(int(np.clip(c + rng.integers(-6, 7), 0, 255)) for c in BACKGROUND)
    img = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(img)
    cell = big / 3
    shapes: list[Image.Image] = []
    for o in scene:
        row, col = divmod(o.cell, 3)
        cx = (col + 0.5 + rng.uniform(-JITTER, JITTER)) * cell
        cy = (row + 0.5 + rng.uniform(-JITTER, JITTER)) * cell
        r = RADIUS[o.size] * cell * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))
        fill = tuple(int(np.clip(c + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1), 0, 255))
                     for c in COLOR_RGB[o.color])
        _shape(draw, o.shape, cx, cy, r, fill)
        if masks is not None:
            m = Image.new("L", (big, big), 0)
            _shape(ImageDraw.Draw(m), o.shape, cx, cy, r, 255)
            shapes.append(m)
    if masks is not None:
        hidden = np.zeros((big, big), dtype=bool)
        visible = []
        for m in reversed(shapes):                # a later object is drawn over an earlier one
            on = np.asarray(m) > 0
            visible.append(on & ~hidden)
            hidden |= on
        for on in reversed(visible):
            cover = Image.fromarray(on.astype(np.uint8) * 255).resize((size, size), Image.Resampling.BOX)
            masks.append(np.asarray(cover, dtype=np.float32) / 255.0)
    small = np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.float32)
    noisy = small + rng.normal(0.0, NOISE_STD, size=small.shape)
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), "RGB")


def png_bytes(img: Image.Image) -> bytes:
    """PNG without metadata: identical pixels give identical bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def render_seed(seed: int, split_index: int, image_index: int) -> np.random.Generator:
    """The Generator for one image: a fixed spawn key, independent of worker and order."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(split_index, 1, image_index)))


def render_to_file(task: tuple[str, Scene, int, int, int, int]) -> None:
    """Worker entry point: (path, scene, size, seed, split index, image index) -> PNG file."""
    path, scene, size, seed, split_index, image_index = task
    img = render_scene(scene, size, render_seed(seed, split_index, image_index))
    Path(path).write_bytes(png_bytes(img))


def contact_sheet(rows: list[tuple[Image.Image, str, Image.Image]], scale: int = 2,
                  text_width: int = 300) -> Image.Image:
    """reference | modification text | target, one triplet per row (for docs and eyeballing)."""
    import textwrap

    from PIL import ImageFont

    side = rows[0][0].width * scale
    pad, head = 8, 24
    font = ImageFont.load_default(size=14)
    width = 2 * side + text_width + 4 * pad
    sheet = Image.new("RGB", (width, head + len(rows) * (side + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for x, label in ((pad, "reference"), (2 * pad + side, "modification text"),
                     (3 * pad + side + text_width, "target")):
        draw.text((x, 5), label, fill=(90, 90, 90), font=font)
    for i, (ref, text, target) in enumerate(rows):
        y = head + pad + i * (side + pad)
        sheet.paste(ref.resize((side, side), Image.Resampling.NEAREST), (pad, y))
        lines = textwrap.wrap(text, width=text_width // 8)
        draw.multiline_text((2 * pad + side, y + side // 2 - 9 * len(lines)), "\n".join(lines),
                            fill=(20, 20, 20), font=font, spacing=3)
        sheet.paste(target.resize((side, side), Image.Resampling.NEAREST), (3 * pad + side + text_width, y))
    return sheet
