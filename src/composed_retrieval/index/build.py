"""Build or update a gallery index: embed every image once, resumably.

Images are embedded in chunks; each finished chunk goes to ``partial/`` atomically, so an
interrupted run (crash, Ctrl-C, power loss) continues where it stopped. Images are matched by
relative path *and* content hash: ``--add`` re-embeds only new or changed files, and a resumed
build never reuses a vector of a file that changed in between.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from ..errors import CheckpointError, ConfigError, DataError
from ..methods.base import CIRMethod
from ..train import distributed
from . import faiss_index
from .search import model_fingerprint
from .store import PartialBuild, index_exists, read_index, sha256_file, stored_path, write_index

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


def _load_method(model: str | Path, device: str) -> CIRMethod:
    from ..train.checkpoint import load_method
    return load_method(model, device=device)


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
    old = read_index(out)
    done_vectors, done_errors = partial.load()
    indexed = {it["name"]: it["sha256"] for it in old.items}
    skipped = {s["name"]: s["error"] for s in old.meta.get("skipped") or []}
    if any(indexed.get(n) != h for n, (h, _) in done_vectors.items()) or any(n not in skipped for n in done_errors):
        return None
    partial.clear()
    return BuildReport(folder=out, count=len(old.names), embedded=0, reused=len(old.names), kind=old.kind,
                       skipped=sorted(skipped.items()), removed=[], changed=[],
                       recall_at_10=old.meta.get("recall_at_10"), seconds=time.perf_counter() - start)


def _merge_shards(partial: PartialBuild, world_size: int, known: dict[str, tuple[str, np.ndarray]]
                  ) -> tuple[dict[str, str], list[tuple[str, str]], list[str], dict[str, np.ndarray], set[str]]:
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
    done_vectors, _ = partial.load()
    known.update(done_vectors)
    for name in embedded + sorted(reused):
        if name not in known or known[name][0] != hashes[name]:
            raise CheckpointError(f"{name}: its vector is missing from the shards written in "
                                  f"{partial.folder}; rerun the same command to resume", partial.folder)
    return hashes, skipped, sorted(changed), {n: known[n][1] for n in embedded}, reused


def build_index(out: str | Path, gallery: str | Path | None = None, model: str | Path | None = None,
                kind: str | None = None, add: bool = False, batch_size: int = 64,
                chunk_size: int = DEFAULT_CHUNK, device: str = "cpu", num_workers: int | None = None,
                params: dict[str, Any] | None = None, recall_target: float = 0.95, progress: bool = True,
                method: CIRMethod | None = None, log: Callable[[str], None] = print) -> BuildReport:
    """Build ``out`` from every image under ``gallery`` with the model at ``model``.

    With ``add=True`` the existing index at ``out`` is updated: unchanged images keep their
    vectors, new or changed ones are embedded, deleted ones leave the index (and are reported);
    ``gallery``/``model`` default to the ones stored in it. ``method`` skips loading the model
    (tests, or callers that already hold it); ``model`` is still the reference stored.
    An IVF engine without a given nprobe gets the smallest one reaching ``recall_target``
    recall@10 against exact search on a sample of gallery vectors.

    Under torchrun (a joined process group) every rank hashes and embeds its contiguous shard
    of the sorted image list into ``partial/`` (resumable like a single build); rank 0 then
    merges the shards into the same index one process would write. Other ranks return a
    report of their shard (``shard`` set, ``count`` 0).
    """
    from ..data.userdata import list_gallery

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
        old = read_index(out)
        gallery = gallery if gallery is not None else old.gallery_path()
        model = model if model is not None else old.model_path()
        for what, given, stored in (("gallery", gallery, old.gallery_path()), ("model", model, old.model_path())):
            if Path(given).resolve() != Path(stored).resolve():
                raise ConfigError(f"--{what} {given} differs from the {what} {stored} this index was "
                                  f"built with; build a new index with --out elsewhere", out)
        kind = kind or old.meta.get("kind_requested", "auto")
    elif add:
        raise ConfigError("no index to add to (run `cir index` without --add first)", out)
    if gallery is None or model is None:
        raise ConfigError("both --gallery and --model are needed to build a new index")
    kind = kind or "auto"
    faiss_index.choose_kind(0, kind)   # validate the name before any work
    gallery, model = Path(gallery), Path(model)

    files = list_gallery(gallery)
    if not files:
        raise DataError("no image files in the gallery folder", gallery)
    if method is None:
        method = _load_method(model, device)
    method.eval()
    transform = method.encoder.image_transform("targetpad")

    ranks = distributed.current()
    partial = PartialBuild(out, tag=f"r{ranks.rank}" if ranks.active else "")
    # the weights' hash too: chunks embedded by a model since retrained at the same path are stale
    partial.check_plan({"model": str(model.resolve()), "gallery": str(gallery.resolve()),
                        "model_weights_sha256": model_fingerprint(model)})
    hashes, skipped = _hash_all(_shard(files, ranks), progress)

    # what is already known: the old index, then chunks of an interrupted run (newer wins)
    known: dict[str, tuple[str, np.ndarray]] = {}
    if old is not None:
        known.update({it["name"]: (it.get("sha256", ""), old.vectors[i]) for i, it in enumerate(old.items)})
    done_vectors, done_errors = partial.load()
    known.update(done_vectors)
    reused_ok = {n for n, h in hashes.items() if n in known and known[n][0] == h}
    failed_before = {n: e for n, (h, e) in done_errors.items() if hashes.get(n) == h and n not in reused_ok}
    changed = sorted(n for n in hashes if n in known and n not in reused_ok)
    todo = [n for n in hashes if n not in reused_ok and n not in failed_before]
    skipped += sorted(failed_before.items())

    fresh: dict[str, np.ndarray] = {}
    with tqdm(total=len(todo), desc="embedding", unit="img", disable=not progress) as bar:
        for lo in range(0, len(todo), chunk_size):
            chunk = todo[lo:lo + chunk_size]
            vectors, kept, errors = _embed_chunk(method, chunk, files.__getitem__, transform,
                                                 batch_size, num_workers, device)
            _refuse_non_finite(vectors, kept, model)
            partial.write_chunk(vectors, kept, [hashes[n] for n in kept],
                                [(n, hashes[n], e) for n, e in errors])
            fresh.update(zip(kept, vectors))
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
    vectors = np.stack([fresh[n] if n in fresh else known[n][1] for n in names]).astype(np.float32)
    items = [{"name": n, "sha256": hashes[n]} for n in names]
    removed = sorted(set(old.names) - set(files)) if old is not None else []
    skipped = sorted(skipped)

    chosen = faiss_index.choose_kind(len(names), kind)
    engine_params = {**faiss_index.default_params(chosen, len(names)), **(params or {})}
    recall = None
    writer = None
    if chosen != "flat":
        log(f"building {chosen} index over {len(names)} vectors")
        engine = faiss_index.build_engine(vectors, chosen, engine_params)
        if chosen == "ivf" and "nprobe" not in (params or {}):
            engine_params["nprobe"], recall = faiss_index.tune_nprobe(
                engine, vectors, target=recall_target, sample=RECALL_SAMPLE)
        else:
            recall = faiss_index.recall_at_k(engine, vectors, k=10, sample=RECALL_SAMPLE)
        log(f"{chosen} recall@10 vs exact search: {recall:.4f} "
            f"({min(RECALL_SAMPLE, len(names))} gallery vectors as queries, params {engine_params})")
        writer = lambda p: faiss_index.save_engine(engine, p)  # noqa: E731
    meta = {
        "model": stored_path(model, out), "gallery": stored_path(gallery, out),
        "model_weights_sha256": model_fingerprint(model),
        "preprocess": "targetpad", "method": method.name,
        "kind": chosen, "kind_requested": kind, "params": engine_params,
        "recall_at_10": recall, "recall_sample": min(RECALL_SAMPLE, len(names)) if recall is not None else None,
        "skipped": [{"name": n, "error": e} for n, e in skipped],
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_index(out, vectors, items, meta, writer)
    partial.clear()
    return BuildReport(folder=out, count=len(names), embedded=len(fresh),
                       reused=len(names) - len(fresh), kind=chosen, skipped=skipped, removed=removed,
                       changed=changed, recall_at_10=recall, seconds=time.perf_counter() - start)

