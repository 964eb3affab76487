"""Query an index: (reference image, modification text) -> ranked gallery images.

The model comes from the reference stored in the index, so a query is encoded by exactly the
model that embedded the gallery (its weights hash is checked when the checkpoint records one).
When the reference is itself a gallery image it is left out of the results (CIRR's protocol,
and what a person refining a search expects); an uploaded file is matched by content hash.

One searcher interface, two backends: :class:`Searcher` (the model side, used by `cir search`
and `cir serve`) talks to a :class:`VectorIndex` -- :class:`GalleryIndex` for a FAISS index
folder (files memory-mapped, so several server processes share one copy) or
``qdrant_index.QdrantIndex`` for a Qdrant collection -- and :func:`open_index` picks the one an
index folder's ``index.json`` names.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch
from PIL import Image

from ..data.images import MAX_IMAGE_PIXELS, load_image
from ..errors import CheckpointError, DataError
from ..methods.base import CIRMethod
from . import faiss_index
from .hits import Exclusion, Hit, model_fingerprint  # noqa: F401 (re-exported)
from .store import IndexData, read_index, read_meta, sha256_file


class UnsafeName(DataError):
    """A name that tries to leave the gallery folder (absolute, '..', symlink outside)."""


class UnknownImage(DataError):
    """A well-formed name that is not an image of the index."""


@dataclass
class Reference:
    """A query's reference image: the decoded image plus what identifies it in the gallery."""

    image: Image.Image
    name: str | None = None        # gallery name, when the reference is a gallery image
    sha256: str | None = None      # content hash, to leave an identical gallery file out


class VectorIndex(Protocol):
    """What :class:`Searcher` and the service need from a backend (FAISS folder or Qdrant)."""

    meta: dict[str, Any]        # index.json: kind/backend, method, model, preprocess, ...
    folder: Path                # the index folder (error messages, stored relative paths)
    names: Sequence[str]        # gallery names, for paging through the gallery

    @property
    def dim(self) -> int: ...

    def __len__(self) -> int: ...

    def contains(self, name: str) -> bool: ...

    def model_path(self) -> Path: ...

    def gallery_path(self) -> Path: ...

    def search(self, queries: np.ndarray, k: int,
               exclude: Sequence[Exclusion] | None = None) -> list[list[Hit]]: ...


class GalleryIndex:
    """Vectors + FAISS engine of one index folder. By default both are memory-mapped (the
    vectors file and an IVF engine's codes), so start-up reads almost nothing and processes
    serving the same index share its pages; ``mmap=False`` reads them into RAM. ``verify``
    hashes the engine file against index.json (a multi-process server does it once, at start)."""

    def __init__(self, data: IndexData, search_params: dict[str, Any] | None = None,
                 mmap: bool = True, verify: bool = True) -> None:
        self.data = data
        self.meta, self.folder = data.meta, data.folder
        self.names = data.names
        self.position = {n: i for i, n in enumerate(self.names)}
        self.rows_by_hash: dict[str, list[int]] = {}
        for i, it in enumerate(data.items):
            self.rows_by_hash.setdefault(it.get("sha256", ""), []).append(i)
        if data.kind == "flat" or data.engine_path is None:
            self.engine = faiss_index.MappedFlat(data.vectors)
        else:
            expected = data.meta.get("engine_sha256")
            if verify and expected is not None and data.engine_path.is_file() \
                    and sha256_file(data.engine_path) != expected:
                raise CheckpointError("FAISS index file does not match the sha256 recorded in index.json "
                                      "(replaced or corrupted); rebuild the index", data.engine_path)
            self.engine = faiss_index.load_engine(data.engine_path, mmap=mmap)
            if self.engine.ntotal != len(self.names):
                raise CheckpointError(f"FAISS index holds {self.engine.ntotal} vectors, the index "
                                      f"{len(self.names)}", data.engine_path)
        self.params = {**(data.meta.get("params") or {}), **(search_params or {})}
        self.rerank = int(self.params.get("rerank", 0)) if data.kind in faiss_index.PQ_KINDS else 0
        faiss_index.set_search_params(self.engine, self.params)

    @classmethod
    def open(cls, folder: str | Path, search_params: dict[str, Any] | None = None,
             mmap: bool = True, verify: bool = True) -> "GalleryIndex":
        return cls(read_index(folder, mmap=mmap), search_params, mmap=mmap, verify=verify)

    @property
    def dim(self) -> int:
        return int(self.data.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.names)

    def contains(self, name: str) -> bool:
        return name in self.position

    def model_path(self) -> Path:
        return self.data.model_path()

    def gallery_path(self) -> Path:
        return self.data.gallery_path()

    def _rows(self, ex: Exclusion) -> set[int]:
        name, sha = ex
        rows = {self.position[name]} if name is not None and name in self.position else set()
        if sha:
            rows.update(self.rows_by_hash.get(sha, []))
        return rows

    def search(self, queries: np.ndarray, k: int, exclude: Sequence[Exclusion] | None = None) -> list[list[Hit]]:
        """Top-k hits per query row, leaving out the gallery images ``exclude[i]`` names (by
        name or content hash) for query i."""
        skips = [self._rows(e) for e in exclude] if exclude else []
        extra = max((len(e) for e in skips), default=0)
        scores, ids = faiss_index.search_reranked(self.engine, self.data.vectors, queries, k + extra, self.rerank)
        out = []
        for i in range(len(ids)):
            skip = skips[i] if skips else set()
            hits = [(int(j), float(s)) for j, s in zip(ids[i], scores[i]) if j >= 0 and int(j) not in skip]
            out.append([Hit(r + 1, self.names[j], s) for r, (j, s) in enumerate(hits[:k])])
        return out


