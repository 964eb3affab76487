"""FAISS engines for normalised gallery vectors: exact, IVF-Flat, HNSW, IVF-PQ, OPQ + IVF-PQ.

Vectors are L2-normalised, so inner product is cosine similarity. Small galleries use exact
search (it is fast enough and has no recall loss); large ones an approximate engine whose recall
against exact search is measured at build time, so a user knows what the speed costs.

Past one machine's RAM the compressed kinds keep ``m`` bytes per vector (product quantisation,
optionally after an OPQ rotation) and are chosen from a memory budget (:func:`plan`). Engines are
trained on a seeded sample and filled in chunks from any ``[N, d]`` array, a memory-mapped
``.npy`` included, so a build never needs every vector in RAM; saved engines are opened
memory-mapped (``faiss.IO_FLAG_MMAP``), so several server processes share one copy in the page
cache. The top candidates of a PQ engine can be re-scored exactly from the stored (float16)
vectors (:func:`search_reranked`), which recovers most of what the compression loses.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable

import faiss
import numpy as np

from ..errors import CheckpointError, ConfigError
from ..fileio import atomic_write

KINDS = ("auto", "flat", "ivf", "hnsw", "ivfpq", "opq-ivfpq")
PQ_KINDS = ("ivfpq", "opq-ivfpq")
IVF_KINDS = ("ivf",) + PQ_KINDS
#: below this many vectors ``auto`` picks exact search
AUTO_FLAT_BELOW = 50_000
#: PQ code sizes (bytes per vector) tried by the memory budget, largest first
PQ_M = (256, 192, 160, 128, 96, 80, 64, 48, 32, 16, 8, 4)
#: vectors added to an engine per call while building (bounds the extra RAM of adding)
ADD_CHUNK = 100_000
#: candidates of a PQ engine re-scored exactly from the stored vectors (0: off)
DEFAULT_RERANK = 100
# HNSW's efSearch ladder stops here: past it a search costs about what IVF-Flat's does
MAX_EF_SEARCH = 1024


def choose_kind(n: int, kind: str = "auto") -> str:
    """The engine for ``n`` vectors without a memory budget: ``auto`` means flat below
    AUTO_FLAT_BELOW, else IVF."""
    if kind not in KINDS:
        raise ConfigError(f"unknown index kind {kind!r}; expected one of {', '.join(KINDS)}")
    if kind != "auto":
        return kind
    return "flat" if n < AUTO_FLAT_BELOW else "ivf"


def _nlist(n: int) -> int:
    return max(1, min(int(4 * math.sqrt(max(n, 1))), max(n // 39, 1)))


def pq_sizes(d: int) -> list[int]:
    """Code sizes ``m`` (bytes per vector at 8 bits) that divide ``d``, largest first."""
    return [m for m in PQ_M if m <= d and d % m == 0] or [1]


def default_params(kind: str, n: int, d: int | None = None) -> dict[str, Any]:
    """Build/search settings for ``n`` vectors (nlist ~ 4 sqrt(n), nprobe a fixed fraction;
    PQ: about d/8 bytes per vector, 8 bits per code, fewer for tiny galleries)."""
    if kind in IVF_KINDS:
        nlist = _nlist(n)
        out: dict[str, Any] = {"nlist": nlist, "nprobe": max(1, min(nlist, max(8, nlist // 16)))}
        if kind in PQ_KINDS:
            # the ladder of tune_nprobe starts low: a PQ index is built to be fast
            out["nprobe"] = max(1, min(nlist, 16))
            sizes = pq_sizes(d or 64)
            out["m"] = next((m for m in sizes if m <= max((d or 64) // 8, 1)), sizes[-1])
            # k-means needs at least 2**nbits training points per sub-quantiser
            out["nbits"] = int(max(1, min(8, math.floor(math.log2(max(n, 2))))))
            out["rerank"] = DEFAULT_RERANK
        return out
    if kind == "hnsw":
        return {"M": 32, "ef_construction": 80, "ef_search": 64}
    return {}


def parse_memory(text: str | int | float) -> int:
    """Bytes from a size such as ``4G``, ``512M``, ``1.5GiB`` or ``2000000000``."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not match:
        raise ConfigError(f"--max-memory must be a size such as 4G, 512M or 1.5GiB, got {text!r}")
    return int(float(match.group(1)) * 1024 ** "_kmgt".index(match.group(2) or "_"))


