"""A Qdrant collection as the gallery index, for galleries past one machine.

Qdrant (an existing distributed vector engine: sharding, replication, on-disk vectors,
quantisation) stores the vectors; the index folder keeps only ``index.json`` naming the
collection, the model and the gallery, so `cir search` and `cir serve` open it like a FAISS
folder (:func:`search.open_index`) and query it through the same :class:`search.VectorIndex`
interface.

Each image is one point: id = a UUID derived from (name, content sha256), payload = name,
sha256 and the model fingerprint. Upserting the same point twice is a no-op, so a build killed
at any moment resumes by asking the collection which ids it already holds and embedding only
the others; ``--add`` does the same and deletes the points of files that changed or left the
folder. ``URL_OR_PATH`` is ``http(s)://host:port`` for a server or cluster (API key from the
environment variable ``QDRANT_API_KEY``), a folder for Qdrant's embedded local mode (one
process at a time; what the tests use), or ``:memory:``.
"""
from __future__ import annotations

import atexit
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm import tqdm

from ..errors import CheckpointError, ConfigError, DataError
from ..fileio import atomic_write_json
from .hits import Exclusion, Hit, model_fingerprint
from .store import FORMAT, META, index_exists, read_meta, resolve_stored, stored_path

UPSERT_BATCH = 256           # points per upsert request
SCAN_BATCH = 1024            # points per scroll / retrieve request
NAMESPACE = uuid.UUID("6b1f4f0e-3c55-4d1e-9a53-c1d0a0c1e520")

#: collection settings and their defaults (applied when the collection is created)
DEFAULT_SETTINGS: dict[str, Any] = {
    "hnsw_m": 16, "hnsw_ef_construct": 100, "hnsw_ef": 128, "on_disk": False,
    "quantization": "none", "shards": 1, "replicas": 1, "on_disk_payload": True,
}
QUANTIZATION = ("none", "int8", "binary", "pq")

_clients: dict[str, Any] = {}


def point_id(name: str, sha256: str) -> str:
    """The point of one gallery file: the same (name, content) always gives the same id."""
    return str(uuid.uuid5(NAMESPACE, f"{name}\0{sha256}"))


def _location_key(location: str) -> str:
    if location == ":memory:" or location.startswith(("http://", "https://")):
        return location
    return str(Path(location).absolute())


def connect(location: str) -> Any:
    """A client for a server URL, a local-mode folder or ``:memory:``, one per location and
    process (local mode allows one client per folder; ``:memory:`` lives in its client)."""
    from qdrant_client import QdrantClient
    key = _location_key(location)
    if not _clients:
        atexit.register(_close_all)
    if key not in _clients:
        if key == ":memory:":
            _clients[key] = QdrantClient(location=":memory:")
        elif key.startswith(("http://", "https://")):
            _clients[key] = QdrantClient(url=key, api_key=os.environ.get("QDRANT_API_KEY") or None)
        else:
            Path(key).mkdir(parents=True, exist_ok=True)
            try:
                _clients[key] = QdrantClient(path=key)
            except RuntimeError as exc:  # another process holds the local-mode folder
                raise ConfigError(f"Qdrant folder {key} is in use by another process "
                                  f"({str(exc).splitlines()[0][:160]}); local mode serves one "
                                  f"process: run a Qdrant server for several") from None
    return _clients[key]


def _close_all() -> None:
    for key in list(_clients):
        close(key)


def close(location: str) -> None:
    """Release a local-mode folder (its lock) in this process."""
    client = _clients.pop(_location_key(location), None)
    if client is not None:
        client.close()


def _is_local(location: str) -> bool:
    return not location.startswith(("http://", "https://"))


def check_settings(settings: dict[str, Any]) -> dict[str, Any]:
    out = {**DEFAULT_SETTINGS, **{k: v for k, v in settings.items() if v is not None}}
    unknown = set(out) - set(DEFAULT_SETTINGS)
    if unknown:
        raise ConfigError(f"unknown Qdrant setting(s) {', '.join(sorted(unknown))}")
    if out["quantization"] not in QUANTIZATION:
        raise ConfigError(f"--qdrant-quantization must be one of {', '.join(QUANTIZATION)}, got {out['quantization']!r}")
    for key in ("hnsw_m", "hnsw_ef_construct", "hnsw_ef", "shards", "replicas"):
        if int(out[key]) < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be at least 1, got {out[key]}")
    return out


