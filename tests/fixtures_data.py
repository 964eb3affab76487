"""Tiny datasets written in each dataset's exact on-disk format, reusable by any test.

Every writer returns a dict describing what it wrote (names, entries), so tests can compare the
loaded split against the raw annotations rather than against hard-coded values.
"""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image


def write_image(path: Path, color: tuple[int, int, int] = (120, 30, 200), size: tuple[int, int] = (6, 4)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower(), "PNG")
    Image.new("RGB", size, color).save(path, fmt)
    return path


def _dump(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    return path


def write_cirr_fixture(root: Path, split: str = "val", n_images: int = 8, n_queries: int = 4,
                       with_targets: bool | None = None, images: bool = True, folder: str = "dev") -> dict:
    """CIRR: ``captions/cap.rc2.{split}.json`` + ``image_splits/split.rc2.{split}.json`` + images.

    Image i is ``{folder}/{split}-img{i}.png``; query q has reference img{q}, target img{q+1} and an
    img_set of 6 consecutive images starting at the reference.
    """
    root = Path(root)
    if with_targets is None:
        with_targets = not split.startswith("test")
    names = [f"{split}-img{i}" for i in range(n_images)]
    relpaths = {n: f"./{folder}/{n}.png" for n in names}
    entries = []
    for q in range(n_queries):
        members = [names[(q + k) % n_images] for k in range(min(6, n_images))]
        e = {"pairid": 100 + q, "reference": names[q % n_images], "caption": f"make it number {q}",
             "img_set": {"id": 1000 + q, "members": members, "reference_rank": 0, "target_rank": 1}}
        if with_targets:
            e["target_hard"] = names[(q + 1) % n_images]
            e["target_soft"] = {names[(q + 1) % n_images]: 1.0}
        entries.append(e)
    cap = _dump(root / "captions" / f"cap.rc2.{split}.json", entries)
    spl = _dump(root / "image_splits" / f"split.rc2.{split}.json", relpaths)
    if images:
        for i, n in enumerate(names):
            write_image(root / folder / f"{n}.png", (i * 20 % 256, 40, 90))
    return {"names": names, "entries": entries, "relpaths": relpaths, "caption_file": cap, "split_file": spl}


def write_fashioniq_fixture(root: Path, category: str = "dress", split: str = "val", n_images: int = 6,
                            ext: str = ".png", captions: list[list[str]] | None = None,
                            with_targets: bool | None = None, images: bool = True) -> dict:
    """FashionIQ: ``captions/cap.{cat}.{split}.json``, ``image_splits/split.{cat}.{split}.json``,
    ``images/<name><ext>``. Entry k: candidate name k, target name k+1, ``captions[k]``."""
    root = Path(root)
    if with_targets is None:
        with_targets = not split.startswith("test")
    names = [f"{category}{split}{i:03d}" for i in range(n_images)]
    if captions is None:
        captions = [[f"is red {k}.", f"has sleeves {k}"] for k in range(n_images - 1)]
    entries = []
    for k, caps in enumerate(captions):
        e = {"candidate": names[k % n_images], "captions": caps}
        if with_targets:
            e["target"] = names[(k + 1) % n_images]
        entries.append(e)
    cap = _dump(root / "captions" / f"cap.{category}.{split}.json", entries)
    spl = _dump(root / "image_splits" / f"split.{category}.{split}.json", names)
    if images:
        for i, n in enumerate(names):
            write_image(root / "images" / f"{n}{ext}", (i * 30 % 256, 10, 10))
    return {"names": names, "entries": entries, "caption_file": cap, "split_file": spl}


def write_circo_fixture(root: Path, split: str = "val", image_ids: tuple[int, ...] = (397, 1234, 55, 9761, 489535, 7),
                        info: bool = True, images: bool = True, with_targets: bool | None = None) -> dict:
    """CIRCO: ``annotations/{split}.json`` + ``COCO2017_unlabeled/{annotations/image_info_unlabeled2017.json,
    unlabeled2017/<12-digit id>.jpg}``. Query q: reference ids[q], target ids[q+1], gts ids[q+1], ids[q+2]."""
    root = Path(root)
    if with_targets is None:
        with_targets = not split.startswith("test")
    ids = list(image_ids)
    entries = []
    for q in range(3):
        e = {"id": q, "reference_img_id": ids[q], "relative_caption": f"is held by a girl {q}",
             "shared_concept": f"a teddy bear {q}", "semantic_aspects": ["addition"]}
        if with_targets:
            e["target_img_id"] = ids[q + 1]
            e["gt_img_ids"] = [ids[q + 1], ids[q + 2]]
        entries.append(e)
    ann = _dump(root / "annotations" / f"{split}.json", entries)
    coco = root / "COCO2017_unlabeled"
    if info:
        _dump(coco / "annotations" / "image_info_unlabeled2017.json",
              {"info": {}, "images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": 6, "height": 4}
                                      for i in ids]})
    if images:
        for i in ids:
            write_image(coco / "unlabeled2017" / f"{i:012d}.jpg", (i % 256, 0, 0))
    return {"ids": ids, "entries": entries, "annotation_file": ann}


def write_user_fixture(root: Path, rows: list[dict] | None = None) -> dict:
    """A folder of images (one nested) plus ``queries.jsonl`` of {reference, caption, target}."""
    root = Path(root)
    names = ["a.png", "b.jpg", "sub/c.png", "sub/deep/d.png"]
    for i, n in enumerate(names):
        write_image(root / "images" / n, (i * 50, 0, 0))
    if rows is None:
        rows = [{"reference": "a.png", "caption": "make it blue", "target": "sub/c.png"},
                {"reference": "sub/deep/d.png", "caption": "remove the dog"}]
    jsonl = root / "queries.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {"names": sorted(names), "rows": rows, "jsonl": jsonl, "image_root": root / "images"}
