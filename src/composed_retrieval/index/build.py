"""Build or update a gallery index: embed every image once, resumably.

Images are embedded in chunks; each finished chunk goes to ``partial/`` atomically, so an
interrupted run (crash, Ctrl-C, power loss) continues where it stopped. Images are matched by
relative path *and* content hash: ``--add`` re-embeds only new or changed files, and a resumed
build never reuses a vector of a file that changed in between.

No step holds every vector in RAM: embedded vectors live in the chunk files, the final vectors
file is assembled from them (and the old index, memory-mapped) one chunk at a time, and the
engine is trained on a sample and filled in chunks from that file. A trained engine is kept in
``partial/`` until the build completes, so a build killed while adding resumes without training
again.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from ..errors import CheckpointError, ConfigError, DataError
from ..fileio import atomic_write_text
from ..methods.base import CIRMethod
from ..train import distributed
from . import faiss_index
from .hits import model_fingerprint, model_key, stored_model
from .store import PartialBuild, index_exists, read_index, sha256_file, stored_path, write_index

Where = tuple  # ("old", row) in the previous index, or (chunk file, row) in partial/

DEFAULT_CHUNK = 512
RECALL_SAMPLE = 1000


@dataclass
class BuildReport:
    folder: Path
    count: int                               # vectors in the finished index
    embedded: int                            # images embedded by this run
    reused: int                              # vectors taken from the old index or partial chunks
    kind: str
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (name, error)
    removed: list[str] = field(default_factory=list)               # in the old index, gone now
    changed: list[str] = field(default_factory=list)               # re-embedded (content changed)
    recall_at_10: float | None = None
    seconds: float = 0.0
    shard: str | None = None                 # "rank/world" on a rank other than 0 of a torchrun build


def gallery_and_method(gallery: Path, model: Any, method: CIRMethod | None,
                       device: str) -> tuple[Any, CIRMethod, Callable]:
    """What every engine's build starts from: the gallery's image files (none is an error), the
    model in eval mode, and its gallery preprocessing."""
    from ..data.userdata import list_gallery
    files = list_gallery(gallery)
    if not files:
        raise DataError("no image files in the gallery folder", gallery)
    if method is None:
        method = _load_method(model, device)
    method.eval()
    return files, method, method.encoder.image_transform("targetpad")


def _load_method(model: Any, device: str) -> CIRMethod:
    from ..train.models import load_model
    return load_model(model, device=device)


def _embed_chunk(method: CIRMethod, names: list[str], path_of: Callable[[str], Path],
                 transform: Callable, batch_size: int, num_workers: int | None,
                 device: str) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """Gallery vectors of ``names`` (the readable ones) plus (name, error) of the others."""
    from ..encoders.embed import embed_images
    feats, kept, errors = embed_images(method.encoder, names, path_of, transform=transform,
                                       batch_size=batch_size, num_workers=num_workers,
                                       device=device, progress=False, skip_bad=True)
    errors = [(e[0], e[1]) if isinstance(e, (tuple, list)) else (e["name"], e["error"]) for e in errors]
    if not kept:
        return np.zeros((0, 0), np.float32), [], errors
    with torch.no_grad():
        vectors = method.gallery_embedding(method.image_features(feats.to(device)))
    return vectors.float().cpu().numpy(), list(kept), errors


def _refuse_non_finite(vectors: np.ndarray, names: list[str], model: Path) -> None:
    """A model with NaN weights embeds every image as NaN; indexing that would make every
    search return nothing (or garbage) while reporting success."""
    bad = ~np.isfinite(vectors).all(axis=1) if vectors.size else np.zeros(0, bool)
    if bad.any():
        first = names[int(np.flatnonzero(bad)[0])]
        raise CheckpointError(f"the model gives NaN or infinite embeddings for {int(bad.sum())} of "
                              f"{len(names)} images (first: {first}); its weights are damaged or "
                              f"diverged, nothing of this chunk was indexed", model)


def _hash_all(files: dict[str, Path], progress: bool) -> tuple[dict[str, str], list[tuple[str, str]]]:
    hashes, bad = {}, []
    for name, path in tqdm(files.items(), desc="hashing", unit="img", disable=not progress,
                           total=len(files), leave=False):
        try:
            hashes[name] = sha256_file(path)
        except OSError as exc:
            bad.append((name, f"{path}: not readable ({exc.strerror or type(exc).__name__})"))
    return hashes, bad


def _shard(files: dict[str, Path], ranks: distributed.DistInfo) -> dict[str, Path]:
    """This rank's contiguous slice of the (name-sorted) gallery; all of it for one process."""
    if not ranks.active:
        return files
    names = list(files)
    lo, hi = distributed.shard_bounds(len(names), ranks.rank, ranks.world_size)
    return {n: files[n] for n in names[lo:hi]}