def _ensure_collection(client: Any, name: str, dim: int, settings: dict[str, Any], model_id: str,
                       local: bool) -> None:
    from qdrant_client import models
    if client.collection_exists(name):
        info = client.get_collection(name)
        size = info.config.params.vectors.size
        if size != dim:
            raise ConfigError(f"Qdrant collection {name!r} holds {size}-d vectors, this model gives "
                              f"{dim}-d ones; pick another --collection")
        sample, _ = client.scroll(name, limit=1, with_payload=["model"])
        if sample and sample[0].payload.get("model") != model_id:
            raise ConfigError(f"Qdrant collection {name!r} was filled by another model "
                              f"({sample[0].payload.get('model')}); pick another --collection")
        return
    quant = {
        "none": None,
        "int8": models.ScalarQuantization(scalar=models.ScalarQuantizationConfig(
            type=models.ScalarType.INT8, always_ram=True)),
        "binary": models.BinaryQuantization(binary=models.BinaryQuantizationConfig(always_ram=True)),
        "pq": models.ProductQuantization(product=models.ProductQuantizationConfig(
            compression=models.CompressionRatio.X16, always_ram=True)),
    }[settings["quantization"]]
    client.create_collection(
        name, vectors_config=models.VectorParams(size=dim, distance=models.Distance.DOT,
                                                 on_disk=bool(settings["on_disk"])),
        hnsw_config=models.HnswConfigDiff(m=int(settings["hnsw_m"]), ef_construct=int(settings["hnsw_ef_construct"])),
        quantization_config=quant, shard_number=int(settings["shards"]),
        replication_factor=int(settings["replicas"]), on_disk_payload=bool(settings["on_disk_payload"]))
    if not local:
        for field in ("name", "sha256"):   # filters by name/hash (left-out references) stay fast
            client.create_payload_index(name, field, models.PayloadSchemaType.KEYWORD)


def _existing(client: Any, collection: str) -> dict[str, str]:
    """{point id: name} of every point in the collection (scrolled, payload only)."""
    out: dict[str, str] = {}
    offset = None
    while True:
        points, offset = client.scroll(collection, limit=SCAN_BATCH, offset=offset, with_payload=["name"])
        out.update((str(p.id), p.payload.get("name", "")) for p in points)
        if offset is None:
            return out


def _upsert(client: Any, collection: str, vectors: np.ndarray, names: list[str], hashes: list[str],
            model_id: str) -> None:
    from qdrant_client import models
    for lo in range(0, len(names), UPSERT_BATCH):
        client.upsert(collection, wait=True, points=[
            models.PointStruct(id=point_id(n, h), vector=v.tolist(), payload={"name": n, "sha256": h, "model": model_id})
            for n, h, v in zip(names[lo:lo + UPSERT_BATCH], hashes[lo:lo + UPSERT_BATCH], vectors[lo:lo + UPSERT_BATCH])])


