"""The Python API: what a notebook needs, on the same code as the ``cir`` commands.

    from composed_retrieval import load_model, evaluate, build_index, Index

    model = load_model("hf_clip:models/clip-vit-base-patch32")      # or a run folder, or a ModelSpec
    print(evaluate(model, "cirr", "data/cirr", split="val"))         # metrics + model + gallery
    build_index(model, gallery="photos/", out="photos.idx")
    for hit in Index.open("photos.idx").search("photos/cat.jpg", "make it black", k=5):
        print(hit.rank, hit.name, hit.score)

``image`` in :meth:`Index.search` may be a file path, a gallery image name, a PIL image or an
``HxWx3`` array (uint8, or floats in [0, 1]).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .errors import ConfigError, DataError
from .methods.base import CIRMethod
from .train.models import ModelSpec, describe_model, load_model as _load_model, parse_source

__all__ = ["ModelSpec", "load_model", "evaluate", "build_index", "Index", "describe_model"]


def load_model(source: Any, method: str | None = None, device: str = "cpu") -> CIRMethod:
    """A run/checkpoint folder, a :class:`ModelSpec` (or its dict), or an encoder string such as
    ``"hf_clip:DIR"`` / ``"open_clip:DIR"`` with ``method`` (default ``sum``)."""
    parsed = parse_source(source)
    if method is not None:
        if not isinstance(parsed, ModelSpec):
            raise ConfigError("method= goes with an encoder spec; a run folder brings its own method")
        parsed = ModelSpec(**{**parsed.to_json(), "method": method})
    return _load_model(parsed, device)


def evaluate(model: CIRMethod | Any, dataset: str, root: str | Path, split: str = "val",
             image_root: str | Path | None = None, device: str = "cpu", cache_dir: str | Path | None = None,
             batch_size: int = 256, progress: bool = False) -> dict[str, Any]:
    """Metrics in percent by the dataset's protocol, with ``model`` and ``gallery`` entries
    (what ``cir eval`` prints). ``model`` may be a loaded method or anything :func:`load_model` takes."""
    from .config import DEFAULTS, merge
    from .train.loop import Trainer, load_data
    from .train.models import evaluate_loaded

    method = model if isinstance(model, CIRMethod) else load_model(model, device=device)
    cfg = merge(DEFAULTS, {"dataset": dataset, "root": str(root), "device": device, "eval_batch_size": batch_size,
                           "image_root": None if image_root is None else str(image_root),
                           "cache_dir": None if cache_dir is None else str(cache_dir)})
    splits = load_data(cfg, split, training=False)
    with tempfile.TemporaryDirectory(prefix="cir-eval-") as tmp:
        trainer = Trainer(cfg, Path(tmp) / "eval", progress=progress)
        return evaluate_loaded(method.to(trainer.device).eval(), splits, trainer, cfg)


def build_index(model: CIRMethod | Any, gallery: str | Path, out: str | Path, kind: str = "auto",
                device: str = "cpu", batch_size: int = 64, progress: bool = False, **options: Any):  # type: ignore[no-untyped-def]
    """Embed every image under ``gallery`` into the index folder ``out`` (``cir index``);
    returns the build report. A loaded model is used as it is and recorded by its source."""
    from .index.build import build_index as _build

    method = None
    if isinstance(model, CIRMethod):
        method, source = model, getattr(model, "source", None) or {}
        if "run" in source:
            model = Path(source["run"])
        elif "spec" in source:
            model = ModelSpec.from_json(source["spec"])
        else:
            raise ConfigError("this model was not made by load_model (no run folder or spec to record); "
                              "pass the run folder or spec instead")
    return _build(out, gallery=gallery, model=model, kind=kind, device=device, batch_size=batch_size,
                  progress=progress, method=method, log=(print if progress else (lambda _m: None)), **options)


def _as_pil(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or min(arr.shape[:2]) < 1:
        raise DataError(f"an image array must be HxW, HxWx3 or HxWx4, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if not np.isfinite(arr).all():
            raise DataError("the image array holds NaN or infinite values")
        arr = (np.clip(arr.astype(np.float64), 0.0, 1.0) * 255).round().astype(np.uint8)
    return Image.fromarray(arr[..., :3])


class Index:
    """An index folder with its model, ready to search (thread-safe, like ``cir serve``)."""

    def __init__(self, searcher: Any) -> None:
        self.searcher = searcher

    @classmethod
    def open(cls, path: str | Path, model: Any = None, gallery: str | Path | None = None,
             device: str = "cpu") -> "Index":
        """``model`` overrides the stored one (a run folder or spec); ``gallery`` if it moved."""
        from .index.search import Searcher
        return cls(Searcher.open(path, model=model, gallery=gallery, device=device))

    @property
    def names(self) -> list[str]:
        return list(self.searcher.index.names)

    def __len__(self) -> int:
        return len(self.searcher.index)

    def _reference(self, image: Any) -> Any:
        from .index.search import Reference
        if isinstance(image, (str, Path)):
            return self.searcher.reference(image)
        return Reference(_as_pil(image), None, None)

    def search(self, image: str | Path | Image.Image | np.ndarray, text: str, k: int = 10) -> list[Any]:
        """Top-k :class:`Hit` (rank, name, score); a gallery reference is left out of its results."""
        return self.search_many([image], [text], k)[0]

    def search_many(self, images: Sequence[Any], texts: Sequence[str], k: int = 10) -> list[list[Any]]:
        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k}")
        return self.searcher.search_many([self._reference(im) for im in images], list(texts), k)
