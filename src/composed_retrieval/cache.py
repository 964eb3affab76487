"""Features of a split, embedded once and kept on disk (safetensors + JSON metadata).

An entry is keyed by the encoder (its config without the checkpoint path, and a sha256 of the
weights image features depend on: everything but the text-only parameters), the preprocessing, the split id, the exact list of names, whether tokens are kept and
the storage dtype: any change to one of these gives a new entry instead of stale features.

Cached features are derived data, so a damaged entry (metadata unreadable, file size or sha256
not matching the metadata, tensors not matching the names) is rebuilt with a warning rather
than refused: the user loses a re-embedding, never a result.
"""
from __future__ import annotations

import hashlib
import json
import re
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

from .data.pixels import PixelSource
from .encoders.base import EncoderPair, Features
from .errors import CIRError, ConfigError, DataError
from .fileio import atomic_write, atomic_write_json, read_json, sha256_file

CACHE_FORMAT = 2   # 2: keyed by the image-side weights only (image_weights_hash)
_HASH_MEMO: "weakref.WeakKeyDictionary[torch.nn.Module, dict[frozenset, tuple[tuple, str]]]" = weakref.WeakKeyDictionary()


def weights_hash(module: torch.nn.Module, exclude: frozenset[str] = frozenset()) -> str:
    """sha256 of every state-dict tensor (names, dtypes, shapes, bytes) but those in ``exclude``.

    Memoised per module; the memo is invalidated when any tensor is modified in place
    (an optimizer step bumps ``Tensor._version``) or replaced (its storage pointer changes).
    """
    state = [(k, v) for k, v in module.state_dict(keep_vars=True).items() if k not in exclude]
    signature = (exclude, tuple((k, v.data_ptr(), v._version) for k, v in state))
    memo = _HASH_MEMO.setdefault(module, {})
    if exclude in memo and memo[exclude][0] == signature:
        return memo[exclude][1]
    h = hashlib.sha256()
    for name, tensor in state:
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    digest = h.hexdigest()
    memo[exclude] = (signature, digest)
    return digest


def image_weights_hash(encoder: EncoderPair) -> str:
    """sha256 of what image features depend on: every weight and buffer of the encoder except
    the parameters only the text side uses. Training the text tower (CaLa's, DRA's and SPN's
    recipes) then keeps the cached image features instead of re-embedding every split each epoch;
    a parameter both sides use (e.g. a shared Q-Former) stays in the key."""
    image = {id(p) for p in encoder.image_parameters()}
    text_only = {id(p) for p in encoder.text_parameters()} - image
    return weights_hash(encoder, frozenset(n for n, p in encoder.named_parameters() if id(p) in text_only))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "x"


