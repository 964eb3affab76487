"""Dataset loaders (CIRR, FashionIQ, CIRCO, user JSONL), the registry, and the torch datasets."""
from __future__ import annotations

import json
import os
import time

import pytest
import torch

from composed_retrieval.data.circo import load_circo
from composed_retrieval.data.cirr import load_cirr
from composed_retrieval.data.fashioniq import load_fashioniq
from composed_retrieval.data.registry import DATASETS, load_split, load_splits
from composed_retrieval.data.triplets import QueryDataset, TripletDataset, collate_triplets
from composed_retrieval.data.userdata import list_gallery, load_user
from composed_retrieval.encoders.base import Features
from composed_retrieval.errors import ConfigError, DataError
from fixtures_data import (write_circo_fixture, write_cirr_fixture, write_fashioniq_fixture,
                           write_user_fixture)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


# ---------------------------------------------------------------- CIRR

def test_cirr_fields(tmp_path):
    fx = write_cirr_fixture(tmp_path, "val")
    s = load_cirr(tmp_path, "val")
    assert (s.dataset, s.split, s.protocol) == ("cirr", "val", "cirr")
    assert s.gallery == fx["names"]  # file order
    assert len(s.queries) == len(fx["entries"])
    for q, e in zip(s.queries, fx["entries"]):
        assert q["query_id"] == str(e["pairid"])
        assert q["reference"] == e["reference"]
        assert q["target"] == e["target_hard"]
        assert q["caption"] == e["caption"]
        assert q["subset"] == [m for m in e["img_set"]["members"] if m != e["reference"]]
        assert len(q["subset"]) == 5
    name = fx["names"][3]
    assert s.image_path(name) == (tmp_path / "dev" / f"{name}.png").absolute()
    assert s.image_path(name).is_file()
    assert s.has_targets


def test_cirr_test1_has_no_targets_and_other_split_names_load(tmp_path):
    write_cirr_fixture(tmp_path, "test1")
    s = load_cirr(tmp_path, "test1")
    assert not s.has_targets and all("target" not in q for q in s.queries)
    write_cirr_fixture(tmp_path, "heldout", folder="heldout")
    assert load_cirr(tmp_path, "heldout").has_targets


def test_cirr_separate_image_root(tmp_path):
    write_cirr_fixture(tmp_path / "ann", "val", images=False)
    write_cirr_fixture(tmp_path / "imgs", "val")
    s = load_cirr(tmp_path / "ann", "val", image_root=tmp_path / "imgs")
    assert s.image_path(s.gallery[0]).parent == (tmp_path / "imgs" / "dev").absolute()


def test_cirr_unknown_target_names_file_and_entry(tmp_path):
    fx = write_cirr_fixture(tmp_path, "val")
    fx["entries"][2]["target_hard"] = "nope"
    fx["caption_file"].write_text(json.dumps(fx["entries"]))
    with pytest.raises(DataError) as exc:
        load_cirr(tmp_path, "val")
    assert _one_line(exc) == (f"{fx['caption_file']}: entry 2: target 'nope' is not in "
                              f"image_splits/split.rc2.val.json")


def test_cirr_missing_field_wrong_type_and_malformed_json(tmp_path):
    fx = write_cirr_fixture(tmp_path, "val")
    entries = fx["entries"]
    entries[1]["pairid"] = "101"
    fx["caption_file"].write_text(json.dumps(entries))
    with pytest.raises(DataError, match=r"cap\.rc2\.val\.json: entry 1: field 'pairid' must be an integer"):
        load_cirr(tmp_path, "val")
    del entries[1]["pairid"]
    fx["caption_file"].write_text(json.dumps(entries))
    with pytest.raises(DataError, match=r"entry 1: missing field 'pairid'"):
        load_cirr(tmp_path, "val")
    fx["caption_file"].write_text('[{"pairid": 1,')
    with pytest.raises(DataError, match=r"cap\.rc2\.val\.json: malformed CIRR caption file"):
        load_cirr(tmp_path, "val")
    fx["caption_file"].write_text('{"pairid": 1}')
    with pytest.raises(DataError, match=r"must be a list at the top level, found an object"):
        load_cirr(tmp_path, "val")
    fx["caption_file"].unlink()
    with pytest.raises(DataError, match=r"cap\.rc2\.val\.json: CIRR caption file not found"):
        load_cirr(tmp_path, "val")