def build_qdrant_index(out: str | Path, location: str | None, collection: str | None,
                       gallery: str | Path | None = None, model: str | Path | None = None,
                       add: bool = False, settings: dict[str, Any] | None = None, batch_size: int = 64,
                       chunk_size: int = 512, device: str = "cpu", num_workers: int | None = None,
                       progress: bool = True, method: Any = None,
                       log: Callable[[str], None] = print) -> Any:
    """Embed every image under ``gallery`` into the Qdrant ``collection`` at ``location`` and
    write the index folder ``out`` (its index.json) once the collection is complete.

    Rerunning after a kill resumes (points already in the collection are skipped); ``add``
    updates a finished index: new or changed files are embedded, points of changed or deleted
    files are removed. Returns a :class:`build.BuildReport`."""
    from .build import BuildReport, _embed_chunk, _hash_all, gallery_and_method

    start = time.perf_counter()
    out = Path(out)
    old: dict[str, Any] | None = None
    if index_exists(out):
        if not add:
            raise ConfigError(f"{out} already holds an index; pass --add to add new or changed "
                              f"images to it, or choose another --out")
        old = read_meta(out)
        if old.get("backend") != "qdrant":
            raise ConfigError(f"{out} is a FAISS index; --backend qdrant needs its own --out", out)
        location = location or old["qdrant"]
        collection = collection or old["collection"]
        gallery = gallery if gallery is not None else resolve_stored(old["gallery"], out)
        model = model if model is not None else resolve_stored(old["model"], out)
        for what, given, stored in (("gallery", gallery, resolve_stored(old["gallery"], out)),
                                    ("model", model, resolve_stored(old["model"], out))):
            if Path(given).resolve() != Path(stored).resolve():
                raise ConfigError(f"--{what} {given} differs from the {what} {stored} this index was "
                                  f"built with; build a new index with --out elsewhere", out)
        settings = {**old.get("settings", {}), **(settings or {})}
    elif add:
        raise ConfigError("no index to add to (run `cir index` without --add first)", out)
    if not location or not collection:
        raise ConfigError("--backend qdrant needs --qdrant URL_OR_PATH and --collection NAME")
    if gallery is None or model is None:
        raise ConfigError("both --gallery and --model are needed to build a new index")
    settings = check_settings(settings or {})
    gallery, model = Path(gallery), Path(model)
    files, method, transform = gallery_and_method(gallery, model, method, device)
    model_id = model_fingerprint(model) or f"path:{model.resolve()}"

    hashes, skipped = _hash_all(files, progress)
    wanted = {point_id(n, h): n for n, h in hashes.items()}
    client = connect(location)
    have = _existing(client, collection) if client.collection_exists(collection) else {}
    old_names = set(have.values())
    todo = [n for n in hashes if point_id(n, hashes[n]) not in have]
    changed = sorted(n for n in todo if n in old_names)
    dim, embedded = None, 0
    with tqdm(total=len(todo), desc="embedding", unit="img", disable=not progress) as bar:
        for lo in range(0, len(todo), chunk_size):
            chunk = todo[lo:lo + chunk_size]
            vectors, kept, errors = _embed_chunk(method, chunk, files.__getitem__, transform,
                                                 batch_size, num_workers, device)
            skipped += errors
            if kept:
                if not np.isfinite(vectors).all():
                    raise DataError("the model produced non-finite gallery vectors; nothing of this "
                                    "chunk was stored", gallery)
                if dim is None:
                    dim = int(vectors.shape[1])
                    _ensure_collection(client, collection, dim, settings, model_id, _is_local(location))
                _upsert(client, collection, vectors, kept, [hashes[n] for n in kept], model_id)
                embedded += len(kept)
            bar.update(len(chunk))
    if not client.collection_exists(collection):
        raise DataError(f"none of the {len(files)} images could be read (first: {skipped[0][1]})", gallery)
    stale = [pid for pid in have if pid not in wanted]
    if stale:
        from qdrant_client import models
        for lo in range(0, len(stale), SCAN_BATCH):
            client.delete(collection, points_selector=models.PointIdsList(points=stale[lo:lo + SCAN_BATCH]), wait=True)
    removed = sorted(old_names - set(files))
    count = client.count(collection, exact=True).count
    dim = dim or int(client.get_collection(collection).config.params.vectors.size)
    skipped = sorted(skipped)
    meta = {
        "format": FORMAT, "backend": "qdrant", "qdrant": location if not _is_local(location) or location == ":memory:"
        else str(Path(location).absolute()), "collection": collection, "settings": settings,
        "model": stored_path(model, out), "gallery": stored_path(gallery, out),
        "model_weights_sha256": model_fingerprint(model), "model_id": model_id,
        "preprocess": "targetpad", "method": method.name, "kind": "qdrant", "count": int(count), "dim": dim,
        "skipped": [{"name": n, "error": e} for n, e in skipped],
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(out / META, meta)
    return BuildReport(folder=out, count=int(count), embedded=embedded, reused=int(count) - embedded,
                       kind="qdrant", skipped=skipped, removed=removed, changed=changed,
                       seconds=time.perf_counter() - start)


class QdrantIndex:
    """A Qdrant collection behind the :class:`search.VectorIndex` interface. The names (for
    paging the gallery and checking a requested name) are read once at open; a left-out
    reference becomes a ``must_not`` filter, so the collection returns exactly k hits."""

    def __init__(self, folder: Path, meta: dict[str, Any], search_params: dict[str, Any] | None = None) -> None:
        self.folder, self.meta = folder, meta
        self.location, self.collection = meta["qdrant"], meta["collection"]
        self.client = connect(self.location)
        if not self.client.collection_exists(self.collection):
            raise CheckpointError(f"Qdrant collection {self.collection!r} not found at {self.location}", folder)
        settings = {**DEFAULT_SETTINGS, **(meta.get("settings") or {})}
        self.hnsw_ef = int((search_params or {}).get("ef_search") or settings["hnsw_ef"])
        self.quantized = settings.get("quantization", "none") != "none"
        names = sorted(_existing(self.client, self.collection).values())
        self.names = names
        self._known = set(names)
        self._dim = int(meta["dim"])

    @classmethod
    def open(cls, folder: str | Path, search_params: dict[str, Any] | None = None) -> "QdrantIndex":
        folder = Path(folder)
        return cls(folder, read_meta(folder), search_params)

    @property
    def dim(self) -> int:
        return self._dim

    def __len__(self) -> int:
        return len(self.names)

    def contains(self, name: str) -> bool:
        return name in self._known

    def model_path(self) -> Path:
        return resolve_stored(self.meta["model"], self.folder)

    def gallery_path(self) -> Path:
        return resolve_stored(self.meta["gallery"], self.folder)

    def search(self, queries: np.ndarray, k: int, exclude: Sequence[Exclusion] | None = None) -> list[list[Hit]]:
        from qdrant_client import models
        params = None if _is_local(self.location) else models.SearchParams(   # local mode: exact anyway
            hnsw_ef=self.hnsw_ef, quantization=models.QuantizationSearchParams(
                rescore=True, oversampling=2.0) if self.quantized else None)
        requests = []
        for i, q in enumerate(np.asarray(queries, dtype=np.float32)):
            name, sha = exclude[i] if exclude else (None, None)
            must_not = [models.FieldCondition(key=key, match=models.MatchValue(value=value))
                        for key, value in (("name", name), ("sha256", sha)) if value]
            requests.append(models.QueryRequest(query=q.tolist(), limit=int(k), params=params, with_payload=["name"],
                                                filter=models.Filter(must_not=must_not) if must_not else None))
        responses = self.client.query_batch_points(self.collection, requests=requests)
        return [[Hit(r + 1, p.payload["name"], float(p.score)) for r, p in enumerate(resp.points)]
                for resp in responses]