@dataclass
class CachedFeatures:
    """Features of one split: rows in ``names`` order; tokens are ``[N, 0, d]`` when not kept."""

    pooled: torch.Tensor            # [N, d]
    tokens: torch.Tensor            # [N, L, d_tok]
    names: list[str]
    errors: list[tuple[str, str]] = field(default_factory=list)  # images left out (skip_bad)
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __post_init__(self) -> None:
        self._row = {n: i for i, n in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        try:
            return self._row[name]
        except KeyError:
            where = f" (cache {self.path})" if self.path else ""
            raise DataError(f"image {name!r} is not in the cached features of split "
                            f"{self.meta.get('split_id', '?')!r}{where}") from None

    def _rows(self, idx: Any) -> torch.Tensor:
        if isinstance(idx, str):
            idx = [idx]
        if isinstance(idx, int):
            idx = [idx]
        if isinstance(idx, torch.Tensor):
            return idx.long().reshape(-1)
        idx = list(idx)
        return torch.tensor([self.index(i) if isinstance(i, str) else int(i) for i in idx], dtype=torch.long)

    def features(self, idx_or_names: Any, dtype: torch.dtype = torch.float32) -> Features:
        """Rows by position(s) or name(s), as batched float32 Features."""
        rows = self._rows(idx_or_names)
        return Features(self.pooled[rows].to(dtype), self.tokens[rows].to(dtype), None)

    def lookup(self, name: str, dtype: torch.dtype = torch.float32) -> Features:
        """One image's features, unbatched (``pooled [d]``, ``tokens [L, d_tok]``), for a
        Dataset's image_fn; the DataLoader's collate stacks them into a batch."""
        i = self.index(name)
        return Features(self.pooled[i].to(dtype), self.tokens[i].to(dtype), None)


class FeatureCache:
    """A folder of cached split features; see the module docstring for the key."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def key(self, encoder: EncoderPair, split_id: str, names: Sequence[str], transform: Any,
            store_tokens: bool, dtype: torch.dtype) -> dict[str, Any]:
        prep = getattr(transform, "key", None)
        if not callable(prep):
            raise ConfigError("the feature cache needs a data.preprocess.Preprocess transform "
                              f"(its key() names the preprocessing), got {type(transform).__name__}")
        config = {k: v for k, v in dict(encoder.config).items() if k != "checkpoint"}
        fields = {
            "format": CACHE_FORMAT,
            "encoder": config,
            "image_weights_sha256": image_weights_hash(encoder),
            "preprocess": prep(),
            "split_id": split_id,
            "names_sha256": hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest(),
            "store_tokens": bool(store_tokens),
            "dtype": str(dtype).replace("torch.", ""),
        }
        fields["key"] = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()
        return fields

    def paths(self, encoder: EncoderPair, split_id: str, key: str) -> tuple[Path, Path]:
        base = self.root / _slug(str(encoder.config.get("name", "encoder"))) / f"{_slug(split_id)}-{key[:16]}"
        return base.with_suffix(".safetensors"), base.with_suffix(".json")

    def get_or_build(self, encoder: EncoderPair, split_id: str, names: Sequence[str],
                     path_of: Callable[[str], Path], transform: Any = None, batch_size: int = 64,
                     store_tokens: bool = True, dtype: torch.dtype = torch.float16,
                     num_workers: int | None = None, device: torch.device | str | None = None,
                     progress: bool = True, skip_bad: bool = False) -> CachedFeatures:
        """Load the entry for this key, or embed the images (encoders/embed.py) and write it."""
        names = list(names)
        transform = transform if transform is not None else encoder.image_transform("targetpad")
        fields = self.key(encoder, split_id, names, transform, store_tokens, dtype)
        data_path, meta_path = self.paths(encoder, split_id, fields["key"])
        if meta_path.exists() or data_path.exists():
            try:
                entry = self._load(data_path, meta_path, fields)
                # an entry that left images out serves skip_bad callers only; others re-embed
                # (the images may have been fixed, or the build stops on them with a DataError)
                if skip_bad or not entry.errors:
                    return entry
            except _Damaged as exc:
                warnings.warn(f"{exc}; rebuilding the feature cache entry", RuntimeWarning, stacklevel=2)
        return self._build(encoder, names, path_of, transform, batch_size, store_tokens, dtype,
                           num_workers, device, progress, skip_bad, fields, data_path, meta_path)

    # --- internals ---------------------------------------------------------------------------
    def _build(self, encoder: EncoderPair, names: list[str], path_of: Callable[[str], Path],
               transform: Any, batch_size: int, store_tokens: bool, dtype: torch.dtype,
               num_workers: int | None, device: Any, progress: bool, skip_bad: bool,
               fields: dict[str, Any], data_path: Path, meta_path: Path) -> CachedFeatures:
        from safetensors.torch import save_file

        from .encoders.embed import embed_images

        feats, kept, errors = embed_images(encoder, names, path_of, transform, batch_size=batch_size,
                                           num_workers=num_workers, device=device, progress=progress,
                                           skip_bad=skip_bad, tokens=store_tokens, out_dtype=dtype)
        tensors = {"pooled": feats.pooled.contiguous(), "tokens": feats.tokens.contiguous()}
        meta_path.unlink(missing_ok=True)  # metadata is written last: it marks a complete entry
        atomic_write(data_path, lambda p: save_file(tensors, str(p)))
        meta = dict(fields)
        meta.update({
            "names": kept,
            "errors": [list(e) for e in errors],
            "shapes": {k: list(v.shape) for k, v in tensors.items()},
            "file_size": data_path.stat().st_size,
            "file_sha256": sha256_file(data_path),
            "encoder_config": dict(encoder.config),
        })
        atomic_write_json(meta_path, meta, indent=None)
        return CachedFeatures(tensors["pooled"], tensors["tokens"], kept, [tuple(e) for e in errors],
                              meta, data_path)

    def _load(self, data_path: Path, meta_path: Path, fields: dict[str, Any]) -> CachedFeatures:
        from safetensors.torch import load_file

        try:
            meta = read_json(meta_path, "feature cache metadata")
        except CIRError as exc:
            raise _Damaged(str(exc)) from None
        if not isinstance(meta, dict) or meta.get("key") != fields["key"]:
            raise _Damaged(f"{meta_path}: metadata does not belong to this cache key")
        if not data_path.is_file():
            raise _Damaged(f"{data_path}: feature file missing")
        size = data_path.stat().st_size
        if size != meta.get("file_size"):
            raise _Damaged(f"{data_path}: truncated or altered ({size} bytes, expected {meta.get('file_size')})")
        if sha256_file(data_path) != meta.get("file_sha256"):
            raise _Damaged(f"{data_path}: sha256 does not match the metadata")
        try:
            tensors = load_file(str(data_path))
            pooled, tokens = tensors["pooled"], tensors["tokens"]
            names = list(meta["names"])
            errors = [tuple(e) for e in meta.get("errors", [])]
        except Exception as exc:
            raise _Damaged(f"{data_path}: unreadable ({' '.join(str(exc).split())[:200]})") from None
        if pooled.shape[0] != len(names) or tokens.shape[0] != len(names):
            raise _Damaged(f"{data_path}: {pooled.shape[0]} rows for {len(names)} names")
        return CachedFeatures(pooled, tokens, names, errors, meta, data_path)  # type: ignore[arg-type]


class _Damaged(Exception):
    """A cache entry that must be rebuilt (message: one line, names the file)."""


# ---- encoded features by name (evaluation and the training loop read them) ----
class FeatureTable:
    """Encoded images by name: ``lookup(name)`` for datasets, ``take(names)`` for batches."""

    def __init__(self, names: Sequence[str], features: Features) -> None:
        self.names = list(names)
        self.features = features
        self.index = {n: i for i, n in enumerate(self.names)}

    def rows(self, names: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self.index[n] for n in names], dtype=torch.long)

    def take(self, names: Sequence[str]) -> Features:
        return self.features.rows(self.rows(names))

    def lookup(self, name: str) -> Features:
        return self.features.rows(self.index[name])


@torch.no_grad()
def encode_with(encoder: EncoderPair, names: Sequence[str], pixels: Callable[[str], torch.Tensor],
                batch_size: int = 256, device: torch.device | str = "cpu", progress: bool = True,
                keep_tokens: bool = True) -> FeatureTable:
    """Encode images given by a pixel source with the encoder's current weights (a
    ``PixelSource``'s uint8 images are normalised per batch on the device)."""
    names = list(dict.fromkeys(names))
    normalise = pixels.transform.normaliser(device) if isinstance(pixels, PixelSource) else None
    pooled, tokens, masks, vision = [], [], [], []
    was_training = encoder.training
    encoder.eval()
    for start in tqdm(range(0, len(names), batch_size), desc="encode images", disable=not progress, leave=False):
        chunk = names[start:start + batch_size]
        if normalise is not None:
            x = normalise(torch.stack([pixels.uint8(n) for n in chunk]).to(device))  # type: ignore[attr-defined]
        else:
            x = torch.stack([pixels(n) for n in chunk]).to(device)
        f = encoder.encode_image(x)
        pooled.append(f.pooled.float().cpu())
        tokens.append(f.tokens.cpu() if keep_tokens else f.tokens[:, :0].cpu())
        if f.mask is not None:
            masks.append(f.mask.cpu())
        if f.vision is not None:   # a multimodal method's reference images (features.py)
            vision.append(f.vision.cpu())
    encoder.train(was_training)
    feats = Features(torch.cat(pooled), torch.cat(tokens), torch.cat(masks) if masks else None,
                     torch.cat(vision) if vision else None)
    return FeatureTable(names, feats)