def test_cirr_missing_images_reported_by_name_and_count(tmp_path):
    fx = write_cirr_fixture(tmp_path, "val")
    for n in fx["names"][:3]:
        (tmp_path / "dev" / f"{n}.png").unlink()
    with pytest.raises(DataError) as exc:
        load_cirr(tmp_path, "val")
    text = _one_line(exc)
    assert text.startswith(f"3 images listed in {fx['split_file']} are missing under {tmp_path.absolute()}: ")
    assert all(n in text for n in fx["names"][:3]) and fx["names"][3] not in text
    assert len(load_cirr(tmp_path, "val", check_images=False).gallery) == len(fx["names"])


def test_cirr_repeated_pairid_and_unsafe_split(tmp_path):
    fx = write_cirr_fixture(tmp_path, "val")
    fx["entries"][3]["pairid"] = fx["entries"][0]["pairid"]
    fx["caption_file"].write_text(json.dumps(fx["entries"]))
    with pytest.raises(DataError, match=r"entry 3: pairid 100 repeats entry 0"):
        load_cirr(tmp_path, "val")
    with pytest.raises(DataError, match="not a valid name"):
        load_cirr(tmp_path, "../val")


def test_cirr_large_split_loads_fast(tmp_path):
    """CIRR train size (17k images, 28k triplets) loads and checks in well under the budget."""
    n_img, n_q = 17_000, 28_000
    names = [f"train-{i}" for i in range(n_img)]
    relpaths = {n: f"./train/{i % 100}/{n}.png" for i, n in enumerate(names)}
    for sub in range(100):
        (tmp_path / "train" / str(sub)).mkdir(parents=True)
    for rel in relpaths.values():
        (tmp_path / rel).touch()
    entries = [{"pairid": q, "reference": names[q % n_img], "target_hard": names[(q + 7) % n_img],
                "caption": "x", "target_soft": {},
                "img_set": {"id": q, "members": [names[(q + k) % n_img] for k in range(6)]}}
               for q in range(n_q)]
    (tmp_path / "captions").mkdir()
    (tmp_path / "image_splits").mkdir()
    (tmp_path / "captions" / "cap.rc2.train.json").write_text(json.dumps(entries))
    (tmp_path / "image_splits" / "split.rc2.train.json").write_text(json.dumps(relpaths))
    t0 = time.perf_counter()
    s = load_cirr(tmp_path, "train")
    elapsed = time.perf_counter() - t0
    assert len(s.queries) == n_q and len(s.gallery) == n_img
    assert elapsed < 15.0, elapsed   # a guard against quadratic checks, not a speed measurement


# ---------------------------------------------------------------- FashionIQ

def test_fashioniq_fields_and_eval_policy(tmp_path):
    caps = [[" is red and shiny. ", "Has NO sleeves?"], ["is blue,", ", longer"]]
    fx = write_fashioniq_fixture(tmp_path, "shirt", "val", captions=caps)
    s = load_fashioniq(tmp_path, "val", "shirt")
    assert (s.dataset, s.protocol, s.category) == ("fashioniq", "fashioniq", "shirt")
    assert s.gallery == fx["names"]
    assert s.meta == {"caption_policy": "eval", "image_extension": ".png", "repeated_gallery_names": 0}
    q0, q1 = s.queries
    assert q0["query_id"] == "shirt/0" and q1["query_id"] == "shirt/1"
    assert q0["reference"] == fx["entries"][0]["candidate"] and q0["target"] == fx["entries"][0]["target"]
    assert q0["category"] == "shirt"
    # stripped of ".?, " at both ends; first capitalised (str.capitalize, as CLIP4Cir), second untouched
    assert q0["caption"] == "Is red and shiny and Has NO sleeves"
    assert q1["caption"] == "Is blue and longer"
    assert "caption_choices" not in q0
    assert s.image_path(q0["reference"]) == (tmp_path / "images" / f"{q0['reference']}.png").absolute()


def test_fashioniq_random_policy_choices(tmp_path):
    write_fashioniq_fixture(tmp_path, "dress", "train", captions=[["is red.", "Has Sleeves "]])
    s = load_fashioniq(tmp_path, "train", "dress", caption_policy="random")
    q = s.queries[0]
    assert q["caption"] == "Is red and Has Sleeves"
    assert q["caption_choices"] == ["Is red and Has Sleeves", "Has sleeves and is red", "Is red", "Has sleeves"]
    assert s.meta["caption_policy"] == "random"
    with pytest.raises(ConfigError, match="caption policy 'shuffle'"):
        load_fashioniq(tmp_path, "train", "dress", caption_policy="shuffle")


def test_fashioniq_detects_jpg(tmp_path):
    fx = write_fashioniq_fixture(tmp_path, "toptee", "val", ext=".jpg")
    s = load_fashioniq(tmp_path, "val", "toptee")
    assert s.meta["image_extension"] == ".jpg"
    assert all(s.image_path(n).suffix == ".jpg" and s.image_path(n).is_file() for n in fx["names"])


