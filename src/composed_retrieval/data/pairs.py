"""Image-caption pairs (CC3M-style exports, the synthetic benchmark's ``pairs/*.tsv``) for
zero-shot training: textual inversion learns from pairs, never from CIR triplets.

File format: one pair per line, ``.tsv`` split on tabs, ``.csv`` on commas (quoted fields as
the csv module reads them). A header is detected when the first row names an image column
(``image``, ``filepath``, ``image_path``, ``path``, ``file``, ``url``...) and a caption column
(``caption``, ``text``, ``title``...), as open_clip's ``--csv-img-key/--csv-caption-key``
exports and the synthetic benchmark write them; without one, the first two columns are
(image, caption). Relative image paths are taken from ``image_root`` when given, else from the
folder that holds the file (the synthetic pairs are relative to the benchmark folder, which is
the parent of ``pairs/``: :func:`pairs_from_config` resolves that).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from torch.utils.data import Dataset

from ..errors import ConfigError, DataError

IMAGE_KEYS = ("image", "filepath", "image_path", "img", "path", "file", "filename", "url", "image_url")
CAPTION_KEYS = ("caption", "text", "title", "captions", "sentence", "alt_text")
DELIMITERS = {".tsv": "\t", ".csv": ","}


@dataclass
class PairSet:
    """Absolute image paths and their captions, in file order."""

    paths: list[Path]
    captions: list[str]
    source: Path

    def __len__(self) -> int:
        return len(self.paths)


def _column(header: list[str], keys: Sequence[str], wanted: str | None) -> int | None:
    names = [h.strip().lower() for h in header]
    for key in ([wanted.lower()] if wanted else list(keys)):
        if key in names:
            return names.index(key)
    return None


def read_pairs(path: str | Path, image_root: str | Path | None = None, limit: int | None = None,
               image_column: str | None = None, caption_column: str | None = None,
               check_images: bool = True) -> PairSet:
    """Read a pair file; every problem is a one-line DataError naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError("pair file not found", path)
    delim = DELIMITERS.get(path.suffix.lower())
    if delim is None:
        raise DataError(f"pair file must end in .tsv or .csv (got {path.suffix or 'no extension'!r})", path)
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.reader(fh, delimiter=delim)]
    rows_numbered = [(i + 1, r) for i, r in enumerate(rows) if any(c.strip() for c in r)]
    if not rows_numbered:
        raise DataError("pair file is empty", path)
    first = rows_numbered[0][1]
    img_col = _column(first, IMAGE_KEYS, image_column)
    cap_col = _column(first, CAPTION_KEYS, caption_column)
    looks_like_header = img_col is not None or cap_col is not None or bool(image_column or caption_column)
    if looks_like_header:
        if img_col is None:
            raise DataError(f"pair file header has no image column (expected {image_column or ' / '.join(IMAGE_KEYS)}); "
                            f"header: {delim.join(first)!r}", path)
        if cap_col is None:
            raise DataError(f"pair file header has no caption column (expected {caption_column or ' / '.join(CAPTION_KEYS)}); "
                            f"header: {delim.join(first)!r}", path)
        body = rows_numbered[1:]
    else:
        img_col, cap_col = 0, 1
        body = rows_numbered
    root = Path(image_root) if image_root is not None else path.parent
    paths: list[Path] = []
    captions: list[str] = []
    need = max(img_col, cap_col) + 1
    for line, row in body:
        if len(row) < need:
            raise DataError(f"line {line} has {len(row)} column(s), expected at least {need} "
                            f"(image{delim!r}caption)", path)
        name, cap = row[img_col].strip(), row[cap_col].strip()
        if not name:
            raise DataError(f"line {line} has an empty image path", path)
        if not cap:
            raise DataError(f"line {line} has an empty caption", path)
        p = Path(name)
        paths.append(p if p.is_absolute() else root / p)
        captions.append(cap)
        if limit is not None and len(paths) >= int(limit):
            break
    if not paths:
        raise DataError("pair file has a header but no pairs", path)
    if check_images:
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise DataError(f"{len(missing)} of {len(paths)} images listed in the pair file do not exist "
                            f"(first: {missing[0]}); set the image root if paths are relative to another folder",
                            path)
    return PairSet(paths, captions, path)


def pairs_from_config(cfg: dict[str, Any], root: str | Path | None = None) -> PairSet:
    """``cfg["pairs"]``: a file path, or {file, image_root, limit, image_column, caption_column};
    None with a synthetic benchmark ``root`` means ``root/pairs/train.tsv`` (paths relative to root)."""
    spec = cfg.get("pairs")
    if spec is None:
        if root is None or not (Path(root) / "pairs" / "train.tsv").is_file():
            raise ConfigError("config field 'pairs' (an image-caption TSV/CSV) is not set, and the dataset "
                              "root has no pairs/train.tsv")
        return read_pairs(Path(root) / "pairs" / "train.tsv", image_root=root)
    if isinstance(spec, (str, Path)):
        spec = {"file": str(spec)}
    if not isinstance(spec, dict) or not spec.get("file"):
        raise ConfigError("config field 'pairs' must be a file path or an object with a 'file'")
    unknown = set(spec) - {"file", "image_root", "limit", "image_column", "caption_column"}
    if unknown:
        raise ConfigError(f"unknown keys in config field 'pairs': {', '.join(sorted(unknown))}")
    file = Path(spec["file"])
    image_root = spec.get("image_root")
    if image_root is None and file.parent.name == "pairs" and (file.parent.parent / "synth.json").is_file():
        image_root = file.parent.parent   # the synthetic benchmark's pairs are relative to its root
    return read_pairs(file, image_root=image_root, limit=spec.get("limit"),
                      image_column=spec.get("image_column"), caption_column=spec.get("caption_column"))


class PairDataset(Dataset):
    """Items shaped like triplets (``reference`` = ``target`` = the image, ``caption``) so the
    shared loop moves and tokenizes them unchanged; the method reads ``reference`` only."""

    def __init__(self, pairs: PairSet, image_fn: Callable[[str], Any]) -> None:
        self.pairs = pairs
        self.image_fn = image_fn
        self.names = [str(p) for p in pairs.paths]

    def set_epoch(self, epoch: int) -> None:  # the loop calls it on every dataset
        pass

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        x = self.image_fn(self.names[index])
        return {"reference": x, "target": x, "caption": self.pairs.captions[index], "index": index}