def _finished_build(out: Path, start: float) -> BuildReport | None:
    """A build killed after writing its index but before clearing ``partial/`` is complete: a
    rerun of the same command clears the leftovers and reports the index instead of refusing.
    Leftovers that hold anything the index lacks (an interrupted ``--add``) are not touched."""
    partial = PartialBuild(out)
    if not partial.folder.is_dir():
        return None
    old = read_index(out, mmap=True)
    done_vectors, done_errors = partial.locate()
    indexed = {it["name"]: it["sha256"] for it in old.items}
    skipped = {s["name"]: s["error"] for s in old.meta.get("skipped") or []}
    if any(indexed.get(n) != h for n, (h, _) in done_vectors.items()) or any(n not in skipped for n in done_errors):
        return None
    partial.clear()
    return BuildReport(folder=out, count=len(old.names), embedded=0, reused=len(old.names), kind=old.kind,
                       skipped=sorted(skipped.items()), removed=[], changed=[],
                       recall_at_10=old.meta.get("recall_at_10"), seconds=time.perf_counter() - start)


def _merge_shards(partial: PartialBuild, world_size: int, known: dict[str, tuple[str, Where]]
                  ) -> tuple[dict[str, str], list[tuple[str, str]], list[str], dict[str, Where], set[str]]:
    """Rank 0: every shard's hashes, skips and changes, and the vectors the shards embedded
    (read back from their chunks) -- the inputs a single-process build would hold here."""
    hashes: dict[str, str] = {}
    skipped: list[tuple[str, str]] = []
    changed: list[str] = []
    embedded: list[str] = []
    reused: set[str] = set()
    for rank in range(world_size):
        rec = partial.read_shard_record(rank, world_size)
        hashes.update(rec["hashes"])
        skipped += [(n, e) for n, e in rec["skipped"]]
        changed += rec["changed"]
        embedded += rec["embedded"]
        reused.update(rec["reused"])
    done_vectors, _ = partial.locate()
    known.update(done_vectors)
    for name in embedded + sorted(reused):
        if name not in known or known[name][0] != hashes[name]:
            raise CheckpointError(f"{name}: its vector is missing from the shards written in "
                                  f"{partial.folder}; rerun the same command to resume", partial.folder)
    return hashes, skipped, sorted(changed), {n: known[n][1] for n in embedded}, reused


