"""The on-disk index: vectors, image names + content hashes, engine and metadata.

Layout of an index folder::

    index.json              metadata; names the current generation's files (written last)
    vectors-<gen>.npy       [N, d], L2-normalised, row i = items[i]; float32, or float16 for the
                            compressed (PQ) kinds, where it only re-ranks candidates
    items-<gen>.json        [{"name": relative posix path, "sha256": hex of the file bytes}]
    engine-<gen>.faiss      approximate engines only (an exact one is rebuilt from the vectors)
    partial/                chunks of a build in progress (deleted when the build completes)

Every file is written atomically and ``index.json`` only after the files it names, so an
interrupted write (``--add`` included) leaves the previous complete index readable. Files of
older generations are deleted once the new ``index.json`` is in place.
"""
from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from ..errors import CheckpointError, ConfigError
from ..fileio import atomic_write, atomic_write_json, read_json, sha256_file  # noqa: F401 (re-exported)

FORMAT = "composed-retrieval-index/1"
META = "index.json"
PARTIAL = "partial"
WRITE_CHUNK = 100_000      # rows copied at a time when writing the vectors file




def stored_path(path: str | Path, folder: Path) -> dict[str, str]:
    """A path kept both absolute and relative to the index folder, so a moved index whose
    model/gallery moved along with it still finds them."""
    absolute = Path(path).absolute()
    return {"path": str(absolute), "relative": os.path.relpath(absolute, folder.absolute())}


def resolve_stored(entry: dict[str, str] | str, folder: Path) -> Path:
    """The absolute path if it exists, else the one relative to the index folder."""
    if isinstance(entry, str):
        return Path(entry)
    absolute = Path(entry["path"])
    if absolute.exists():
        return absolute
    relative = folder / entry.get("relative", "")
    return relative if entry.get("relative") and relative.exists() else absolute


@dataclass
class IndexData:
    """A complete index read back from disk."""

    folder: Path
    meta: dict[str, Any]
    vectors: np.ndarray                      # [N, d] float32 (float16: PQ kinds); maybe memory-mapped
    items: list[dict[str, str]]              # name, sha256; aligned with vectors
    names: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.names = [it["name"] for it in self.items]

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def engine_path(self) -> Path | None:
        name = self.meta.get("files", {}).get("engine")
        return self.folder / name if name else None

    def model_path(self) -> Path:
        return resolve_stored(self.meta["model"], self.folder)

    def gallery_path(self) -> Path:
        return resolve_stored(self.meta["gallery"], self.folder)


def index_exists(folder: str | Path) -> bool:
    return (Path(folder) / META).is_file()


def read_meta(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError("index folder not found (build one with `cir index`)", folder)
    meta = read_json(folder / META, "index metadata")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"not an index of format {FORMAT}", folder / META)
    return meta


def read_index(folder: str | Path, mmap: bool = False) -> IndexData:
    """Read and cross-check an index; any mismatch is a one-line CheckpointError. ``mmap`` maps
    the vectors file read-only instead of reading it (pages are shared between processes and
    only the rows used are read)."""
    folder = Path(folder)
    meta = read_meta(folder)
    files = meta.get("files") or {}
    vec_path, items_path = folder / files.get("vectors", "?"), folder / files.get("items", "?")
    if not vec_path.is_file():
        raise CheckpointError("index vectors file is missing", vec_path)
    try:
        vectors = np.load(vec_path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"unreadable index vectors ({str(exc).splitlines()[0][:200]})", vec_path) from None
    _check_hashes(folder, meta)
    items = read_json(items_path, "index items file")
    if not isinstance(items, list) or not all(isinstance(it, dict) and "name" in it for it in items):
        raise CheckpointError("index items file is not a list of {name, sha256}", items_path)
    dtype = np.dtype(meta.get("vectors_dtype", "float32"))
    if vectors.ndim != 2 or vectors.dtype != dtype:
        raise CheckpointError(f"index vectors must be {dtype} [N, d], got {vectors.dtype} {vectors.shape}", vec_path)
    if vectors.shape[0] != len(items) or len(items) != meta.get("count"):
        raise CheckpointError(f"index is inconsistent: {vectors.shape[0]} vectors, {len(items)} items, "
                              f"count {meta.get('count')} in {META}", folder)
    if vectors.shape[1] != meta.get("dim"):
        raise CheckpointError(f"index vectors have dimension {vectors.shape[1]}, {META} says {meta.get('dim')}", vec_path)
    if not np.isfinite(vectors).all():
        raise CheckpointError("index vectors hold NaN or infinite values; rebuild the index", vec_path)
    return IndexData(folder, meta, vectors, items)


