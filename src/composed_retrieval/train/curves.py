"""curves.png: a run's training loss and validation metrics per epoch, drawn with Pillow.

Why not matplotlib: importing it and drawing two small panels took ~1.8 s per call on the 2-core
machine, more than a short run's whole epoch; train_speed.py counted it against the loop
(tiny towers: 3.6 s of plots in an 8.7 s run). Pillow is already loaded for the images and
draws this in a few milliseconds. The figure is a quick look; metrics.jsonl holds the numbers.
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from PIL import Image, ImageDraw, ImageFont

from ..fileio import atomic_write

#: validation keys drawn when present (the protocols' headline metrics)
METRIC_KEYS = ("recall@1", "recall@5", "recall_subset@1", "avg", "avg_recall@10", "map@10")
COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))
PANEL_W, PANEL_H, MARGIN = 440, 300, (56, 16, 18, 40)     # margins: left, right, top, bottom


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size)
    except TypeError:                      # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (1, 2 or 5 times a power of ten apart)."""
    span = hi - lo or abs(hi) or 1.0
    raw = span / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step)) + 1)]


def _label(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def _panel(draw: ImageDraw.ImageDraw, x0: int, epochs: Sequence[int], series: list[tuple[str, list[float]]],
           ylabel: str, boundaries: Sequence[float], font: Any) -> None:
    left, right, top, bottom = MARGIN
    px0, px1, py0, py1 = x0 + left, x0 + PANEL_W - right, top, PANEL_H - bottom
    values = [v for _, vs in series for v in vs if math.isfinite(v)] or [0.0]
    yt = _ticks(min(values), max(values))
    ylo, yhi = yt[0], yt[-1] if yt[-1] > yt[0] else yt[0] + 1
    xlo, xhi = min(epochs), max(epochs)
    xhi = xhi if xhi > xlo else xlo + 1

    def at(x: float, y: float) -> tuple[float, float]:
        return (px0 + (x - xlo) / (xhi - xlo) * (px1 - px0), py1 - (y - ylo) / (yhi - ylo) * (py1 - py0))

    for y in yt:
        _, sy = at(xlo, y)
        draw.line([(px0, sy), (px1, sy)], fill=(232, 232, 232))
        draw.text((px0 - 4, sy), _label(y), fill="black", font=font, anchor="rm")
    for x in _ticks(xlo, xhi, 6):
        if xlo <= x <= xhi and float(x).is_integer():
            sx, _ = at(x, ylo)
            draw.line([(sx, py0), (sx, py1)], fill=(232, 232, 232))
            draw.text((sx, py1 + 4), str(int(x)), fill="black", font=font, anchor="mt")
    for b in boundaries:                    # a new stage starts between these epochs
        sx, _ = at(b, ylo)
        for y in range(int(py0), int(py1), 8):
            draw.line([(sx, y), (sx, min(y + 4, py1))], fill=(128, 128, 128))
    draw.rectangle([px0, py0, px1, py1], outline="black")
    for i, (name, vs) in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        points = [at(x, y) for x, y in zip(epochs, vs) if math.isfinite(y)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for sx, sy in points:
            draw.ellipse([sx - 3, sy - 3, sx + 3, sy + 3], fill=colour)
        if len(series) > 1:                 # legend, top left inside the panel
            ly = py0 + 6 + 14 * i
            draw.line([(px0 + 6, ly + 5), (px0 + 22, ly + 5)], fill=colour, width=2)
            draw.text((px0 + 26, ly), name, fill="black", font=font)
    draw.text(((px0 + px1) / 2, PANEL_H - 4), "epoch", fill="black", font=font, anchor="mb")
    draw.text((x0 + 4, top - 2), ylabel, fill="black", font=font, anchor="lb")


def draw_curves(history: list[dict[str, Any]]) -> Image.Image:
    """Two panels: training loss, and the validation metrics in percent, one point per epoch;
    dashed lines where a stage begins."""
    epochs = [int(r["epoch"]) for r in history]
    boundaries = [r["epoch"] - 0.5 for prev, r in zip(history, history[1:]) if r["stage"] != prev["stage"]]
    keys = [k for k in METRIC_KEYS if k in history[0]["val"]]
    image = Image.new("RGB", (2 * PANEL_W, PANEL_H), "white")
    draw = ImageDraw.Draw(image)
    font = _font(11)
    _panel(draw, 0, epochs, [("loss", [float(r["loss"]) for r in history])], "training loss", boundaries, font)
    _panel(draw, PANEL_W, epochs, [(f"val {k}", [float(r["val"].get(k, math.nan)) for r in history]) for k in keys],
           "percent", boundaries, font)
    return image


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    image = draw_curves(history)
    atomic_write(path, lambda p: image.save(p, format="PNG", compress_level=1))   # flat colours: small anyway
