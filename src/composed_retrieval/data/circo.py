"""CIRCO loader: ``annotations/{split}.json`` ranked against the COCO 2017 unlabeled images.

Gallery names are the COCO ids as strings ("397" for ``000000000397.jpg``), which is also what
the submission format uses. The gallery comes from COCO's ``image_info_unlabeled2017.json`` when
present (as SEARLE does), else from listing ``unlabeled2017/``. Scoring from prediction files
needs only the annotations, so with ``check_images=False`` and no images the gallery is empty.

SEARLE builds the query from ``relative_caption`` alone; ``use_shared_concept`` (off by default,
recorded in ``split.meta``) prefixes the shared concept the way other public CIRCO code does:
"<shared_concept> but <relative_caption>".
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import DataError
from .base import CIRSplit
from .checks import (check_images_exist, check_part, entry_error, field, int_list, read_json_as,
                     unique_ids)

SHARED_CONCEPT_TEMPLATE = "{shared_concept} but {relative_caption}"
_COCO_DIR = "COCO2017_unlabeled"
_INFO = Path("annotations") / "image_info_unlabeled2017.json"
_IMAGES = "unlabeled2017"


def coco_file_name(image_id: int | str) -> str:
    return f"{int(image_id):012d}.jpg"


def load_coco_unlabeled(image_root: str | Path) -> tuple[list[str], dict[str, Path], str | None]:
    """(names, name -> path, source description); empty when neither the info file nor the folder exist."""
    coco = Path(image_root).absolute() / _COCO_DIR
    image_dir = coco / _IMAGES
    info_path = coco / _INFO
    if info_path.is_file():
        info = read_json_as(info_path, dict, "COCO image info file")
        records = info.get("images")
        if not isinstance(records, list):
            raise DataError("field 'images' must be a list of {id, file_name} objects", info_path)
        images: dict[str, Path] = {}
        for i, r in enumerate(records):
            image_id = field(r, "id", int, info_path, i)
            file_name = field(r, "file_name", str, info_path, i)
            if "/" in file_name or "\\" in file_name or file_name in ("", ".", ".."):
                raise entry_error(info_path, i, f"file_name {file_name!r} must be a plain file name")
            images[str(image_id)] = image_dir / file_name
        return list(images), images, str(info_path)
    if image_dir.is_dir():
        ids = []
        odd = []
        with os.scandir(image_dir) as it:
            for e in it:
                if not e.is_file() or e.name.startswith("."):
                    continue
                stem, dot, ext = e.name.partition(".")
                if stem.isdigit() and ext.lower() in ("jpg", "jpeg", "png"):
                    ids.append((int(stem), e.name))
                else:
                    odd.append(e.name)
        if odd:
            raise DataError(f"{len(odd)} files are not COCO images named <12-digit id>.jpg: "
                            f"{', '.join(sorted(odd)[:10])}", image_dir)
        ids.sort()
        images = {str(i): image_dir / n for i, n in ids}
        return list(images), images, str(image_dir)
    return [], {}, None


def load_circo(root: str | Path, split: str, image_root: str | Path | None = None,
               use_shared_concept: bool = False, check_images: bool = True) -> CIRSplit:
    """Load one CIRCO split; targets are required except on ``test*`` splits."""
    root = Path(root)
    check_part(split, "CIRCO split")
    ann_path = root / "annotations" / f"{split}.json"
    image_root = Path(image_root if image_root is not None else root).absolute()

    entries = read_json_as(ann_path, list, "CIRCO annotation file")
    gallery, images, source = load_coco_unlabeled(image_root)
    if source is None and check_images:
        raise DataError(f"CIRCO gallery not found: expected {_COCO_DIR}/{_INFO.as_posix()} or "
                        f"{_COCO_DIR}/{_IMAGES}/ under {image_root}")
    needs_target = not split.startswith("test")
    queries = []
    for i, e in enumerate(entries):
        qid = field(e, "id", int, ann_path, i)
        reference = str(field(e, "reference_img_id", int, ann_path, i))
        relative = field(e, "relative_caption", str, ann_path, i)
        concept = field(e, "shared_concept", str, ann_path, i)
        aspects = field(e, "semantic_aspects", list, ann_path, i, optional=True)  # kept as given
        q = {"query_id": str(qid), "reference": reference, "relative_caption": relative,
             "shared_concept": concept,
             "caption": (SHARED_CONCEPT_TEMPLATE.format(shared_concept=concept, relative_caption=relative)
                         if use_shared_concept else relative)}
        if aspects is not None:
            q["semantic_aspects"] = aspects
        names = [reference]
        target_id = field(e, "target_img_id", int, ann_path, i, optional=not needs_target)
        if target_id is not None:
            gts = [str(g) for g in int_list(e, "gt_img_ids", ann_path, i)]
            target = str(target_id)
            if target not in gts:
                raise entry_error(ann_path, i, f"target_img_id {target} is not among gt_img_ids")
            if len(set(gts)) != len(gts):
                raise entry_error(ann_path, i, "gt_img_ids lists an image twice")
            q["target"] = target
            q["targets"] = [target] + [g for g in gts if g != target]
            names += q["targets"]
        for n in names:
            if source is not None and n not in images:
                raise entry_error(ann_path, i, f"image id {n} is not in the COCO unlabeled2017 gallery ({source})")
            images.setdefault(n, image_root / _COCO_DIR / _IMAGES / coco_file_name(n))
        queries.append(q)
    unique_ids((q["query_id"] for q in queries), ann_path, "id")

    if check_images:
        check_images_exist(images, source, image_root / _COCO_DIR / _IMAGES)
    meta = {"use_shared_concept": use_shared_concept}
    if use_shared_concept:
        meta["caption_template"] = SHARED_CONCEPT_TEMPLATE
    return CIRSplit(dataset="circo", split=split, queries=queries, gallery=gallery, images=images,
                    protocol="circo", meta=meta)
