"""FashionIQ loader: ``captions/cap.{cat}.{split}.json``, ``image_splits/split.{cat}.{split}.json``,
``images/<name>.<ext>`` with the extension detected from the files (releases differ: png or jpg).

Each entry has two captions; a named *caption policy* turns them into the query text. The
strings follow the CLIP4Cir public code exactly (``str.strip('.?, ')`` and ``str.capitalize()``,
which also lower-cases the rest of the first caption), so scores are comparable with it.

Entries written by ``cir spn generate`` carry ``caption_choices`` (one modification text per
SPN template). The policy never concatenates them: "eval" reads the first, "random" draws one
each time the triplet is read (SPN4CIR, ``clip4cir/data_utils.py``: ``random.choice`` for the
generated triplets, its "c1 and c2" variants only for the original ones).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError, DataError
from .base import CIRSplit
from .checks import (copy_edit_type, check_images_exist, check_part, field, generated_texts, read_json_as,
                     require_known, str_list)
from .images import IMAGE_EXTENSIONS, detect_extension

FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")
CAPTION_POLICIES = ("eval", "random")
_STRIP = ".?, "


def fashioniq_files(root: str | Path, split: str, category: str) -> tuple[Path, Path]:
    """(caption file, split file) of one FashionIQ category and split."""
    root = Path(root)
    check_part(split, "FashionIQ split")
    check_part(category, "FashionIQ category")
    return (root / "captions" / f"cap.{category}.{split}.json",
            root / "image_splits" / f"split.{category}.{split}.json")


def eval_caption(c1: str, c2: str) -> str:
    """The deterministic evaluation query: "C1 and c2"."""
    return f"{c1.strip(_STRIP).capitalize()} and {c2.strip(_STRIP)}"


def caption_choices(c1: str, c2: str) -> list[str]:
    """The four training-time variants (CLIP4Cir): c1 and c2, c2 and c1, c1, c2."""
    a, b = c1.strip(_STRIP), c2.strip(_STRIP)
    return [f"{a.capitalize()} and {b}", f"{b.capitalize()} and {a}", a.capitalize(), b.capitalize()]


def load_fashioniq(root: str | Path, split: str, category: str, image_root: str | Path | None = None,
                   caption_policy: str = "eval", check_images: bool = True) -> CIRSplit:
    """Load one category of one FashionIQ split; targets are required except on ``test*`` splits."""
    if caption_policy not in CAPTION_POLICIES:
        raise ConfigError(f"unknown FashionIQ caption policy {caption_policy!r}; "
                          f"choose one of {', '.join(CAPTION_POLICIES)}")
    root = Path(root)
    cap_path, split_path = fashioniq_files(root, split, category)
    image_root = Path(image_root if image_root is not None else root).absolute()
    image_dir = image_root / "images"
    split_rel = f"image_splits/{split_path.name}"

    names = read_json_as(split_path, list, "FashionIQ image split file")
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise DataError(f"entry {i}: image name must be a non-empty string, found {name!r}", split_path)
        if "/" in name or "\\" in name or "\x00" in name or name in (".", ".."):
            raise DataError(f"entry {i}: image name {name!r} must be a plain file name (no folders)", split_path)
    gallery = list(dict.fromkeys(names))  # a repeated name is one image: keep its first position

    ext = detect_extension(image_dir, gallery) if image_dir.is_dir() else None
    if ext is None and check_images:
        raise DataError(f"none of the first images listed in {split_path} exist under {image_dir} "
                        f"with any of the extensions {', '.join(IMAGE_EXTENSIONS)}")
    images = {n: image_dir / f"{n}{ext or '.png'}" for n in gallery}
    known = set(gallery)

    entries = read_json_as(cap_path, list, "FashionIQ caption file")
    needs_target = not split.startswith("test")
    queries = []
    for i, e in enumerate(entries):
        reference = field(e, "candidate", str, cap_path, i)
        target = field(e, "target", str, cap_path, i, optional=not needs_target)
        c1, c2 = str_list(e, "captions", cap_path, i, length=2)
        require_known(reference, known, "candidate", split_rel, cap_path, i)
        if target is not None:
            require_known(target, known, "target", split_rel, cap_path, i)
        generated = generated_texts(e, cap_path, i)
        if generated:
            # an SPN triplet: its texts are whole modification texts (one per template), never
            # joined with "and" (SPN4CIR's policy applies to the original triplets only)
            q = {"query_id": f"{category}/{i}", "reference": reference, "caption": generated[0],
                 "captions": [c1, c2], "category": category}
            if caption_policy == "random":
                q["caption_choices"] = list(generated)
        else:
            q = {"query_id": f"{category}/{i}", "reference": reference, "caption": eval_caption(c1, c2),
                 "captions": [c1, c2], "category": category}
            if caption_policy == "random":
                q["caption_choices"] = caption_choices(c1, c2)
        if target is not None:
            q["target"] = target
        copy_edit_type(e, q, cap_path, i)
        queries.append(q)

    if check_images:
        check_images_exist(images, split_path, image_dir)
    return CIRSplit(dataset="fashioniq", split=split, queries=queries, gallery=gallery, images=images,
                    protocol="fashioniq", category=category,
                    meta={"caption_policy": caption_policy, "image_extension": ext,
                          "repeated_gallery_names": len(names) - len(gallery)})
