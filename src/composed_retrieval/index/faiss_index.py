"""FAISS engines for normalised gallery vectors: exact inner product, IVF-Flat or HNSW.

Vectors are L2-normalised, so inner product is cosine similarity. Small galleries use exact
search (it is fast enough and has no recall loss); large ones an approximate engine whose recall
against exact search is measured at build time, so a user knows what the speed costs.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from ..errors import CheckpointError, ConfigError
from ..fileio import atomic_write

KINDS = ("auto", "flat", "ivf", "hnsw")
#: below this many vectors ``auto`` picks exact search
AUTO_FLAT_BELOW = 50_000


def choose_kind(n: int, kind: str = "auto") -> str:
    """The engine for ``n`` vectors: ``auto`` means flat below AUTO_FLAT_BELOW, else IVF."""
    if kind not in KINDS:
        raise ConfigError(f"unknown index kind {kind!r}; expected one of {', '.join(KINDS)}")
    if kind != "auto":
        return kind
    return "flat" if n < AUTO_FLAT_BELOW else "ivf"


def default_params(kind: str, n: int) -> dict[str, Any]:
    """Build/search settings for ``n`` vectors (nlist ~ 4 sqrt(n), nprobe a fixed fraction)."""
    if kind == "ivf":
        nlist = max(1, min(int(4 * math.sqrt(max(n, 1))), max(n // 39, 1)))
        return {"nlist": nlist, "nprobe": max(1, min(nlist, max(8, nlist // 16)))}
    if kind == "hnsw":
        return {"M": 32, "ef_construction": 80, "ef_search": 64}
    return {}


def _as_matrix(vectors: np.ndarray) -> np.ndarray:
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    if v.ndim != 2:
        raise ValueError(f"expected a [N, d] matrix, got shape {v.shape}")
    return v


def build_engine(vectors: np.ndarray, kind: str, params: dict[str, Any] | None = None,
                 seed: int = 0, train_sample: int = 100_000) -> faiss.Index:
    """A FAISS index over ``vectors`` (row i has id i). IVF trains on a seeded sample so that
    build time stays bounded on millions of vectors."""
    v = _as_matrix(vectors)
    n, d = v.shape
    params = {**default_params(kind, n), **(params or {})}
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = int(params["nlist"])
        if n < nlist:
            raise ConfigError(f"an IVF index with {nlist} lists needs at least {nlist} vectors, got {n}")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        rng = np.random.default_rng(seed)
        size = max(train_sample, 40 * nlist)           # FAISS asks for >= 39 points per list
        sample = v if n <= size else v[np.sort(rng.choice(n, size, replace=False))]
        index.train(sample)
        index.nprobe = int(params["nprobe"])
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, int(params["M"]), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(params["ef_construction"])
        index.hnsw.efSearch = int(params["ef_search"])
    else:
        raise ConfigError(f"unknown index kind {kind!r}; expected one of flat, ivf, hnsw")
    if n:
        index.add(v)
    return index


def set_search_params(index: faiss.Index, params: dict[str, Any]) -> None:
    """Apply search-time settings (nprobe / ef_search) stored with the index or given by a user."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and "nprobe" in params:
        ivf.nprobe = int(params["nprobe"])
    if hasattr(index, "hnsw") and "ef_search" in params:
        index.hnsw.efSearch = int(params["ef_search"])


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores and row ids ``[Q, k']`` with k' = min(k, ntotal); ids of missing hits are -1."""
    q = _as_matrix(queries)
    k = max(1, min(int(k), index.ntotal))
    return index.search(q, k)


class RecallProbe:
    """Exact top-k of a seeded sample of gallery vectors used as queries, computed once, so that
    several settings of an approximate engine can be scored against it."""

    def __init__(self, vectors: np.ndarray, k: int = 10, sample: int = 1000, seed: int = 0) -> None:
        self.vectors = _as_matrix(vectors)
        n = self.vectors.shape[0]
        self.k = min(k, n)
        rng = np.random.default_rng(seed)
        self.rows = np.sort(rng.choice(n, min(sample, n), replace=False)) if n else np.zeros(0, np.int64)
        self.queries = self.vectors[self.rows]
        if n:
            exact = faiss.IndexFlatIP(self.vectors.shape[1])
            exact.add(self.vectors)
            self.exact_scores, self.exact_ids = exact.search(self.queries, self.k)

    def recall(self, index: faiss.Index) -> float:
        """Mean fraction of the exact top-k that ``index`` returns (a returned id scoring as high
        as the exact k-th counts as a hit, so ties are not misses)."""
        if len(self.rows) == 0:
            return 1.0
        _, approx_ids = index.search(self.queries, self.k)
        hits = 0
        for i in range(len(self.rows)):
            truth = set(self.exact_ids[i].tolist())
            found = [j for j in approx_ids[i].tolist() if j >= 0]
            kth = self.exact_scores[i, -1]
            tied = [j for j in found if j not in truth and float(self.vectors[j] @ self.queries[i]) >= kth - 1e-6]
            hits += min(self.k, len(truth.intersection(found)) + len(tied))
        return hits / (len(self.rows) * self.k)


def recall_at_k(index: faiss.Index, vectors: np.ndarray, k: int = 10, sample: int = 1000,
                seed: int = 0) -> float:
    """Recall@k of ``index`` against exact search, with a seeded sample of gallery vectors as
    queries."""
    return RecallProbe(vectors, k, sample, seed).recall(index)


def tune_nprobe(index: faiss.Index, vectors: np.ndarray, target: float = 0.95, k: int = 10,
                sample: int = 1000, seed: int = 0) -> tuple[int, float]:
    """Smallest nprobe in a doubling ladder (from the current one) whose recall@k on a sample of
    gallery vectors reaches ``target``; returns (nprobe, recall) and leaves it set. How many
    lists are needed depends on how clustered the embeddings are, so it is measured."""
    ivf = faiss.extract_index_ivf(index)
    probe = RecallProbe(vectors, k, sample, seed)
    nprobe = max(1, int(ivf.nprobe))
    while True:
        ivf.nprobe = nprobe
        recall = probe.recall(index)
        if recall >= target or nprobe >= ivf.nlist:
            return nprobe, recall
        nprobe = min(nprobe * 2, int(ivf.nlist))


def save_engine(index: faiss.Index, path: str | Path) -> Path:
    return atomic_write(path, lambda p: faiss.write_index(index, str(p)))


def load_engine(path: str | Path) -> faiss.Index:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("FAISS index file is missing", path)
    try:
        return faiss.read_index(str(path))
    except RuntimeError as exc:
        raise CheckpointError(f"unreadable FAISS index ({str(exc).splitlines()[0][:200]})", path) from None