def sizes(kind: str, n: int, d: int, params: dict[str, Any] | None = None) -> dict[str, int]:
    """Estimated bytes of an index of ``n`` vectors: ``resident`` (what searching keeps in RAM:
    the engine, or the vectors for exact search) and ``disk`` (engine + stored vectors; the
    vectors are float16 for the PQ kinds, float32 otherwise). Item names are not counted."""
    p = {**default_params(kind, n, d), **(params or {})}
    vectors = n * d * (2 if kind in PQ_KINDS else 4)
    if kind == "flat":
        return {"resident": n * d * 4, "disk": vectors}
    if kind == "hnsw":
        engine = n * (4 * d + 8 * int(p["M"]) + 16)
    else:
        centroids = int(p["nlist"]) * d * 4
        if kind == "ivf":
            engine = n * (4 * d + 8) + centroids
        else:
            code = math.ceil(int(p["m"]) * int(p.get("nbits", 8)) / 8)
            engine = n * (code + 8) + centroids + 2 ** int(p.get("nbits", 8)) * d * 4   # codes, ids, codebooks
            if kind == "opq-ivfpq":
                engine += d * d * 4
    return {"resident": engine, "disk": engine + vectors}


def plan(n: int, d: int, kind: str = "auto", max_memory: int | None = None,
         params: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """The engine and its settings for ``n`` vectors of dimension ``d`` under a budget of
    ``max_memory`` bytes resident at search time. ``auto``: the exact (below AUTO_FLAT_BELOW) or
    IVF-Flat engine while it fits, else the largest PQ code that fits, with an OPQ rotation once
    a code byte covers 8 or more dimensions (the rotation matters most at strong compression).
    A PQ kind without a given ``m`` gets the largest code that fits."""
    given = dict(params or {})
    chosen = choose_kind(n, kind)
    if max_memory is None:
        return chosen, {**default_params(chosen, n, d), **given}
    if kind == "auto":
        candidates = [(chosen, {})]
        candidates += [("opq-ivfpq" if d // m >= 8 else "ivfpq", {"m": m}) for m in pq_sizes(d)]
    elif chosen in PQ_KINDS and "m" not in given:
        candidates = [(chosen, {"m": m}) for m in pq_sizes(d)]
    else:
        candidates = [(chosen, {})]
    for cand, extra in candidates:
        p = {**default_params(cand, n, d), **extra, **given}
        if sizes(cand, n, d, p)["resident"] <= max_memory:
            return cand, p
    need = sizes(cand, n, d, p)["resident"]
    raise ConfigError(f"a {cand} index of {n} vectors (d={d}, settings {p}) needs about "
                      f"{need / 2**30:.2f} GiB resident, above --max-memory {max_memory / 2**30:.2f} GiB; "
                      f"raise the budget, pick a smaller code (--pq-m) or use --backend qdrant")


def _as_matrix(vectors: np.ndarray) -> np.ndarray:
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    if v.ndim != 2:
        raise ValueError(f"expected a [N, d] matrix, got shape {v.shape}")
    return v


def new_engine(kind: str, d: int, params: dict[str, Any], seed: int = 0) -> faiss.Index:
    """An empty (untrained) engine of ``kind`` for ``d``-dimensional vectors."""
    if kind == "flat":
        return faiss.IndexFlatIP(d)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, int(params["nlist"]), faiss.METRIC_INNER_PRODUCT)
    elif kind in PQ_KINDS:
        m, nbits = int(params["m"]), int(params.get("nbits", 8))
        if d % m:
            raise ConfigError(f"PQ code size m={m} must divide the dimension {d} (try one of "
                              f"{', '.join(map(str, pq_sizes(d)))})")
        spec = f"IVF{int(params['nlist'])},PQ{m}x{nbits}"
        if kind == "opq-ivfpq":
            spec = f"OPQ{m}," + spec
        index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, int(params["M"]), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(params["ef_construction"])
        index.hnsw.efSearch = int(params["ef_search"])
        return index
    else:
        raise ConfigError(f"unknown index kind {kind!r}; expected one of {', '.join(KINDS[1:])}")
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.cp.seed = seed
    if kind == "opq-ivfpq":     # 20 rotation updates instead of FAISS' 50: most of the gain, 2.5x faster
        faiss.downcast_VectorTransform(index.chain.at(0)).niter = 20
    if kind in PQ_KINDS:
        ivf.pq.cp.seed = seed
        ivf.pq.cp.min_points_per_centroid = 1     # small galleries: no warning per sub-quantiser
        ivf.do_polysemous_training = False        # minutes of training for a code we never use as such
    return index


def train_sample(vectors: Any, size: int, seed: int = 0) -> np.ndarray:
    """A seeded sample of ``size`` rows (all rows if fewer), read in row order (a memory-mapped
    file is read once, front to back)."""
    n = vectors.shape[0]
    if n <= size:
        return _as_matrix(vectors[:])
    rows = np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
    out = np.empty((size, vectors.shape[1]), dtype=np.float32)
    for lo in range(0, size, ADD_CHUNK):
        out[lo:lo + ADD_CHUNK] = vectors[rows[lo:lo + ADD_CHUNK]]
    return out


def train_engine(vectors: Any, kind: str, params: dict[str, Any], seed: int = 0,
                 sample: int = 100_000) -> faiss.Index:
    """An empty engine, trained (IVF kinds) on a seeded sample of ``vectors``."""
    n, d = vectors.shape
    index = new_engine(kind, d, params, seed)
    if kind in IVF_KINDS:
        nlist = int(params["nlist"])
        if n < nlist:
            raise ConfigError(f"an IVF index with {nlist} lists needs at least {nlist} vectors, got {n}")
        if kind in PQ_KINDS and n < 2 ** int(params.get("nbits", 8)):
            raise ConfigError(f"a PQ code of {params.get('nbits', 8)} bits needs at least "
                              f"{2 ** int(params.get('nbits', 8))} vectors to train, got {n}")
        size = max(sample, 40 * nlist)                 # FAISS asks for >= 39 points per list
        if kind in PQ_KINDS:
            size = max(size, 64 * 2 ** int(params.get("nbits", 8)))
        index.train(train_sample(vectors, size, seed))
    return index


def _add_chunk(index: faiss.Index, block: np.ndarray) -> None:
    index.add(block)


def add_vectors(index: faiss.Index, vectors: Any, chunk: int | None = None,
                on_chunk: Callable[[int], None] | None = None) -> faiss.Index:
    """Add the rows of ``vectors`` (any [N, d] array, e.g. a memory-mapped file) ``chunk``
    (default ADD_CHUNK) at a time, converted to float32 one chunk at a time."""
    n = vectors.shape[0]
    chunk = int(chunk or ADD_CHUNK)
    for lo in range(0, n, chunk):
        _add_chunk(index, _as_matrix(vectors[lo:lo + chunk]))
        if on_chunk is not None:
            on_chunk(min(lo + chunk, n))
    return index


def build_engine(vectors: Any, kind: str, params: dict[str, Any] | None = None,
                 seed: int = 0, train_sample: int = 100_000) -> faiss.Index:
    """A FAISS index over ``vectors`` (row i has id i). IVF kinds train on a seeded sample so
    that build time stays bounded on millions of vectors; rows are added in chunks."""
    n, d = vectors.shape
    params = {**default_params(kind, n, d), **(params or {})}
    index = train_engine(vectors, kind, params, seed, train_sample)
    if n:
        add_vectors(index, vectors)
    set_search_params(index, params)
    return index


def set_search_params(index: faiss.Index, params: dict[str, Any]) -> None:
    """Apply search-time settings (nprobe / ef_search) stored with the index or given by a user."""
    if not isinstance(index, faiss.Index):       # MappedFlat: exact, nothing to set
        return
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and "nprobe" in params:
        ivf.nprobe = int(params["nprobe"])
    if hasattr(index, "hnsw") and "ef_search" in params:
        index.hnsw.efSearch = int(params["ef_search"])


def search(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores and row ids ``[Q, k']`` with k' = min(k, ntotal); ids of missing hits are -1."""
    q = _as_matrix(queries)
    k = max(1, min(int(k), index.ntotal))
    return index.search(q, k)


class MappedFlat:
    """Exact inner-product search straight over a (memory-mapped) float32 ``[N, d]`` array, so
    that server processes share the vectors file's pages instead of each copying it into an
    ``IndexFlatIP``; same scores and order as ``IndexFlatIP``."""

    def __init__(self, vectors: np.ndarray) -> None:
        if vectors.dtype != np.float32 or not vectors.flags.c_contiguous:
            vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.vectors = vectors
        self.ntotal, self.d = int(vectors.shape[0]), int(vectors.shape[1])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return faiss.knn(_as_matrix(queries), self.vectors, int(k), metric=faiss.METRIC_INNER_PRODUCT)


def search_reranked(index: Any, vectors: Any, queries: np.ndarray, k: int,
                    rerank: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` after re-scoring the engine's top ``max(rerank, k)`` candidates exactly with the
    stored vectors (any dtype, e.g. float16 memory-mapped): what a PQ code's approximate scores
    mis-order among the candidates is put right; what it left out is not."""
    q = _as_matrix(queries)
    k = max(1, min(int(k), index.ntotal))
    if rerank <= 0:
        return index.search(q, k)
    _, cand = index.search(q, max(int(rerank), k))
    scores = np.full((len(q), k), -np.inf, dtype=np.float32)
    ids = np.full((len(q), k), -1, dtype=np.int64)
    for i in range(len(q)):
        rows = cand[i][cand[i] >= 0]
        if not len(rows):
            continue
        order = np.argsort(rows)                       # read the file in row order
        exact = np.asarray(vectors[rows[order]], dtype=np.float32) @ q[i]
        top = np.argsort(-exact, kind="stable")[:k]
        scores[i, :len(top)], ids[i, :len(top)] = exact[top], rows[order][top]
    return scores, ids


def exact_topk(queries: np.ndarray, vectors: Any, k: int, chunk: int = ADD_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of ``queries`` over ``vectors`` read ``chunk`` rows at a time (a 10M-row
    memory-mapped file is never copied whole)."""
    q = _as_matrix(queries)
    n = vectors.shape[0]
    k = min(k, n)
    best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(q), 0), dtype=np.int64)
    for lo in range(0, n, chunk):
        block = _as_matrix(vectors[lo:lo + chunk])
        s, i = faiss.knn(q, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        best_s, best_i = np.hstack([best_s, s]), np.hstack([best_i, i + lo])
        order = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)
    return best_s, best_i


SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


class RecallProbe:
    """Exact top-k of a seeded sample of gallery vectors used as queries, computed once, so that
    several settings of an approximate engine can be scored against it."""

    def __init__(self, vectors: Any, k: int = 10, sample: int = 1000, seed: int = 0) -> None:
        self.vectors = vectors
        n = self.vectors.shape[0]
        self.k = min(k, n)
        rng = np.random.default_rng(seed)
        self.rows = np.sort(rng.choice(n, min(sample, n), replace=False)) if n else np.zeros(0, np.int64)
        self.queries = _as_matrix(self.vectors[self.rows]) if n else np.zeros((0, vectors.shape[1]), np.float32)
        if n:
            self.exact_scores, self.exact_ids = exact_topk(self.queries, self.vectors, self.k)

    def recall(self, index: faiss.Index | SearchFn) -> float:
        """Mean fraction of the exact top-k that ``index`` (an engine or a ``search(q, k)``
        function) returns (a returned id scoring as high as the exact k-th counts as a hit, so
        ties are not misses)."""
        if len(self.rows) == 0:
            return 1.0
        fn = index if callable(index) and not hasattr(index, "ntotal") else index.search
        _, approx_ids = fn(self.queries, self.k)
        hits = 0
        for i in range(len(self.rows)):
            truth = set(self.exact_ids[i].tolist())
            found = [j for j in approx_ids[i].tolist() if j >= 0]
            kth = self.exact_scores[i, -1]
            tied = [j for j in found if j not in truth
                    and float(np.asarray(self.vectors[j], dtype=np.float32) @ self.queries[i]) >= kth - 1e-6]
            hits += min(self.k, len(truth.intersection(found)) + len(tied))
        return hits / (len(self.rows) * self.k)


def recall_at_k(index: faiss.Index | SearchFn, vectors: Any, k: int = 10, sample: int = 1000,
                seed: int = 0) -> float:
    """Recall@k of ``index`` against exact search, with a seeded sample of gallery vectors as
    queries."""
    return RecallProbe(vectors, k, sample, seed).recall(index)


def tune_ladder(set_value: Callable[[int], None], start: int, stop: int, score: Callable[[], float],
                target: float) -> tuple[int, float]:
    """Smallest value in a doubling ladder from ``start`` (capped at ``stop``) whose score
    reaches ``target``; the value is left set."""
    value = max(1, min(int(start), int(stop)))
    while True:
        set_value(value)
        got = score()
        if got >= target or value >= stop:
            return value, got
        value = min(value * 2, int(stop))


def tune_nprobe(index: faiss.Index, vectors: Any, target: float = 0.95, k: int = 10,
                sample: int = 1000, seed: int = 0, search_fn: SearchFn | None = None) -> tuple[int, float]:
    """Smallest nprobe in a doubling ladder (from the current one) whose recall@k on a sample of
    gallery vectors reaches ``target``; returns (nprobe, recall) and leaves it set. How many
    lists are needed depends on how clustered the embeddings are, so it is measured.
    ``search_fn`` scores another search path over ``index`` (re-ranking)."""
    ivf = faiss.extract_index_ivf(index)
    probe = RecallProbe(vectors, k, sample, seed)
    return tune_ladder(lambda v: setattr(ivf, "nprobe", v), int(ivf.nprobe), int(ivf.nlist),
                       lambda: probe.recall(search_fn or index), target)


def tune_ef_search(index: faiss.Index, vectors: Any, target: float = 0.95, k: int = 10,
                   sample: int = 1000, seed: int = 0, limit: int = MAX_EF_SEARCH) -> tuple[int, float]:
    """HNSW's counterpart of ``tune_nprobe``: the smallest efSearch in a doubling ladder (from
    the current one, at least k) whose recall@k reaches ``target``, at most ``limit``. A fixed
    efSearch reaches a different recall on every gallery (0.91 at 1M x 256, 0.85 at 1M x 640
    in docs/search.md), so it is measured like nprobe."""
    probe = RecallProbe(vectors, k, sample, seed)
    return tune_ladder(lambda v: setattr(index.hnsw, "efSearch", v), max(int(index.hnsw.efSearch), k), limit,
                       lambda: probe.recall(index), target)


def save_engine(index: faiss.Index, path: str | Path) -> Path:
    return atomic_write(path, lambda p: faiss.write_index(index, str(p)))


def load_engine(path: str | Path, mmap: bool = False) -> faiss.Index:
    """Read a saved engine; ``mmap`` maps an IVF engine's inverted lists (the codes) from the
    file read-only instead of reading them, so start-up is instant and processes share them."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("FAISS index file is missing", path)
    try:
        if mmap:
            try:
                return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
            except RuntimeError:
                pass   # kinds FAISS cannot map (HNSW): read normally
        return faiss.read_index(str(path))
    except RuntimeError as exc:
        raise CheckpointError(f"unreadable FAISS index ({str(exc).splitlines()[0][:200]})", path) from None
