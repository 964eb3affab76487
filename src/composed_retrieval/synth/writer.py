"""Write a plan to disk in CIRR's (or FashionIQ's) exact on-disk format, plus extras.

Extras beside the dataset files: image-caption pairs (``pairs/*.tsv``) for zero-shot training,
ground-truth scene descriptions (``scenes/*.json``) for a known-caption captioner, and
``synth.json`` (written last: its presence marks a complete output; an interrupted run leaves
``.synth-incomplete`` instead, so a rerun knows the folder is its own and may clean it).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import shutil
from pathlib import Path
from typing import Any, Iterable

from ..errors import ConfigError
from ..fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json
from .render import png_bytes as _png, render_to_file
from .world import SPLITS, Plan, SplitPlan, describe, make_plan

GENERATOR = "composed_retrieval.synth"
VERSION = 1
MARKER = ".synth-incomplete"
FORMATS = ("cirr", "fashioniq")
#: everything a synth run may create; only these are removed when a previous output is replaced
KNOWN_ENTRIES = ("captions", "image_splits", "train", "dev", "test1", "heldout", "images",
                 "pairs", "scenes", "synth.json", MARKER)
CIRR_FOLDER = {"train": "train", "val": "dev", "test1": "test1", "heldout": "heldout"}
TRAIN_FOLDER_SIZE = 200   # CIRR nests train images in numbered sub-folders
FIQ_CATEGORIES = ("dress", "shirt", "toptee")
FIQ_SPLIT = {"train": "train", "val": "val", "test1": "test"}   # FashionIQ has no held-out split


def prepare_out_dir(out: Path) -> None:
    """Refuse foreign non-empty folders; clear a previous (complete or interrupted) synth output."""
    if out.exists() and not out.is_dir():
        raise ConfigError("output path exists and is not a directory", out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        meta, marker = out / "synth.json", out / MARKER
        if meta.is_file():
            info = read_json(meta, "synth.json")
            if not isinstance(info, dict) or info.get("generator") != GENERATOR:
                raise ConfigError("synth.json was not written by cir synth; refusing to overwrite "
                                  "this directory (choose an empty or new --out)", out)
        elif not marker.is_file():
            raise ConfigError("directory is not empty and is not a cir synth output (no synth.json); "
                              "choose an empty or new --out", out)
        for entry in KNOWN_ENTRIES:
            p = out / entry
            if p.is_symlink() or p.is_file():
                p.unlink()
            elif p.is_dir():
                shutil.rmtree(p)
    (out / MARKER).write_text("cir synth run in progress or interrupted; rerun cir synth to replace\n")


def _dump(obj: Any) -> str:
    """Compact one-line JSON like CIRR's own files."""
    return json.dumps(obj) + "\n"


def _render_all(tasks: list[tuple], workers: int) -> None:
    if workers <= 1 or len(tasks) < 64:
        for t in tasks:
            render_to_file(t)
        return
    # each image has its own seed stream, so parallel output is byte-identical to serial
    with mp.get_context().Pool(workers) as pool:
        for _ in pool.imap_unordered(render_to_file, tasks, chunksize=128):
            pass


def _tsv(rows: Iterable[tuple[str, str]]) -> str:
    return "image\tcaption\n" + "".join(f"{path}\t{cap}\n" for path, cap in rows)


def _scenes_json(sp: SplitPlan) -> dict[str, Any]:
    return {name: describe(scene) for name, scene in sp.scenes.items()}


def _cirr_relpaths(sp: SplitPlan) -> dict[str, str]:
    folder = CIRR_FOLDER[sp.name]
    if sp.name == "train":
        return {n: f"train/{i // TRAIN_FOLDER_SIZE}/{n}.png" for i, n in enumerate(sp.scenes)}
    return {n: f"{folder}/{n}.png" for n in sp.scenes}


def _cirr_captions(sp: SplitPlan) -> list[dict[str, Any]]:
    with_targets = not sp.name.startswith("test")
    rows = []
    for t in sp.triplets:
        members = sp.groups[t.group]
        row: dict[str, Any] = {"pairid": t.pairid, "reference": t.reference}
        if with_targets:
            row["target_hard"] = t.target
            row["target_soft"] = {t.target: 1.0}
        row["caption"] = t.captions[0]
        row["edit_type"] = t.kind   # not a CIRR field: lets evaluation break recall down by edit
        img_set: dict[str, Any] = {"id": t.group, "members": members,
                                   "reference_rank": members.index(t.reference)}
        if with_targets:
            img_set["target_rank"] = members.index(t.target)
        row["img_set"] = img_set
        rows.append(row)
    return rows