def build_index(out: str | Path, gallery: str | Path | None = None, model: Any = None,
                kind: str | None = None, add: bool = False, batch_size: int = 64,
                chunk_size: int = DEFAULT_CHUNK, device: str = "cpu", num_workers: int | None = None,
                params: dict[str, Any] | None = None, recall_target: float = 0.95, progress: bool = True,
                method: CIRMethod | None = None, log: Callable[[str], None] = print,
                max_memory: int | None = None) -> BuildReport:
    """Build ``out`` from every image under ``gallery`` with the model at ``model`` (a run or
    checkpoint folder, or a ``train.models.ModelSpec``: a pretrained encoder + training-free method).

    With ``add=True`` the existing index at ``out`` is updated: unchanged images keep their
    vectors, new or changed ones are embedded, deleted ones leave the index (and are reported);
    ``gallery``/``model`` default to the ones stored in it. ``method`` skips loading the model
    (tests, or callers that already hold it); ``model`` is still the reference stored.
    An IVF engine without a given nprobe gets the smallest one reaching ``recall_target``
    recall@10 against exact search on a sample of gallery vectors. ``max_memory`` (bytes
    resident when searching) picks the engine and PQ code size (:func:`faiss_index.plan`).

    Under torchrun (a joined process group) every rank hashes and embeds its contiguous shard
    of the sorted image list into ``partial/`` (resumable like a single build); rank 0 then
    merges the shards into the same index one process would write. Other ranks return a
    report of their shard (``shard`` set, ``count`` 0).
    """

    start = time.perf_counter()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError("--out names an existing file; an index is a folder", out)
    old = None
    if index_exists(out):
        if not add:
            finished = _finished_build(out, start)
            if finished is not None:
                return finished
            raise ConfigError(f"{out} already holds an index; pass --add to add new or changed "
                              f"images to it, or choose another --out")
        old = read_index(out, mmap=True)
        gallery = gallery if gallery is not None else old.gallery_path()
        model = model if model is not None else stored_model(old)
        if Path(gallery).resolve() != old.gallery_path().resolve():
            raise ConfigError(f"--gallery {gallery} differs from the gallery {old.gallery_path()} this index was "
                              f"built with; build a new index with --out elsewhere", out)
        if model_key(model) != model_key(stored_model(old)):
            raise ConfigError(f"the model {model_key(model)} differs from the model {model_key(stored_model(old))} "
                              f"this index was built with; build a new index with --out elsewhere", out)
        kind = kind or old.meta.get("kind_requested", "auto")
        # keep the budget and the PQ code size the index was built with
        max_memory = max_memory if max_memory is not None else old.meta.get("max_memory")
        if old.kind in faiss_index.PQ_KINDS and "m" in (old.meta.get("params") or {}) and "m" not in (params or {}) \
                and kind in (old.kind, old.meta.get("kind_requested")) and old.meta.get("max_memory") is None:
            params = {**(params or {}), "m": old.meta["params"]["m"]}
    elif add:
        raise ConfigError("no index to add to (run `cir index` without --add first)", out)
    if gallery is None or model is None:
        raise ConfigError("--gallery and a model (--model RUN, or --encoder SPEC --method M) are needed "
                          "to build a new index")
    kind = kind or "auto"
    faiss_index.choose_kind(0, kind)   # validate the name before any work
    from ..train.models import ModelSpec, describe_model, parse_source
    gallery, model = Path(gallery), parse_source(model)

    files, method, transform = gallery_and_method(gallery, model, method, device)

    ranks = distributed.current()
    partial = PartialBuild(out, tag=f"r{ranks.rank}" if ranks.active else "")
    # the weights' hash too: chunks embedded by a model since retrained at the same path are stale
    partial.check_plan({"model": model_key(model), "gallery": str(gallery.resolve()),
                        "model_weights_sha256": model_fingerprint(model) if isinstance(model, (str, Path)) else None})
    hashes, skipped = _hash_all(_shard(files, ranks), progress)

    # what is already known: the old index, then chunks of an interrupted run (newer wins)
    known: dict[str, tuple[str, Where]] = {}
    if old is not None:
        known.update({it["name"]: (it.get("sha256", ""), ("old", i)) for i, it in enumerate(old.items)})
    done_vectors, done_errors = partial.locate()
    known.update(done_vectors)
    reused_ok = {n for n, h in hashes.items() if n in known and known[n][0] == h}
    failed_before = {n: e for n, (h, e) in done_errors.items() if hashes.get(n) == h and n not in reused_ok}
    changed = sorted(n for n in hashes if n in known and n not in reused_ok)
    todo = [n for n in hashes if n not in reused_ok and n not in failed_before]
    skipped += sorted(failed_before.items())

    fresh: dict[str, Where] = {}            # embedded by this run: where its chunk holds it
    with tqdm(total=len(todo), desc="embedding", unit="img", disable=not progress) as bar:
        for lo in range(0, len(todo), chunk_size):
            chunk = todo[lo:lo + chunk_size]
            vectors, kept, errors = _embed_chunk(method, chunk, files.__getitem__, transform,
                                                 batch_size, num_workers, device)
            _refuse_non_finite(vectors, kept, model)
            path = partial.write_chunk(vectors, kept, [hashes[n] for n in kept],
                                       [(n, hashes[n], e) for n, e in errors])
            fresh.update((n, (path, row)) for row, n in enumerate(kept))
            skipped += errors
            bar.update(len(chunk))

    if ranks.active:
        partial.write_shard_record(ranks.rank, ranks.world_size, {
            "hashes": hashes, "skipped": skipped, "changed": changed,
            "embedded": list(fresh), "reused": sorted(reused_ok)})
        distributed.barrier()   # every shard is in partial/
        if not ranks.is_main:
            return BuildReport(folder=out, count=0, embedded=len(fresh), reused=len(reused_ok), kind="shard",
                               skipped=sorted(skipped), changed=changed, seconds=time.perf_counter() - start,
                               shard=f"{ranks.rank}/{ranks.world_size}")
        hashes, skipped, changed, fresh, reused_ok = _merge_shards(partial, ranks.world_size, known)

    names = [n for n in files if n in fresh or n in reused_ok]
    if not names:
        raise DataError(f"none of the {len(files)} images could be read (first: {skipped[0][1]})", gallery)
    where = {n: fresh[n] if n in fresh else known[n][1] for n in names}
    items = [{"name": n, "sha256": hashes[n]} for n in names]
    removed = sorted(set(old.names) - set(files)) if old is not None else []
    skipped = sorted(skipped)

    dim = _dimension(where, old)
    chosen, engine_params = faiss_index.plan(len(names), dim, kind, max_memory, params)
    dtype = np.float16 if chosen in faiss_index.PQ_KINDS else np.float32
    vectors = _assemble(partial, names, where, old, dim, dtype)
    recall = None
    writer = None
    if chosen != "flat":
        log(f"building {chosen} index over {len(names)} vectors")
        engine = _trained_engine(partial, vectors, items, chosen, engine_params, log)
        faiss_index.add_vectors(engine, vectors)
        faiss_index.set_search_params(engine, engine_params)
        rerank = int(engine_params.get("rerank", 0)) if chosen in faiss_index.PQ_KINDS else 0
        search_fn = (lambda q, k: faiss_index.search_reranked(engine, vectors, q, k, rerank)) if rerank else None
        tuned = None                       # the search parameter tuned to recall_target, if any
        if chosen in faiss_index.IVF_KINDS and "nprobe" not in (params or {}):
            tuned = "nprobe"
            engine_params["nprobe"], recall = faiss_index.tune_nprobe(
                engine, vectors, target=recall_target, sample=RECALL_SAMPLE, search_fn=search_fn)
        elif chosen == "hnsw" and "ef_search" not in (params or {}):
            tuned = "ef_search"
            engine_params["ef_search"], recall = faiss_index.tune_ef_search(
                engine, vectors, target=recall_target, sample=RECALL_SAMPLE)
        else:
            recall = faiss_index.recall_at_k(search_fn or engine, vectors, k=10, sample=RECALL_SAMPLE)
        log(f"{chosen} recall@10 vs exact search: {recall:.4f} "
            f"({min(RECALL_SAMPLE, len(names))} gallery vectors as queries, params {engine_params})")
        if tuned and recall < recall_target:
            # the ladder stopped at its top (every list, or efSearch MAX_EF_SEARCH): say so, once
            hint = ("a larger ef_construction or M, or --kind ivfpq" if chosen == "hnsw"
                    else "--rerank with more candidates, a larger --pq-m, or --kind ivf" if chosen in faiss_index.PQ_KINDS
                    else "more training vectors")
            log(f"warning: recall@10 {recall:.4f} is below --recall-target {recall_target:g} even at "
                f"{tuned} {engine_params[tuned]}; try {hint}")
        writer = lambda p: faiss_index.save_engine(engine, p)  # noqa: E731
    spec = model if isinstance(model, ModelSpec) else None
    meta = {
        "model": None if spec else stored_path(model, out), "gallery": stored_path(gallery, out),
        **({"model_spec": spec.to_json()} if spec else {}),
        "model_weights_sha256": None if spec else model_fingerprint(model),
        "model_description": describe_model(method),
        "preprocess": "targetpad", "method": method.name,
        "kind": chosen, "kind_requested": kind, "params": engine_params,
        "vectors_dtype": np.dtype(dtype).name, "max_memory": max_memory,
        "recall_at_10": recall, "recall_sample": min(RECALL_SAMPLE, len(names)) if recall is not None else None,
        "skipped": [{"name": n, "error": e} for n, e in skipped],
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_index(out, vectors, items, meta, writer)
    partial.clear()
    return BuildReport(folder=out, count=len(names), embedded=len(fresh),
                       reused=len(names) - len(fresh), kind=chosen, skipped=skipped, removed=removed,
                       changed=changed, recall_at_10=recall, seconds=time.perf_counter() - start)



def _dimension(where: dict[str, Where], old: Any) -> int:
    if old is not None and old.vectors.ndim == 2 and old.vectors.shape[1]:
        return int(old.vectors.shape[1])
    path = next(src for src, _ in where.values() if src != "old")
    return int(PartialBuild.chunk_vectors(path).shape[1])


def _assemble(partial: PartialBuild, names: list[str], where: dict[str, Where], old: Any, dim: int,
              dtype: Any) -> np.ndarray:
    """The index's vectors in ``names`` order, written to a memory-mapped file in ``partial/``
    from the old index and the chunk files one source chunk at a time (never all in RAM)."""
    partial.folder.mkdir(parents=True, exist_ok=True)
    path = partial.folder / "assembled.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(len(names), dim))
    by_source: dict[Any, tuple[list[int], list[int]]] = {}
    for pos, name in enumerate(names):
        src, row = where[name]
        rows = by_source.setdefault(src, ([], []))
        rows[0].append(pos)
        rows[1].append(row)
    for src, (positions, rows) in by_source.items():
        pos_a, row_a = np.asarray(positions), np.asarray(rows)
        if src == "old":
            for lo in range(0, len(pos_a), faiss_index.ADD_CHUNK):
                sel = slice(lo, lo + faiss_index.ADD_CHUNK)
                order = np.argsort(row_a[sel])
                out[pos_a[sel][order]] = old.vectors[row_a[sel][order]]
        else:
            out[pos_a] = PartialBuild.chunk_vectors(src)[row_a]
    out.flush()
    return out


def _trained_engine(partial: PartialBuild, vectors: np.ndarray, items: list[dict[str, str]], kind: str,
                    params: dict[str, Any], log: Callable[[str], None]) -> Any:
    """An empty trained engine: the one a killed run of the same build left in ``partial/``, or
    a new one (trained on a sample of ``vectors``), kept there before any vector is added."""
    digest = hashlib.sha256(json.dumps({"kind": kind, "dim": int(vectors.shape[1]), "params": {
        k: v for k, v in params.items() if k not in ("nprobe", "rerank")}}, sort_keys=True).encode())
    for it in items:                  # the same images with the same content: the same sample
        digest.update(f"{it['name']}\0{it['sha256']}\n".encode())
    key = digest.hexdigest()
    path, key_path = partial.folder / "trained.faiss", partial.folder / "trained.key"
    if path.is_file() and key_path.is_file() and key_path.read_text().strip() == key:
        engine = faiss_index.load_engine(path)
        if engine.ntotal == 0:
            log("reusing the engine trained by the interrupted build")
            return engine
    engine = faiss_index.train_engine(vectors, kind, params)
    faiss_index.save_engine(engine, path)
    atomic_write_text(key_path, key)
    return engine
