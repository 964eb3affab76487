"""The synthetic benchmark: determinism, held-out combinations, edits, and the exact file layouts."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from composed_retrieval.cli import main as cli_main
from composed_retrieval.synth import world
from composed_retrieval.synth.writer import MARKER, write_synth

SEED = 3
SPLITS = ("train", "val", "test1", "heldout")


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "cirr"
    write_synth(out, SEED, "tiny", "cirr", workers=2)
    return out


def load(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_same_seed_same_bytes_for_serial_and_parallel_rendering(tiny, tmp_path):
    again = tmp_path / "again"
    write_synth(again, SEED, "tiny", "cirr", workers=1)
    assert tree_hash(again) == tree_hash(tiny)


def test_different_seed_gives_different_output(tiny, tmp_path):
    other = tmp_path / "other"
    write_synth(other, SEED + 1, "tiny", "cirr", workers=1)
    assert load(other / "captions" / "cap.rc2.train.json") != load(tiny / "captions" / "cap.rc2.train.json")
    assert tree_hash(other) != tree_hash(tiny)


def test_two_renders_of_one_scene_differ_in_pixels():
    from composed_retrieval.synth.render import render_scene, render_seed
    scene = world.make_scene([world.Obj(4, "circle", "red", "large")])
    a = np.asarray(render_scene(scene, 64, render_seed(0, 0, 0)))
    b = np.asarray(render_scene(scene, 64, render_seed(0, 0, 1)))
    assert a.shape == (64, 64, 3) and not np.array_equal(a, b)


def test_heldout_combinations_never_in_train_and_in_every_heldout_target(tiny):
    meta = load(tiny / "synth.json")
    held = {(c["shape"], c["color"]) for c in meta["heldout_combinations"]}
    assert len(held) == 3
    for split in ("train", "val", "test1"):
        for name, desc in load(tiny / "scenes" / f"{split}.json").items():
            assert not {(o["shape"], o["color"]) for o in desc["objects"]} & held, (split, name)
    scenes = load(tiny / "scenes" / "heldout.json")
    caps = load(tiny / "captions" / "cap.rc2.heldout.json")
    assert caps
    for c in caps:
        assert {(o["shape"], o["color"]) for o in scenes[c["target_hard"]]["objects"]} & held
        assert not {(o["shape"], o["color"]) for o in scenes[c["reference"]]["objects"]} & held


def test_every_target_is_its_reference_with_exactly_the_edit_applied(tiny):
    plan = world.make_plan(SEED, "tiny")
    for split in SPLITS:
        scenes = load(tiny / "scenes" / f"{split}.json")
        caps = {c["pairid"]: c for c in load(tiny / "captions" / f"cap.rc2.{split}.json")}
        assert len(caps) == len(plan.splits[split].triplets)
        for t in plan.splits[split].triplets:
            ref = world.scene_from_dicts(scenes[t.reference]["objects"])
            tgt = world.scene_from_dicts(scenes[t.target]["objects"])
            assert world.apply_edit(ref, t.steps) == tgt
            assert ref != tgt
            assert caps[t.pairid]["caption"] == t.captions[0]
            assert caps[t.pairid]["edit_type"] == t.kind   # the one field CIRR does not have
            assert caps[t.pairid]["reference"] == t.reference
            if split != "test1":
                assert caps[t.pairid]["target_hard"] == t.target
    kinds = {t.kind for sp in plan.splits.values() for t in sp.triplets}
    assert kinds == {"add", "remove", "color", "size", "shape", "two-step"}


def test_one_image_per_distinct_scene_and_captions_match_scenes(tiny):
    for split in SPLITS:
        scenes = load(tiny / "scenes" / f"{split}.json")
        keys = [world.scene_key(world.scene_from_dicts(d["objects"])) for d in scenes.values()]
        assert len(keys) == len(set(keys))
        for d in scenes.values():
            assert d["caption"] == world.caption(world.scene_from_dicts(d["objects"]))


def test_img_sets_have_six_members_with_reference_and_target(tiny):
    for split in SPLITS:
        gallery = load(tiny / "image_splits" / f"split.rc2.{split}.json")
        for c in load(tiny / "captions" / f"cap.rc2.{split}.json"):
            s = c["img_set"]
            assert len(s["members"]) == 6 == len(set(s["members"]))
            assert set(s["members"]) <= set(gallery)
            assert s["members"][s["reference_rank"]] == c["reference"]
            if split != "test1":
                assert s["members"][s["target_rank"]] == c["target_hard"]
                assert c["target_hard"] != c["reference"]


def test_cirr_key_layout_is_exact(tiny):
    # CIRR's keys plus "edit_type" (the modification type, for per-type recall; loaders ignore it)
    full = {"pairid", "reference", "target_hard", "target_soft", "caption", "img_set", "edit_type"}
    pairids = []
    names: set[str] = set()
    for split in SPLITS:
        caps = load(tiny / "captions" / f"cap.rc2.{split}.json")
        for c in caps:
            if split == "test1":
                assert set(c) == full - {"target_hard", "target_soft"}
                assert set(c["img_set"]) == {"id", "members", "reference_rank"}
            else:
                assert set(c) == full
                assert c["target_soft"] == {c["target_hard"]: 1.0}
                assert set(c["img_set"]) == {"id", "members", "reference_rank", "target_rank"}
            assert isinstance(c["pairid"], int) and isinstance(c["img_set"]["id"], int)
            pairids.append(c["pairid"])
        rel = load(tiny / "image_splits" / f"split.rc2.{split}.json")
        folder = {"train": "train", "val": "dev", "test1": "test1", "heldout": "heldout"}[split]
        for name, path in rel.items():
            parts = path.split("/")
            assert parts[0] == "." and parts[1] == folder and parts[-1] == f"{name}.png"
            assert len(parts) == (4 if split == "train" else 3)
            if split == "train":
                assert parts[2].isdigit()
            assert (tiny / path).is_file()
        assert not names & set(rel), "image names must be unique across splits"
        names |= set(rel)
        n_pngs = len(list((tiny / folder).rglob("*.png")))
        assert n_pngs == len(rel)
    assert len(pairids) == len(set(pairids))
    for split in ("train", "val"):
        lines = (tiny / "pairs" / f"{split}.tsv").read_text(encoding="utf-8").splitlines()
        assert lines[0] == "image\tcaption"
        scenes = load(tiny / "scenes" / f"{split}.json")
        assert len(lines) - 1 == len(scenes)
        for line in lines[1:]:
            path, cap = line.split("\t")
            assert (tiny / path).is_file() and cap.startswith("a ")
    meta = load(tiny / "synth.json")
    assert meta["generator"] == "composed_retrieval.synth" and meta["seed"] == SEED and meta["size"] == "tiny"
    assert meta["triplets"] == {s: len(load(tiny / "captions" / f"cap.rc2.{s}.json")) for s in SPLITS}
    assert not (tiny / MARKER).exists()


def test_load_cirr_reads_every_split(tiny):
    cirr = pytest.importorskip("composed_retrieval.data.cirr")
    for split in SPLITS:
        sp = cirr.load_cirr(tiny, split)
        caps = load(tiny / "captions" / f"cap.rc2.{split}.json")
        assert len(sp.queries) == len(caps) and sp.has_targets == (split != "test1")
        assert all(len(q["subset"]) == 5 for q in sp.queries)
        assert [q["edit_type"] for q in sp.queries] == [c["edit_type"] for c in caps]


def test_fashioniq_format_shape(tmp_path):
    out = tmp_path / "fiq"
    meta = write_synth(out, SEED, "tiny", "fashioniq", workers=1)
    total = 0
    for cat in ("dress", "shirt", "toptee"):
        for split in ("train", "val", "test"):
            caps = load(out / "captions" / f"cap.{cat}.{split}.json")
            gallery = load(out / "image_splits" / f"split.{cat}.{split}.json")
            assert caps and isinstance(gallery, list) and all(isinstance(n, str) for n in gallery)
            for c in caps:
                keys = {"candidate", "captions", "edit_type"} | ({"target"} if split != "test" else set())
                assert set(c) == keys
                assert len(c["captions"]) == 2 and all(isinstance(x, str) and x for x in c["captions"])
                assert c["candidate"] in gallery and c.get("target", c["candidate"]) in gallery
                for n in [c["candidate"], c.get("target")] if split != "test" else [c["candidate"]]:
                    assert (out / "images" / f"{n}.png").is_file()
            total += len(caps)
    plan = world.make_plan(SEED, "tiny")
    assert total == sum(len(plan.splits[s].triplets) for s in ("train", "val", "test1"))
    assert sum(meta["triplets"].values()) == total
    assert not (out / "captions" / "cap.rc2.train.json").exists()
    try:
        from composed_retrieval.data.fashioniq import load_fashioniq
    except ImportError:
        return
    for cat in ("dress", "shirt", "toptee"):
        for split in ("train", "val", "test"):
            sp = load_fashioniq(out, split, cat)
            assert len(sp.queries) == meta["triplets"][f"{cat}.{split}"]
            assert sp.has_targets == (split != "test")
            assert {q["edit_type"] for q in sp.queries} <= set(world._KINDS)


def _matches(expr: str, o: world.Obj) -> bool:
    """Does a referring expression ('large red circle at the top left', 'square') fit ``o``?"""
    for cell, pos in enumerate(world.POSITIONS):
        for prep in ("at the", "on the", "in the"):
            suffix = f" {prep} {pos}"
            if expr.endswith(suffix):
                return o.cell == cell and _matches(expr[: -len(suffix)], o)
    words = expr.split()
    return words[-1] == o.shape and all(w in (o.size, o.color) for w in words[:-1])


def test_referring_expressions_pick_out_exactly_one_object():
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = world.sample_scene(rng, frozenset())
        for o in scene:
            for expr in world.referring_expressions(scene, o):
                assert [p for p in scene if _matches(expr, p)] == [o], expr


def test_cli_prints_counts_and_guards_the_output_dir(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["synth", "--out", str(out), "--seed", "1", "--size", "tiny", "--workers", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["triplets"]["train"] == len(load(out / "captions" / "cap.rc2.train.json"))
    assert report["images"]["total"] == sum(report["images"][s] for s in SPLITS)
    assert set(report["caption_pairs"]) == {"train", "val"}
    first = tree_hash(out)
    # rerun into a previous output replaces it (same bytes); an interrupted run is cleaned
    assert cli_main(["synth", "--out", str(out), "--seed", "1", "--size", "tiny", "--workers", "1"]) == 0
    assert tree_hash(out) == first
    (out / "synth.json").unlink()
    (out / MARKER).write_text("interrupted\n")
    (out / "dev" / "stale.png").write_bytes(b"x")
    assert cli_main(["synth", "--out", str(out), "--seed", "1", "--size", "tiny", "--workers", "1"]) == 0
    assert tree_hash(out) == first
    capsys.readouterr()
    # a foreign non-empty folder, or an incomplete one without the marker, is refused in one line
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    (out / "synth.json").unlink()
    for target in (foreign, out):
        with pytest.raises(SystemExit) as exc:
            cli_main(["synth", "--out", str(target), "--size", "tiny"])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and str(target) in err
    assert (foreign / "keep.txt").read_text() == "mine"