def _write_cirr(out: Path, plan: Plan, workers: int) -> dict[str, Any]:
    tasks, images, triplets = [], {}, {}
    for name, sp in plan.splits.items():
        rel = _cirr_relpaths(sp)
        for i, (img, scene) in enumerate(sp.scenes.items()):
            tasks.append((str(out / rel[img]), scene, plan.spec.image_size, plan.seed, SPLITS[name][1], i))
        for d in {str((out / r).parent) for r in rel.values()}:
            Path(d).mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "captions" / f"cap.rc2.{name}.json", _dump(_cirr_captions(sp)))
        atomic_write_text(out / "image_splits" / f"split.rc2.{name}.json",
                          _dump({n: f"./{r}" for n, r in rel.items()}))
        atomic_write_text(out / "scenes" / f"{name}.json", _dump(_scenes_json(sp)))
        if name in ("train", "val"):
            atomic_write_text(out / "pairs" / f"{name}.tsv",
                              _tsv((rel[n], describe(s)["caption"]) for n, s in sp.scenes.items()))
        images[name] = len(sp.scenes)
        triplets[name] = len(sp.triplets)
    _render_all(tasks, workers)
    images["total"] = sum(images.values())
    return {"images": images, "triplets": triplets,
            "caption_pairs": {s: images[s] for s in ("train", "val")}}


def fashioniq_category(group: int) -> str:
    """Deterministic category of a query: its img_set group, round robin, so that every
    category of every split is non-empty (a category with no queries has no gallery either)."""
    return FIQ_CATEGORIES[group % len(FIQ_CATEGORIES)]


def _write_fashioniq(out: Path, plan: Plan, workers: int) -> dict[str, Any]:
    tasks, images, triplets = [], {}, {}
    (out / "images").mkdir(parents=True, exist_ok=True)
    for name, fsplit in FIQ_SPLIT.items():
        sp = plan.splits[name]
        for i, (img, scene) in enumerate(sp.scenes.items()):
            tasks.append((str(out / "images" / f"{img}.png"), scene, plan.spec.image_size, plan.seed,
                          SPLITS[name][1], i))
        rows: dict[str, list] = {c: [] for c in FIQ_CATEGORIES}
        gallery: dict[str, dict[str, None]] = {c: {} for c in FIQ_CATEGORIES}
        for t in sp.triplets:
            cat = fashioniq_category(t.group)
            row = {"target": t.target} if fsplit != "test" else {}
            row.update({"candidate": t.reference, "captions": list(t.captions), "edit_type": t.kind})
            rows[cat].append(row)
            gallery[cat].update(dict.fromkeys(sp.groups[t.group]))
        for cat in FIQ_CATEGORIES:
            atomic_write_text(out / "captions" / f"cap.{cat}.{fsplit}.json", _dump(rows[cat]))
            atomic_write_text(out / "image_splits" / f"split.{cat}.{fsplit}.json", _dump(list(gallery[cat])))
            triplets[f"{cat}.{fsplit}"] = len(rows[cat])
        atomic_write_text(out / "scenes" / f"{fsplit}.json", _dump(_scenes_json(sp)))
        if fsplit in ("train", "val"):
            atomic_write_text(out / "pairs" / f"{fsplit}.tsv",
                              _tsv((f"images/{n}.png", describe(s)["caption"]) for n, s in sp.scenes.items()))
        images[fsplit] = len(sp.scenes)
    _render_all(tasks, workers)
    images["total"] = sum(images.values())
    return {"images": images, "triplets": triplets,
            "caption_pairs": {s: images[s] for s in ("train", "val")}}


def write_synth(out: str | Path, seed: int, size: str, fmt: str = "cirr", workers: int = 2) -> dict[str, Any]:
    """Generate, render and write the benchmark; returns the counts that synth.json records."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    out = Path(out)
    plan = make_plan(seed, size)
    prepare_out_dir(out)
    counts = (_write_cirr if fmt == "cirr" else _write_fashioniq)(out, plan, workers)
    meta = {"generator": GENERATOR, "version": VERSION, "format": fmt, "seed": seed, "size": size,
            "image_size": plan.spec.image_size, **counts,
            "heldout_combinations": [{"shape": s, "color": c} for s, c in plan.heldout_combos]}
    atomic_write_json(out / "synth.json", meta)   # last: marks the output complete
    (out / MARKER).unlink(missing_ok=True)
    return meta


def write_contact_sheet(root: str | Path, path: str | Path, split: str = "val", n: int = 6,
                        stride: int = 7) -> Path:
    """A reference | text | target PNG of ``n`` triplets of a CIRR-format synth output."""
    from PIL import Image

    from .render import contact_sheet

    root = Path(root)
    caps = read_json(root / "captions" / f"cap.rc2.{split}.json", "CIRR caption file")
    rel = read_json(root / "image_splits" / f"split.rc2.{split}.json", "CIRR image split file")
    rows = []
    for c in caps[::stride][:n]:
        with Image.open(root / rel[c["reference"]]) as ref, Image.open(root / rel[c["target_hard"]]) as tgt:
            rows.append((ref.convert("RGB"), c["caption"], tgt.convert("RGB")))
    if not rows:
        raise ConfigError(f"no triplets with targets in split {split!r}", root)
    sheet = contact_sheet(rows)
    atomic_write_bytes(path, _png(sheet))
    return Path(path)