def _check_hashes(folder: Path, meta: dict[str, Any]) -> None:
    """Every file the index is made of against the sha256 ``index.json`` recorded for it: a
    vectors file with its rows permuted would otherwise return wrong names silently. (Indexes
    written before the hashes were recorded have none to check.)"""
    for role, name in (meta.get("files") or {}).items():
        expected = meta.get(f"{role}_sha256")
        path = folder / name
        if expected is not None and path.is_file() and sha256_file(path) != expected:
            raise CheckpointError(f"index {role} file does not match the sha256 recorded in {META} "
                                  f"(replaced, reordered or corrupted); rebuild the index", path)


def write_index(folder: str | Path, vectors: np.ndarray, items: list[dict[str, str]],
                meta: dict[str, Any], engine_writer: Any = None) -> Path:
    """Write a new generation, then ``index.json``, then delete the previous generation.

    ``engine_writer(path)`` writes the FAISS file of an approximate index (None for exact).
    ``vectors`` may be memory-mapped: it is copied in chunks, stored as ``meta["vectors_dtype"]``
    (float32 unless it says float16).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gen = secrets.token_hex(4)
    files = {"vectors": f"vectors-{gen}.npy", "items": f"items-{gen}.json"}
    dtype = np.dtype(meta.get("vectors_dtype", "float32"))

    def save_npy(p: Path) -> None:
        if vectors.ndim != 2 or vectors.shape[0] == 0:
            with open(p, "wb") as fh:
                np.save(fh, np.asarray(vectors, dtype=dtype), allow_pickle=False)
            return
        out = np.lib.format.open_memmap(p, mode="w+", dtype=dtype, shape=vectors.shape)
        for lo in range(0, vectors.shape[0], WRITE_CHUNK):
            out[lo:lo + WRITE_CHUNK] = vectors[lo:lo + WRITE_CHUNK]
        out.flush()
        del out

    atomic_write(folder / files["vectors"], save_npy)
    atomic_write_json(folder / files["items"], items, indent=None)
    hashes = {"vectors_sha256": sha256_file(folder / files["vectors"]),
              "items_sha256": sha256_file(folder / files["items"])}
    if engine_writer is not None:
        files["engine"] = f"engine-{gen}.faiss"
        engine_writer(folder / files["engine"])
        hashes["engine_sha256"] = sha256_file(folder / files["engine"])   # checked when searching
    old = set()
    if index_exists(folder):
        try:
            old = set((read_json(folder / META).get("files") or {}).values())
        except Exception:  # an unreadable old index has nothing worth keeping
            old = set()
    full = {"format": FORMAT, **meta, **hashes, "count": int(vectors.shape[0]),
            "dim": int(vectors.shape[1]) if vectors.ndim == 2 else 0, "files": files}
    atomic_write_json(folder / META, full)
    for name in old - set(files.values()):
        (folder / name).unlink(missing_ok=True)
    return folder


class PartialBuild:
    """Chunks of an interrupted build: each chunk holds the vectors of the images it embedded
    and the images it could not read, keyed by name and content hash, so a rerun skips them."""

    def __init__(self, index_folder: str | Path, tag: str = "") -> None:
        self.folder = Path(index_folder) / PARTIAL
        self.tag = tag   # one per rank of a multi-process build, so ranks never pick one name

    def check_plan(self, plan: dict[str, Any]) -> None:
        """Start a new partial build or verify that the one on disk used the same model/gallery."""
        path = self.folder / "plan.json"
        if self.folder.is_dir() and not path.is_file() and any(
                not (p.name.startswith(".") and p.name.endswith(".tmp")) for p in self.folder.iterdir()):
            # a folder the toolkit did not write (its plan.json is its marker): clear() would
            # delete it, so refuse instead. Another rank's plan.json still being written (its
            # atomic_write temporary) is ours: under load, rank 1 saw rank 0's and refused.
            raise ConfigError(f"{self.folder} exists but was not written by `cir index` (no plan.json); "
                              f"move it away or choose another --out", self.folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise ConfigError(f"{self.folder} is a file, not a partial-build folder; move it away "
                              f"or choose another --out", self.folder)
        if path.is_file():
            old = read_json(path, "partial build plan")
            if old != plan:
                raise ConfigError(
                    f"an interrupted build with another model or gallery is in {self.folder}; "
                    f"rerun with the same --model/--gallery ({old.get('model')}, {old.get('gallery')}) "
                    f"or delete that folder")
        else:
            atomic_write_json(path, plan)

    def chunks(self) -> list[Path]:
        return sorted(self.folder.glob("chunk-*.npz")) if self.folder.is_dir() else []

    def load(self) -> tuple[dict[str, tuple[str, np.ndarray]], dict[str, tuple[str, str]]]:
        """({name: (sha256, vector)}, {name: (sha256, error)}) of every completed chunk."""
        def rows(z: Any, path: Path) -> Callable[[int], np.ndarray]:
            vectors = z["vectors"]           # read once per chunk (NpzFile reads on every access)
            return lambda row: np.asarray(vectors[row], dtype=np.float32)
        return self._scan(rows)

    def locate(self) -> tuple[dict[str, tuple[str, tuple[Path, int]]], dict[str, tuple[str, str]]]:
        """Like :meth:`load` without reading any vector: ({name: (sha256, (chunk file, row))},
        {name: (sha256, error)}), later chunks winning; :meth:`chunk_vectors` reads them."""
        return self._scan(lambda z, path: lambda row: (path, row))

    def _scan(self, rows: Callable[[Any, Path], Callable[[int], Any]]) -> tuple[dict[str, tuple[str, Any]],
                                                                          dict[str, tuple[str, str]]]:
        """Every completed chunk, later chunks winning: ({name: (sha256, rows(chunk, path)(row))},
        {name: (sha256, error)}); an unreadable chunk is a one-line CheckpointError."""
        kept: dict[str, tuple[str, Any]] = {}
        errors: dict[str, tuple[str, str]] = {}
        for path in self.chunks():
            try:
                with np.load(path, allow_pickle=False) as z:
                    value = rows(z, path)
                    for row, (name, h) in enumerate(zip(z["names"].tolist(), z["sha256"].tolist())):
                        kept[name] = (h, value(row))
                    for name, h, e in zip(z["error_names"].tolist(), z["error_sha256"].tolist(),
                                          z["error_messages"].tolist()):
                        errors[name] = (h, e)
            except (OSError, ValueError, KeyError) as exc:
                raise CheckpointError(f"unreadable partial build chunk ({str(exc).splitlines()[0][:200]}); "
                                      f"delete {self.folder} to start over", path) from None
        return kept, errors

    @staticmethod
    def chunk_vectors(path: Path) -> np.ndarray:
        try:
            with np.load(path, allow_pickle=False) as z:
                return np.asarray(z["vectors"], dtype=np.float32)
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"unreadable partial build chunk ({str(exc).splitlines()[0][:200]})", path) from None

    def write_chunk(self, vectors: np.ndarray, names: list[str], hashes: list[str],
                    errors: Iterable[tuple[str, str, str]]) -> Path:
        """``errors``: (name, sha256, message) of the images of this chunk that failed."""
        errors = list(errors)
        number = len(self.chunks())
        suffix = f"-{self.tag}" if self.tag else ""
        path = self.folder / f"chunk-{number:06d}{suffix}.npz"
        while path.exists():
            number += 1
            path = self.folder / f"chunk-{number:06d}{suffix}.npz"
        d = vectors.shape[1] if vectors.ndim == 2 else 0
        arrays = {
            "vectors": np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(names), d),
            "names": np.array(names, dtype=str), "sha256": np.array(hashes, dtype=str),
            "error_names": np.array([e[0] for e in errors], dtype=str),
            "error_sha256": np.array([e[1] for e in errors], dtype=str),
            "error_messages": np.array([e[2] for e in errors], dtype=str),
        }

        def save(p: Path) -> None:
            with open(p, "wb") as fh:
                np.savez(fh, **arrays)

        return atomic_write(path, save)

    def write_shard_record(self, rank: int, world_size: int, record: dict[str, Any]) -> Path:
        """What one rank of a multi-process build found in its shard (hashes, reused, skipped),
        for rank 0 to merge; written after the shard's last chunk."""
        return atomic_write_json(self.folder / f"shard-{rank}-of-{world_size}.json", record, indent=None)

    def read_shard_record(self, rank: int, world_size: int) -> dict[str, Any]:
        return read_json(self.folder / f"shard-{rank}-of-{world_size}.json", "index shard record")

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
