"""A user's own data: a JSONL of {reference, caption, target?} and folders of images.

Names are relative POSIX paths under a root folder. Because these names later reach the HTTP
service and the index, a name may never leave its root: absolute paths, '..' parts and symlinks
that resolve outside the root are errors, not warnings.
"""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from ..errors import DataError
from ..fileio import read_jsonl
from .base import CIRSplit
from .checks import check_images_exist, entry_error, field, name_summary
from .images import IMAGE_EXTENSIONS


#: the keys of one line of a user JSONL (a misspelled key is an error, not an ignored field)
USER_KEYS = ("reference", "caption", "target")


def safe_name(name: str) -> str:
    """The normalised relative POSIX form of ``name``, or a ValueError saying why it is unsafe."""
    if not name or "\x00" in name:
        raise ValueError("is empty" if not name else "contains a NUL byte")
    if "\\" in name:
        raise ValueError("contains a backslash (use '/' between folders)")
    p = PurePosixPath(name)
    if p.is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise ValueError("is an absolute path (names are relative to the image folder)")
    if ".." in p.parts:
        raise ValueError("contains '..'")
    parts = [x for x in p.parts if x != "."]
    if not parts:
        raise ValueError("names no file")
    return "/".join(parts)


def _inside(path: Path, root_real: Path) -> bool:
    real = Path(os.path.realpath(path))
    return real == root_real or root_real in real.parents


def list_gallery(folder: str | Path) -> dict[str, Path]:
    """name -> path of every image file under ``folder`` (recursive, sorted by name).

    Names are relative POSIX paths. Hidden files and folders (names starting with '.', e.g.
    macOS '._x.jpg' forks) are not images and are skipped; symlinks are followed only when they
    stay inside the folder, otherwise the gallery is refused.
    """
    root = Path(folder).absolute()
    if not root.is_dir():
        raise DataError("gallery folder not found", root)
    root_real = Path(os.path.realpath(root))
    found: dict[str, Path] = {}
    visited = {root_real}
    stack = [(root, "")]
    while stack:
        directory, prefix = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except PermissionError:
            raise DataError("folder is not readable (permission denied)", directory) from None
        for e in entries:
            if e.name.startswith("."):
                continue
            rel = f"{prefix}{e.name}"
            p = Path(e.path)
            if e.is_symlink() and not _inside(p, root_real):
                raise DataError(f"{rel!r} is a symlink that leads outside the gallery folder {root}")
            if e.is_dir():
                real = Path(os.path.realpath(p))
                if real not in visited:  # a symlink loop or a second link to the same folder
                    visited.add(real)
                    stack.append((p, rel + "/"))
            elif e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                found[rel] = p
    return dict(sorted(found.items()))


def load_user(jsonl: str | Path, image_root: str | Path, gallery_root: str | Path | None = None,
              check_images: bool = True, split: str = "user") -> CIRSplit:
    """Load a user's JSONL; the gallery is every image under ``gallery_root`` (default ``image_root``)."""
    jsonl = Path(jsonl)
    image_root = Path(image_root).absolute()
    if not image_root.is_dir():
        raise DataError("image folder not found", image_root)
    root_real = Path(os.path.realpath(image_root))
    gallery_images = list_gallery(gallery_root if gallery_root is not None else image_root)
    gallery = list(gallery_images)

    rows = read_jsonl(jsonl, "query JSONL file")
    if not rows:
        raise DataError("query JSONL file holds no queries (expected one {\"reference\", \"caption\", "
                        "\"target\"} object per line)", jsonl)
    queries = []
    images: dict[str, Path] = dict(gallery_images)
    query_paths: dict[str, Path] = {}
    for i, row in enumerate(rows):
        q = {"query_id": str(i)}
        if isinstance(row, dict):
            unknown = sorted(set(row) - set(USER_KEYS))
            if unknown:
                raise entry_error(jsonl, i, f"unknown key {unknown[0]!r} (expected keys: {', '.join(USER_KEYS)})")
        for key in USER_KEYS:
            value = field(row, key, str, jsonl, i, optional=(key == "target"))
            if value is None:
                continue
            if key != "caption":
                try:
                    value = safe_name(value)
                except ValueError as exc:
                    raise entry_error(jsonl, i, f"{key} {row[key]!r} {exc}") from None
                path = image_root / value
                if not _inside(path, root_real):
                    raise entry_error(jsonl, i, f"{key} {value!r} resolves outside the image folder {image_root}")
                query_paths.setdefault(value, path)
                images.setdefault(value, path)
            q[key] = value
        queries.append(q)

    if check_images:
        check_images_exist(query_paths, jsonl, image_root)
        if gallery_root is not None:
            differ = [n for n, p in query_paths.items()
                      if n in gallery_images and not os.path.samefile(p, gallery_images[n])]
            if differ:
                raise DataError(f"{len(differ)} names refer to different files under the image folder "
                                f"{image_root} and the gallery folder {gallery_root}: {name_summary(differ)}",
                                jsonl)
    if gallery:  # evaluation needs each target exactly once in the gallery
        for i, q in enumerate(queries):
            if "target" in q and q["target"] not in gallery_images:
                raise entry_error(jsonl, i, f"target {q['target']!r} is not an image of the gallery "
                                            f"{Path(gallery_root or image_root).absolute()}")
    return CIRSplit(dataset="user", split=split, queries=queries, gallery=gallery, images=images,
                    protocol="generic")


def hold_out(split: CIRSplit, fraction: float) -> tuple[CIRSplit, CIRSplit]:
    """(training part, held-out part) of a user split: ``fraction`` of the queries, chosen by a
    hash of their content (so adding lines to the file does not reshuffle the held-out set),
    validate the run instead of the lines it trains on. The gallery is shared."""
    import hashlib
    from dataclasses import replace

    n = len(split.queries)
    count = round(fraction * n)
    if count < 1 or count >= n:
        raise DataError(f"a held-out fraction of {fraction:g} of {n} queries leaves "
                        f"{'no' if count < 1 else 'no training'} queries; use another val_fraction or a val_file")
    def key(q: dict) -> str:
        text = "\x00".join(str(q.get(k, "")) for k in USER_KEYS) + "\x00" + q["query_id"]
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    held = set(sorted(range(n), key=lambda i: key(split.queries[i]))[:count])
    meta = {**split.meta, "val_fraction": fraction}
    train = replace(split, queries=[q for i, q in enumerate(split.queries) if i not in held], meta=dict(meta))
    val = replace(split, queries=[q for i, q in enumerate(split.queries) if i in held], meta=dict(meta))
    return train, val
