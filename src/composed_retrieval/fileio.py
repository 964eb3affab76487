"""Atomic writes and strict reads, so a crash never leaves a half-written file behind."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import DataError

def _umask() -> int:
    """The process umask, read without changing it where /proc allows (threads may be writing)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and rename the result over ``path`` only once it is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        # mkstemp makes 0600; a file the toolkit writes gets the mode open() would give it
        os.chmod(tmp_path, 0o666 & ~_umask())
        write(tmp_path)
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        if exc.errno is None:   # numpy's short write on a full disk: "N requested and M written"
            raise OSError(errno.EIO, f"writing failed, is the disk full? ({_first_line(exc)})", str(path)) from None
        if exc.filename is None:   # name the file the user asked for, not our temporary
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
        raise
    except Exception as exc:
        tmp_path.unlink(missing_ok=True)
        code = _write_failure(exc)
        if code is not None:   # torch's serializer ("enforce fail ... unexpected pos"), safetensors' I/O error
            reason = os.strerror(code) if code != errno.EIO else "writing failed, is the disk full?"
            raise OSError(code, f"{reason} ({_first_line(exc)})", str(path)) from None
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] or type(exc).__name__


def _write_failure(exc: BaseException) -> int | None:
    """The errno of a library's failed write that is not an OSError, or None if it is not one."""
    import re

    text = str(exc)
    found = re.search(r"os error (\d+)", text)
    if found:
        return int(found.group(1))
    if any(s in text for s in ("PytorchStreamWriter", "unexpected pos", "file write failed", "inline_container")):
        return errno.EIO
    return None


def sha256_file(path: str | Path) -> str:
    """Content hash of a file, read in blocks (checkpoints, caches and galleries share it)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def read_text(path: str | Path, what: str = "text file") -> str:
    """A UTF-8 text file, or a one-line DataError for a missing or non-UTF-8 file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found", path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{what} is not UTF-8 text ({exc.reason} at byte {exc.start})", path) from None


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """object_pairs_hook: a repeated key is an error (json keeps the last one silently)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return out


def parse_json(text: str) -> Any:
    """Strict JSON: duplicate keys and nesting past the interpreter's recursion limit raise
    ValueError with the reason (a pre-scan of the depth would cost as much as the parse)."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise ValueError(f"duplicate key {exc.args[0]!r}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise ValueError("nested too deeply (past the parser's recursion limit)") from None


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """Read JSON, turning a missing file, a syntax error, a duplicate key or absurd nesting
    into a one-line DataError."""
    path = Path(path)
    text = read_text(path, what)
    try:
        return parse_json(text)
    except ValueError as exc:
        raise DataError(f"malformed {what}: {exc}", path) from None


def read_jsonl(path: str | Path, what: str = "JSONL file") -> list[Any]:
    path = Path(path)
    rows = []
    lines = read_text(path, what).splitlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(parse_json(line))
        except ValueError as exc:
            raise DataError(f"malformed {what} at line {lineno}: {str(exc).split(' at line ')[0]}", path) from None
    return rows


def check_keys(row: dict[str, Any], allowed: tuple[str, ...] | set[str], where: str, path: str | Path) -> None:
    """Refuse keys a format does not define (a misspelled 'targte' would otherwise be ignored)."""
    unknown = sorted(set(row) - set(allowed))
    if unknown:
        raise DataError(f"{where}: unknown key {unknown[0]!r} (expected keys: {', '.join(allowed)})", path)
