"""One entry point for every dataset, so the CLI and configs name datasets instead of loaders."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from ..errors import ConfigError
from .base import CIRSplit
from .circo import load_circo
from .cirr import load_cirr
from .fashioniq import FASHIONIQ_CATEGORIES, load_fashioniq
from .userdata import load_user

DATASETS = ("cirr", "fashioniq", "circo", "user")
#: loader-specific keyword options each dataset accepts through ``**options``
OPTIONS = {"cirr": (), "fashioniq": ("caption_policy",), "circo": ("use_shared_concept",),
           "user": ("gallery_root",)}


def load_split(dataset: str, root: str | Path, split: str, *, image_root: str | Path | None = None,
               category: str | None = None, check_images: bool = True, **options: Any) -> CIRSplit:
    """Load one split. For ``user``, ``root`` is the JSONL file and ``image_root`` its image folder
    (default: the JSONL's folder); ``split`` is only a label."""
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    unknown = sorted(set(options) - set(OPTIONS[dataset]))
    if unknown:
        allowed = ", ".join(OPTIONS[dataset]) or "none"
        raise ConfigError(f"option {unknown[0]!r} does not apply to {dataset} (its options: {allowed})")
    if category is not None and dataset != "fashioniq":
        raise ConfigError(f"category applies only to fashioniq, not {dataset}")
    if dataset == "cirr":
        return load_cirr(root, split, image_root=image_root, check_images=check_images)
    if dataset == "fashioniq":
        if category is None:
            raise ConfigError(f"fashioniq needs a category ({', '.join(FASHIONIQ_CATEGORIES)})")
        return load_fashioniq(root, split, category, image_root=image_root, check_images=check_images,
                              **options)
    if dataset == "circo":
        return load_circo(root, split, image_root=image_root, check_images=check_images, **options)
    image_root = image_root if image_root is not None else Path(root).parent
    return load_user(root, image_root, check_images=check_images, split=split, **options)


def load_splits(dataset: str, root: str | Path, split: str, *,
                categories: str | Iterable[str] | None = None, **kw: Any) -> list[CIRSplit]:
    """FashionIQ: one split per category (all three by default); every other dataset: one."""
    if dataset != "fashioniq":
        if categories is not None:
            raise ConfigError(f"categories apply only to fashioniq, not {dataset}")
        return [load_split(dataset, root, split, **kw)]
    if "category" in kw:
        raise ConfigError("pass categories=[...] to load_splits, not category")
    if categories is None:
        categories = FASHIONIQ_CATEGORIES
    elif isinstance(categories, str):
        categories = [c for c in categories.split(",") if c]
    categories = list(dict.fromkeys(categories))
    if not categories:
        raise ConfigError("no FashionIQ category given")
    return [load_split(dataset, root, split, category=c, **kw) for c in categories]
