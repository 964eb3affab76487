"""CIRR loader: ``captions/cap.rc2.{split}.json`` + ``image_splits/split.rc2.{split}.json``.

The synthetic benchmark writes this exact format too (its extra splits, e.g. ``heldout``, load
by name), so every path downstream is the one real CIRR data takes. An entry may carry
``caption_choices`` (``cir spn generate``'s triplets: one text per template): training draws
one of them each time the triplet is read, evaluation reads ``caption``.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .base import CIRSplit
from .userdata import safe_name
from .checks import (copy_edit_type, check_images_exist, check_part, entry_error, field, generated_texts,
                     read_json_as, require_known, str_list, unique_ids)


def cirr_files(root: str | Path, split: str) -> tuple[Path, Path]:
    """(caption file, split file) of one CIRR split."""
    root = Path(root)
    check_part(split, "CIRR split")
    return (root / "captions" / f"cap.rc2.{split}.json",
            root / "image_splits" / f"split.rc2.{split}.json")


def load_cirr(root: str | Path, split: str, image_root: str | Path | None = None,
              check_images: bool = True) -> CIRSplit:
    """Load one CIRR split; targets are required except on ``test*`` splits (test1 has none)."""
    root = Path(root)
    cap_path, split_path = cirr_files(root, split)
    image_root = Path(image_root if image_root is not None else root).absolute()
    split_rel = f"image_splits/{split_path.name}"

    relpaths = read_json_as(split_path, dict, "CIRR image split file")
    images: dict[str, Path] = {}
    for name, rel in relpaths.items():
        if not isinstance(rel, str) or not rel:
            raise DataError(f"image {name!r}: path must be a non-empty string, found {rel!r}", split_path)
        try:  # a path may not leave the image root ('..', absolute paths)
            rel = safe_name(rel)
        except ValueError as exc:
            raise DataError(f"image {name!r}: path {rel!r} {exc}", split_path) from None
        images[name] = image_root / rel
    gallery = list(relpaths)

    entries = read_json_as(cap_path, list, "CIRR caption file")
    needs_target = not split.startswith("test")
    queries = []
    for i, e in enumerate(entries):
        pairid = field(e, "pairid", int, cap_path, i)
        reference = field(e, "reference", str, cap_path, i)
        caption = field(e, "caption", str, cap_path, i)
        target = field(e, "target_hard", str, cap_path, i, optional=not needs_target)
        img_set = field(e, "img_set", dict, cap_path, i)
        members = str_list(img_set, "members", cap_path, i)
        require_known(reference, images, "reference", split_rel, cap_path, i)
        if target is not None:
            require_known(target, images, "target", split_rel, cap_path, i)
        for m in members:
            require_known(m, images, "img_set member", split_rel, cap_path, i)
        if reference not in members:
            raise entry_error(cap_path, i, f"img_set members do not include the reference {reference!r}")
        q = {"query_id": str(pairid), "reference": reference, "caption": caption,
             "subset": [m for m in members if m != reference]}
        choices = generated_texts(e, cap_path, i)   # generated (SPN) triplets: drawn when read
        if choices:
            q["caption_choices"] = choices
        if target is not None:
            q["target"] = target
        copy_edit_type(e, q, cap_path, i)
        queries.append(q)
    unique_ids((q["query_id"] for q in queries), cap_path, "pairid")

    if check_images:
        check_images_exist(images, split_path, image_root)
    return CIRSplit(dataset="cirr", split=split, queries=queries, gallery=gallery, images=images,
                    protocol="cirr")