def test_fashioniq_test_split_and_bad_inputs(tmp_path):
    write_fashioniq_fixture(tmp_path, "dress", "test")
    assert not load_fashioniq(tmp_path, "test", "dress").has_targets
    fx = write_fashioniq_fixture(tmp_path, "dress", "val")
    entries = fx["entries"]
    entries[1]["captions"] = ["only one"]
    fx["caption_file"].write_text(json.dumps(entries))
    with pytest.raises(DataError) as exc:
        load_fashioniq(tmp_path, "val", "dress")
    assert _one_line(exc).startswith(f"{fx['caption_file']}: entry 1: field 'captions' must be a list of 2 strings")
    entries[1]["captions"] = ["a", "b"]
    entries[3]["candidate"] = "ghost"
    fx["caption_file"].write_text(json.dumps(entries))
    with pytest.raises(DataError, match=r"entry 3: candidate 'ghost' is not in image_splits/split\.dress\.val\.json"):
        load_fashioniq(tmp_path, "val", "dress")
    entries[3]["candidate"] = fx["names"][0]
    fx["caption_file"].write_text(json.dumps(entries))
    (tmp_path / "images" / f"{fx['names'][4]}.png").unlink()
    with pytest.raises(DataError, match=rf"1 image listed in .*split\.dress\.val\.json is missing under "
                                        rf".*images: {fx['names'][4]}$"):
        load_fashioniq(tmp_path, "val", "dress")


def test_fashioniq_without_images(tmp_path):
    fx = write_fashioniq_fixture(tmp_path, "dress", "val", images=False)
    with pytest.raises(DataError, match=r"none of the first images listed in .*split\.dress\.val\.json exist under "):
        load_fashioniq(tmp_path, "val", "dress")
    s = load_fashioniq(tmp_path, "val", "dress", check_images=False)  # scoring needs annotations only
    assert s.gallery == fx["names"] and s.meta["image_extension"] is None


# ---------------------------------------------------------------- CIRCO

def test_circo_fields_gallery_from_info(tmp_path):
    fx = write_circo_fixture(tmp_path, "val")
    s = load_circo(tmp_path, "val")
    assert (s.dataset, s.protocol) == ("circo", "circo")
    assert s.gallery == [str(i) for i in fx["ids"]]  # info-file order
    assert s.meta == {"use_shared_concept": False}
    for q, e in zip(s.queries, fx["entries"]):
        assert q["query_id"] == str(e["id"])
        assert q["reference"] == str(e["reference_img_id"])
        assert q["target"] == str(e["target_img_id"])
        assert q["targets"] == [str(g) for g in e["gt_img_ids"]]
        assert q["caption"] == e["relative_caption"]
        assert q["shared_concept"] == e["shared_concept"]
        assert q["semantic_aspects"] == ["addition"]
    assert s.image_path("397").name == "000000000397.jpg" and s.image_path("397").is_file()


def test_circo_shared_concept_option(tmp_path):
    write_circo_fixture(tmp_path, "val")
    s = load_circo(tmp_path, "val", use_shared_concept=True)
    assert s.queries[0]["caption"] == "a teddy bear 0 but is held by a girl 0"
    assert s.meta["use_shared_concept"] is True and "caption_template" in s.meta


def test_circo_gallery_from_folder_and_annotations_only(tmp_path):
    fx = write_circo_fixture(tmp_path / "a", "val", info=False)
    s = load_circo(tmp_path / "a", "val")
    assert s.gallery == [str(i) for i in sorted(fx["ids"])]
    write_circo_fixture(tmp_path / "b", "test", info=False, images=False)
    s = load_circo(tmp_path / "b", "test", check_images=False)
    assert s.gallery == [] and not s.has_targets and len(s.queries) == 3
    assert s.image_path("397").name == "000000000397.jpg"
    with pytest.raises(DataError, match="CIRCO gallery not found"):
        load_circo(tmp_path / "b", "test")