def open_index(folder: str | Path, search_params: dict[str, Any] | None = None,
               verify: bool = True) -> VectorIndex:
    """The backend an index folder's index.json names: FAISS files here, or a Qdrant collection."""
    meta = read_meta(folder)
    if meta.get("backend") == "qdrant":
        from .qdrant_index import QdrantIndex
        return QdrantIndex.open(folder, search_params)
    return GalleryIndex.open(folder, search_params, verify=verify)


class Searcher:
    """A loaded method + index + gallery folder; thread-safe for the HTTP service."""

    def __init__(self, index: VectorIndex, method: CIRMethod, gallery: str | Path,
                 device: str = "cpu", max_pixels: int = MAX_IMAGE_PIXELS) -> None:
        self.index = index
        self.method = method.to(device).eval()
        self.device = device
        self.gallery = Path(gallery).absolute()
        self.gallery_real = Path(os.path.realpath(self.gallery))
        self.transform = method.encoder.image_transform(index.meta.get("preprocess", "targetpad"))
        self.max_pixels = max_pixels
        self._lock = threading.Lock()

    @classmethod
    def open(cls, index_dir: str | Path, model: str | Path | None = None, gallery: str | Path | None = None,
             device: str = "cpu", search_params: dict[str, Any] | None = None,
             method: CIRMethod | None = None, max_pixels: int = MAX_IMAGE_PIXELS,
             verify: bool = True) -> "Searcher":
        """Load the index and its model (``model`` overrides the stored reference)."""
        index = open_index(index_dir, search_params, verify=verify)
        data = index
        if method is None:
            from ..train.checkpoint import load_method
            model_path = Path(model) if model is not None else data.model_path()
            _check_fingerprint(model_path, data.meta.get("model_weights_sha256"), data.folder)
            method = load_method(model_path, device=device)
        gallery_path = Path(gallery) if gallery is not None else data.gallery_path()
        if not gallery_path.is_dir():
            raise DataError("gallery folder of this index not found (pass --gallery)", gallery_path)
        return cls(index, method, gallery_path, device=device, max_pixels=max_pixels)

    # ---- gallery files ----------------------------------------------------------------
    def gallery_file(self, name: str) -> Path:
        """The file of gallery image ``name``; UnsafeName / UnknownImage otherwise."""
        from ..data.userdata import safe_name
        try:
            clean = safe_name(name)
        except ValueError as exc:
            raise UnsafeName(f"image name {name!r} {exc}") from None
        if not self.index.contains(clean):
            raise UnknownImage(f"no image named {clean!r} in this gallery")
        path = self.gallery / clean
        real = Path(os.path.realpath(path))
        if self.gallery_real not in real.parents:
            raise UnsafeName(f"image name {clean!r} resolves outside the gallery folder")
        if not real.is_file():
            raise UnknownImage(f"gallery image {clean!r} is no longer on disk")
        return real

    def reference(self, ref: str | Path) -> Reference:
        """A file path if one exists, else a gallery name."""
        path = Path(ref)
        if path.is_file():
            return Reference(load_image(path, self.max_pixels), None, sha256_file(path))
        try:
            gallery_path = self.gallery_file(str(ref))
        except UnknownImage:
            raise DataError(f"reference {str(ref)!r} is neither an image file nor a gallery image name") from None
        return self.reference_by_name(str(ref), gallery_path)

    def reference_by_name(self, name: str, path: Path | None = None) -> Reference:
        path = path or self.gallery_file(name)
        from ..data.userdata import safe_name
        return Reference(load_image(path, self.max_pixels), safe_name(name), None)

    # ---- queries ----------------------------------------------------------------------
    def query_vectors(self, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        """Normalised composed queries ``[B, d]`` (float32)."""
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                raise DataError("the modification text is empty")
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as exc:  # undecodable bytes from argv or a file
                raise DataError(f"the modification text is not valid UTF-8 (at character {exc.start})") from None
        pixels = torch.stack([self.transform(im) for im in images]).to(self.device)
        with self._lock, torch.no_grad():
            tokens = self.method.encoder.tokenize(list(texts)).to(self.device)
            query = self.method.compose(self.method.image_features(pixels),
                                        self.method.text_features(tokens))
        q = query.float().cpu().numpy()
        if not np.isfinite(q).all():   # NaN queries would match nothing: an empty answer, not an error
            raise CheckpointError("the model gives NaN or infinite query vectors; its weights are damaged "
                                  "or diverged (wrong --model?)", self.index.data.folder)
        if q.shape[1] != self.index.dim:
            raise CheckpointError(f"the model gives {q.shape[1]}-d queries but the index holds "
                                  f"{self.index.dim}-d vectors (wrong --model?)", self.index.folder)
        return q

    def search_many(self, refs: Sequence[Reference], texts: Sequence[str], k: int = 10) -> list[list[Hit]]:
        if len(refs) != len(texts):
            raise ValueError("one text per reference")
        q = self.query_vectors([r.image for r in refs], texts)
        return self.index.search(q, k, [(r.name, r.sha256) for r in refs])

    def search(self, ref: Reference, text: str, k: int = 10) -> list[Hit]:
        return self.search_many([ref], [text], k)[0]


def _check_fingerprint(model: Path, expected: str | None, folder: Path) -> None:
    if not expected:
        return
    now = model_fingerprint(model)
    if now is not None and now != expected:
        raise CheckpointError(f"the model at {model} changed since this index was built "
                              f"(weights hash differs); rebuild the index with `cir index`", folder)
