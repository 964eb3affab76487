"""Where the training loop gets image inputs: pixels, encoded features, or image-caption pairs.

Trainable image tower -> pixels (``data/pixels.py``, preloaded when the split is small enough);
frozen image tower -> features from the on-disk cache (``cache.py``), computed once per encoder
weights. ``FeatureTable``, ``encode_with`` and ``PixelSource`` live in those lower modules
(evaluation uses them too) and are re-exported here for the trainer's callers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..cache import FeatureTable, encode_with, weights_hash
from ..data.pairs import PairDataset, pairs_from_config
from ..data.pixels import PixelSource

__all__ = ["FeatureTable", "PixelSource", "encode_with", "pair_training_data"]


#: in-process memo of the last decoded pair images and encoded features, so several runs in
#: one process (benchmarks, sweeps) decode and encode the same pair file once
_MEMO: dict[str, tuple[Any, Any]] = {}


def pair_training_data(cfg: dict[str, Any], method: Any, progress: bool = True) -> list[PairDataset]:
    """The training datasets for a method with ``train_on == "pairs"`` (the loop's hook).

    Pixels when the method needs them (CAM masking runs the image tower on masked images),
    otherwise the frozen image tower's pooled features, encoded once.
    """
    pairs = pairs_from_config(cfg, cfg.get("root"))
    transform = method.encoder.image_transform(cfg["preprocess"])
    names = [str(p) for p in pairs.paths]
    key = repr((names, cfg["preprocess"], transform.size))
    if _MEMO.get("pixels", (None,))[0] != key:
        _MEMO.clear()
        _MEMO["pixels"] = (key, PixelSource(names, Path, transform, cfg["preload_pixels_max_mb"],
                                            cfg["num_workers"], progress))
    pixels = _MEMO["pixels"][1]
    if getattr(method, "needs_pixels", False):
        return [PairDataset(pairs, pixels)]
    fkey = key + weights_hash(method.encoder)
    if _MEMO.get("features", (None,))[0] != fkey:
        device = next(method.parameters()).device
        _MEMO["features"] = (fkey, encode_with(method.encoder, names, pixels, cfg["eval_batch_size"], device,
                                               progress, keep_tokens=False))
    return [PairDataset(pairs, _MEMO["features"][1].lookup)]