def test_circo_bad_inputs(tmp_path):
    fx = write_circo_fixture(tmp_path, "val")
    entries = fx["entries"]
    entries[1]["reference_img_id"] = 424242
    fx["annotation_file"].write_text(json.dumps(entries))
    with pytest.raises(DataError, match=r"val\.json: entry 1: image id 424242 is not in the COCO unlabeled2017 "
                                        r"gallery"):
        load_circo(tmp_path, "val")
    entries[1]["reference_img_id"] = fx["ids"][0]
    entries[2]["gt_img_ids"] = "397"
    fx["annotation_file"].write_text(json.dumps(entries))
    with pytest.raises(DataError, match=r"entry 2: field 'gt_img_ids' must be a list"):
        load_circo(tmp_path, "val")
    entries[2]["gt_img_ids"] = [fx["ids"][0]]
    fx["annotation_file"].write_text(json.dumps(entries))
    with pytest.raises(DataError, match=r"entry 2: target_img_id \d+ is not among gt_img_ids"):
        load_circo(tmp_path, "val")
    entries[2]["gt_img_ids"] = [entries[2]["target_img_id"]]
    fx["annotation_file"].write_text(json.dumps(entries))
    os.unlink(tmp_path / "COCO2017_unlabeled" / "unlabeled2017" / "000000000007.jpg")
    with pytest.raises(DataError, match=r"1 image listed in .*image_info_unlabeled2017\.json is missing .*: 7$"):
        load_circo(tmp_path, "val")


# ---------------------------------------------------------------- user data

def test_user_jsonl_and_gallery(tmp_path):
    fx = write_user_fixture(tmp_path)
    (fx["image_root"] / "notes.txt").write_text("not an image")
    (fx["image_root"] / ".hidden.png").write_bytes(b"")
    s = load_user(fx["jsonl"], fx["image_root"])
    assert (s.dataset, s.protocol) == ("user", "generic")
    assert s.gallery == fx["names"]  # recursive, relative posix, sorted, images only
    assert [q["query_id"] for q in s.queries] == ["0", "1"]
    assert s.queries[0] == {"query_id": "0", "reference": "a.png", "caption": "make it blue", "target": "sub/c.png"}
    assert "target" not in s.queries[1]
    assert s.image_path("sub/deep/d.png") == (fx["image_root"] / "sub" / "deep" / "d.png").absolute()
    assert list(list_gallery(fx["image_root"])) == fx["names"]


@pytest.mark.parametrize("name", ["../outside.png", "/etc/passwd", "sub/../../x.png", "a\\b.png"])
def test_user_rejects_path_traversal(tmp_path, name):
    fx = write_user_fixture(tmp_path, rows=[{"reference": "a.png", "caption": "x"},
                                            {"reference": name, "caption": "y"}])
    with pytest.raises(DataError) as exc:
        load_user(fx["jsonl"], fx["image_root"])
    assert _one_line(exc).startswith(f"{fx['jsonl']}: entry 1: reference {name!r}")


def test_user_rejects_symlink_outside_root(tmp_path):
    fx = write_user_fixture(tmp_path / "u", rows=[{"reference": "link.png", "caption": "x"}])
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"x")
    (fx["image_root"] / "link.png").symlink_to(secret)
    with pytest.raises(DataError, match="symlink that leads outside the gallery folder"):
        list_gallery(fx["image_root"])
    with pytest.raises(DataError, match="resolves outside the image folder"):
        load_user(fx["jsonl"], fx["image_root"], gallery_root=tmp_path / "u" / "images" / "sub")


def test_user_bad_inputs(tmp_path):
    fx = write_user_fixture(tmp_path, rows=[{"reference": "a.png", "caption": "x"},
                                            {"reference": "missing.png", "caption": "y", "target": "b.jpg"}])
    with pytest.raises(DataError, match=r"1 image listed in .*queries\.jsonl is missing under .*: missing\.png$"):
        load_user(fx["jsonl"], fx["image_root"])
    fx["jsonl"].write_text('{"reference": "a.png"}\n')
    with pytest.raises(DataError, match=r"queries\.jsonl: entry 0: missing field 'caption'"):
        load_user(fx["jsonl"], fx["image_root"])
    fx["jsonl"].write_text('{"reference": "a.png", "caption": "x", "target": "nope.png"}\n')
    with pytest.raises(DataError, match=r"entry 0: target 'nope\.png' is not an image of the gallery"):
        load_user(fx["jsonl"], fx["image_root"], check_images=False)


# ---------------------------------------------------------------- registry

