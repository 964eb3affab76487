"""Validation shared by the dataset loaders, so that every bad entry reads the same way.

Every error is one line naming the file and the entry index, e.g.
``.../cap.rc2.val.json: entry 17: target 'x' is not in image_splits/split.rc2.val.json``.
Missing images are checked with one directory listing per folder (no per-image decode,
no per-image stat), which keeps 100k-image galleries fast.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import DataError
from ..fileio import read_json

#: how many missing names an error message lists before summarising the rest
MAX_NAMES_IN_MESSAGE = 20
_SAFE_PART = re.compile(r"^[A-Za-z0-9_.\-]+$")


def check_part(value: str, what: str) -> str:
    """A split or category name that goes into a file name: no separators, no '..'."""
    if not isinstance(value, str) or not _SAFE_PART.match(value) or value in (".", ".."):
        raise DataError(f"{what} {value!r} is not a valid name (letters, digits, '_', '-', '.')")
    return value


def read_json_as(path: Path, kind: type, what: str) -> Any:
    """Read a JSON file and require its top-level type (list or dict)."""
    data = read_json(path, what)
    if not isinstance(data, kind):
        expected = "a list" if kind is list else "an object"
        raise DataError(f"{what} must be {expected} at the top level, found {_type_name(data)}", path)
    return data


def entry_error(path: Path, index: int, message: str) -> DataError:
    return DataError(f"entry {index}: {message}", path)


def field(entry: Any, name: str, kind: type | tuple[type, ...], path: Path, index: int,
          optional: bool = False) -> Any:
    """``entry[name]`` checked for presence and type (bool never counts as int)."""
    if not isinstance(entry, dict):
        raise entry_error(path, index, f"expected an object, found {_type_name(entry)}")
    if name not in entry:
        if optional:
            return None
        raise entry_error(path, index, f"missing field '{name}'")
    value = entry[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        wanted = " or ".join(_kind_name(k) for k in kinds)
        raise entry_error(path, index, f"field '{name}' must be {wanted}, found {_type_name(value)}")
    return value


def str_list(entry: dict, name: str, path: Path, index: int, length: int | None = None,
             optional: bool = False) -> list[str] | None:
    value = field(entry, name, list, path, index, optional=optional)
    if value is None:
        return None
    if not all(isinstance(v, str) for v in value) or (length is not None and len(value) != length):
        shape = f"a list of {length} strings" if length is not None else "a list of strings"
        raise entry_error(path, index, f"field '{name}' must be {shape}, found {value!r:.80}")
    return value


def copy_edit_type(entry: dict, query: dict, path: Path, index: int) -> None:
    """The entry's optional ``edit_type`` (the synthetic benchmark writes one; real CIRR and
    FashionIQ files have none) into the query, for per-type recall."""
    kind = field(entry, "edit_type", str, path, index, optional=True)
    if kind is not None:
        query["edit_type"] = kind


def generated_texts(entry: dict, path: Path, index: int) -> list[str] | None:
    """A generated triplet's texts (SPN positives: one per template), of which training draws
    one each time the triplet is read; None for an ordinary entry."""
    value = str_list(entry, "caption_choices", path, index, optional=True)
    if value is not None and (not value or not all(v.strip() for v in value)):
        raise entry_error(path, index, f"field 'caption_choices' must be a non-empty list of non-empty "
                                       f"strings, found {value!r:.80}")
    return value


def int_list(entry: dict, name: str, path: Path, index: int) -> list[int]:
    value = field(entry, name, list, path, index)
    if not value or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise entry_error(path, index, f"field '{name}' must be a non-empty list of integers, found {value!r:.80}")
    return value


def require_known(name: str, known: Mapping[str, Any] | set[str], role: str, listed_in: str,
                  path: Path, index: int) -> None:
    if name not in known:
        raise entry_error(path, index, f"{role} {name!r} is not in {listed_in}")


def unique_ids(ids: Iterable[str], path: Path, field_name: str) -> None:
    seen: dict[str, int] = {}
    for i, qid in enumerate(ids):
        if qid in seen:
            raise entry_error(path, i, f"{field_name} {qid} repeats entry {seen[qid]}")
        seen[qid] = i


def missing_files(paths: Mapping[str, Path]) -> list[str]:
    """Names whose file does not exist, using one ``scandir`` per distinct parent folder."""
    listings: dict[Path, set[str]] = {}
    missing = []
    for name, p in paths.items():
        parent = p.parent
        files = listings.get(parent)
        if files is None:
            files = listings[parent] = _files_in(parent)
        if p.name not in files:
            missing.append(name)
    return missing


def check_images_exist(paths: Mapping[str, Path], listed_in: str | Path, root: Path) -> None:
    """Raise one DataError listing (by name and count) every image that is not on disk."""
    missing = missing_files(paths)
    if missing:
        raise DataError(
            f"{len(missing)} image{'s' if len(missing) != 1 else ''} listed in {listed_in} "
            f"{'are' if len(missing) != 1 else 'is'} missing under {root}: {name_summary(missing)}")


def name_summary(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_NAMES_IN_MESSAGE])
    more = len(names) - MAX_NAMES_IN_MESSAGE
    return shown + (f" ... and {more} more" if more > 0 else "")


def _files_in(folder: Path) -> set[str]:
    try:
        with os.scandir(folder) as it:
            return {e.name for e in it if e.is_file()}
    except (FileNotFoundError, NotADirectoryError):
        return set()
    except PermissionError:
        raise DataError("folder is not readable (permission denied)", folder) from None


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _kind_name(kind: type) -> str:
    return {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
            bool: "a boolean"}.get(kind, kind.__name__)