def test_registry(tmp_path):
    assert DATASETS == ("cirr", "fashioniq", "circo", "user")
    write_cirr_fixture(tmp_path / "cirr", "val")
    assert load_split("cirr", tmp_path / "cirr", "val").dataset == "cirr"
    for cat in ("dress", "shirt", "toptee"):
        write_fashioniq_fixture(tmp_path / "fiq", cat, "val")
    splits = load_splits("fashioniq", tmp_path / "fiq", "val", caption_policy="random")
    assert [s.category for s in splits] == ["dress", "shirt", "toptee"]
    assert all(s.meta["caption_policy"] == "random" for s in splits)
    assert [s.category for s in load_splits("fashioniq", tmp_path / "fiq", "val", categories="shirt")] == ["shirt"]
    write_circo_fixture(tmp_path / "circo", "val")
    assert load_split("circo", tmp_path / "circo", "val", use_shared_concept=True).meta["use_shared_concept"]
    fx = write_user_fixture(tmp_path / "user")
    assert len(load_splits("user", fx["jsonl"], "mine", image_root=fx["image_root"])[0].queries) == 2
    with pytest.raises(ConfigError, match="unknown dataset 'coco'"):
        load_split("coco", tmp_path, "val")
    with pytest.raises(ConfigError, match="fashioniq needs a category"):
        load_split("fashioniq", tmp_path / "fiq", "val")
    with pytest.raises(ConfigError, match="option 'caption_policy' does not apply to cirr"):
        load_split("cirr", tmp_path / "cirr", "val", caption_policy="eval")


# ---------------------------------------------------------------- torch datasets

def _pixels(name: str) -> torch.Tensor:
    return torch.full((3, 2, 2), float(len(name)))


def test_triplet_dataset_and_collate(tmp_path):
    fx = write_cirr_fixture(tmp_path, "val")
    ds = TripletDataset(load_cirr(tmp_path, "val"), _pixels)
    assert len(ds) == 4
    item = ds[1]
    assert item["reference_name"] == fx["entries"][1]["reference"]
    assert item["target_name"] == fx["entries"][1]["target_hard"]
    assert item["caption"] == fx["entries"][1]["caption"] and item["index"] == 1
    batch = collate_triplets([ds[i] for i in range(3)])
    assert batch["reference"].shape == (3, 3, 2, 2) and batch["target"].shape == (3, 3, 2, 2)
    assert batch["index"].tolist() == [0, 1, 2] and batch["index"].dtype == torch.long
    assert batch["caption"] == [fx["entries"][i]["caption"] for i in range(3)]
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_triplets)
    assert next(iter(loader))["target_name"] == [e["target_hard"] for e in fx["entries"]]
    qds = QueryDataset(load_cirr(tmp_path, "val"), _pixels)
    qb = collate_triplets([qds[0], qds[2]])
    assert qb["query_index"].tolist() == [0, 2] and qb["reference"].shape == (2, 3, 2, 2)


def test_triplet_dataset_needs_targets(tmp_path):
    write_cirr_fixture(tmp_path, "test1")
    split = load_cirr(tmp_path, "test1")
    with pytest.raises(DataError, match="without a target"):
        TripletDataset(split, _pixels)
    assert QueryDataset(split, _pixels)[0]["caption"] == "make it number 0"


def test_caption_sampling_deterministic_per_epoch(tmp_path):
    caps = [[f"is red {k}", f"has dots {k}"] for k in range(5)]
    write_fashioniq_fixture(tmp_path, "dress", "train", n_images=6, captions=caps)
    split = load_fashioniq(tmp_path, "train", "dress", caption_policy="random")

    def epoch_captions(seed, epoch):
        ds = TripletDataset(split, _pixels, seed=seed)
        ds.set_epoch(epoch)
        return [ds[i]["caption"] for i in range(len(ds))]

    assert epoch_captions(0, 1) == epoch_captions(0, 1)
    for i, c in enumerate(epoch_captions(0, 1)):
        assert c in split.queries[i]["caption_choices"]
    drawn = {tuple(epoch_captions(0, e)) for e in range(8)}
    assert len(drawn) > 1  # changes across epochs
    assert epoch_captions(0, 3) != epoch_captions(1, 3) or epoch_captions(0, 4) != epoch_captions(1, 4)


def test_collate_features():
    def feat(name: str) -> Features:
        return Features(pooled=torch.full((4,), float(len(name))), tokens=torch.zeros(3, 5))

    items = [{"reference": feat("ab"), "caption": "x", "index": 0},
             {"reference": feat("abc"), "caption": "y", "index": 1}]
    batch = collate_triplets(items)
    assert isinstance(batch["reference"], Features)
    assert batch["reference"].pooled.shape == (2, 4) and batch["reference"].tokens.shape == (2, 3, 5)
    assert batch["reference"].pooled[:, 0].tolist() == [2.0, 3.0] and batch["reference"].mask is None
    batched = [{"r": Features(torch.ones(1, 4), torch.ones(1, 3, 5), torch.ones(1, 3, dtype=torch.bool))}] * 2
    out = collate_triplets(batched)["r"]
    assert out.pooled.shape == (2, 4) and out.mask.shape == (2, 3)
