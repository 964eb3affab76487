"""Zero-shot textual inversion: slot injection, frozen towers, masks, pair files, open_clip path."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from composed_retrieval.data.nouns import mask_noun, noun_finder
from composed_retrieval.data.pairs import read_pairs
from composed_retrieval.encoders.registry import build_encoder
from composed_retrieval.errors import ConfigError, DataError
from composed_retrieval.methods.cam import apply_cam_mask, cam_drop_mask, grad_cam, noun_cams
from composed_retrieval.methods.registry import build_method
from composed_retrieval.methods.textual_inversion import splice_prompt
from composed_retrieval.synth.writer import write_synth


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zs") / "synth"
    write_synth(out, 0, "tiny", "cirr", workers=1)
    return out


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return build_encoder("open_clip:ViT-B-32", random_weights=True).eval()


def _transformer_input(encoder):
    """The module whose input is word embeddings + positions (the text transformer)."""
    return encoder.text.transformer if hasattr(encoder, "text") else encoder.model.transformer


@pytest.mark.parametrize("which", ["tiny", "vit"])
def test_pseudo_word_lands_in_the_slot_and_nowhere_else(which, request):
    torch.manual_seed(0)
    enc = build_encoder("tiny").eval() if which == "tiny" else request.getfixturevalue("vit")
    ids = enc.tokenize(["a photo of $ that is red", "$ on the left"])
    seen = []
    handle = _transformer_input(enc).register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            s1, s2 = torch.randn(2, enc.text_token_dim), torch.randn(2, enc.text_token_dim)
            out1 = enc.encode_text(ids, s1).pooled
            out2 = enc.encode_text(ids, s2).pooled
            enc.encode_text(ids)
    finally:
        handle.remove()
    x1, x2, x0 = seen
    slots = ids == enc.slot_token_id
    assert slots.sum(dim=1).tolist() == [1, 1]
    # other positions untouched: equal across slot embeddings and to the plain text's input
    assert torch.equal(x1[~slots], x2[~slots]) and torch.equal(x1[~slots], x0[~slots])
    # the slot holds exactly (slot embedding + position): the difference is s1 - s2
    assert torch.allclose((x1 - x2)[slots], (s1 - s2).to(x1.dtype), atol=1e-5)
    assert not torch.allclose(out1, out2)


@pytest.mark.parametrize("which", ["tiny", "vit"])
def test_prompt_splice_equals_tokenizing_the_whole_prompt(which, request):
    enc = build_encoder("tiny") if which == "tiny" else request.getfixturevalue("vit")
    caps = ["add a red circle at the top", "remove the square"]
    spliced = splice_prompt(enc, "a photo of $ that", enc.tokenize(caps))
    assert torch.equal(spliced, enc.tokenize([f"a photo of $ that {c}" for c in caps]))


def test_noun_masking_picks_the_shape_word():
    from composed_retrieval.synth.world import NOUNS
    find = noun_finder("synthetic", {"synthetic": NOUNS})
    cap = "a large red circle at the top left and a small blue square at the center"
    spans = find(cap)
    assert [cap[a:b] for a, b in spans] == ["circle", "square"]
    assert mask_noun(cap, spans, 1) == ("a large red circle at the top left and a small blue $ at the center", "square")
    assert find("a circular thing") == []          # whole words only
    words = noun_finder(["dog", "sofa"])
    cap2 = "A Dog sleeping on a sofa"
    assert mask_noun(cap2, words(cap2), 0) == ("A $ sleeping on a sofa", "Dog")


def test_pos_noun_detection_without_a_tagger_is_a_one_line_error():
    try:
        import nltk  # noqa: F401
        pytest.skip("a tagger package is installed")
    except ImportError:
        pass
    try:
        import spacy  # noqa: F401
        pytest.skip("a tagger package is installed")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match="part-of-speech tagger") as err:
        noun_finder("pos")("a dog")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("which", ["tiny", "vit"])
def test_cam_mask_shape_range_and_region(which, request):
    torch.manual_seed(0)
    enc = build_encoder("tiny").eval() if which == "tiny" else request.getfixturevalue("vit")
    size = enc.image_size
    pixels = torch.randn(2, 3, size, size)
    cam = noun_cams(enc, pixels, ["circle", "square"])
    assert cam.shape == (2, size, size)
    assert float(cam.min()) >= 0.0 and float(cam.max()) <= 1.0
    assert bool((cam.flatten(1).amax(dim=1) > 0.5).all())   # a peak (below 1 only by upsampling)
    region = cam > 0.3
    assert bool(region.flatten(1).any(dim=1).all())
    inside = region[:, None].expand_as(pixels)
    # "noun": the noun's region is masked, the rest kept
    masked = apply_cam_mask(pixels, cam, 0.3, region="noun")
    assert torch.equal(masked[inside], torch.zeros(int(region.sum()) * 3))
    assert torch.equal(masked[~inside], pixels[~inside])
    assert torch.equal(apply_cam_mask(pixels, cam, 0.3, region="highlighted"), masked)   # the old name
    # "unrelated" (the default): the noun's region kept, the rest masked
    kept = apply_cam_mask(pixels, cam, 0.3)
    assert torch.equal(kept[inside], pixels[inside]) and torch.equal(kept[~inside], torch.zeros(int((~inside).sum())))
    assert torch.equal(apply_cam_mask(pixels, cam, 0.3, region="rest"), kept)
    # the batch fill: masked pixels take the same pixels of the next image in the batch
    swapped = apply_cam_mask(pixels, cam, 0.3, region="noun", fill="batch")
    assert torch.equal(swapped[inside], pixels.roll(1, dims=0)[inside])
    assert torch.equal(swapped[~inside], pixels[~inside])
    # the text decides the map: a different text feature gives a different map
    other = grad_cam(enc, pixels, -enc.encode_texts(["a circle", "a square"]).pooled.detach())
    assert not torch.allclose(other, cam)


def _pair_file(tmp_path: Path, text: str, name: str = "pairs.tsv") -> Path:
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8), (10, 200, 10)).save(tmp_path / "b.png")
    p = tmp_path / name
    p.write_text(text)
    return p


def test_pair_file_reading_header_delimiter_and_roots(tmp_path):
    ps = read_pairs(_pair_file(tmp_path, "filepath\ttitle\na.png\ta red square\nb.png\ta green one\n"))
    assert ps.captions == ["a red square", "a green one"] and ps.paths == [tmp_path / "a.png", tmp_path / "b.png"]
    ps = read_pairs(_pair_file(tmp_path, 'a.png,"red, bright"\n', "x.csv"))      # no header, csv quoting
    assert ps.captions == ["red, bright"]
    sub = tmp_path / "lists"
    sub.mkdir()
    (sub / "p.tsv").write_text("image\tcaption\nb.png\tgreen\n")
    assert read_pairs(sub / "p.tsv", image_root=tmp_path).paths == [tmp_path / "b.png"]


def test_pairs_config_takes_a_file_or_an_object_naming_it(tmp_path):
    """``pairs`` is a path or {file, image_root, ...} (what zs_masked.json's notes advertise)."""
    from composed_retrieval.config import load_config
    from composed_retrieval.data.pairs import pairs_from_config

    f = _pair_file(tmp_path, "image\tcaption\na.png\tred\n")
    base = {"method": "textual_inversion", "encoder": "tiny", "dataset": "cirr", "root": str(tmp_path)}
    for spec in (str(f), {"file": str(f), "image_root": str(tmp_path)}):
        cfg = load_config(None, [], dict(base, pairs=spec))
        assert pairs_from_config(cfg, tmp_path).paths == [tmp_path / "a.png"]
    for bad, match in (({"image_root": "x"}, "'pairs' must be a path string or an object with a 'file' path"),
                       ({"file": str(tmp_path / "nope.tsv")}, "'pairs': .*nope.tsv not found")):
        with pytest.raises(ConfigError, match=match):
            load_config(None, [], dict(base, pairs=bad))


@pytest.mark.parametrize("text,match", [
    ("image\tlabel\na.png\tred\n", "no caption column"),
    ("caption\tfoo\nred\tx\n", "no image column"),
    ("image\tcaption\na.png\tred\nmissing.png\tblue\n", "1 of 2 images .* do not exist .*missing.png"),
    ("image\tcaption\na.png\n", "line 2 has 1 column"),
    ("image\tcaption\na.png\t \n", "line 2 has an empty caption"),
])
def test_pair_file_bad_input_is_a_one_line_error(tmp_path, text, match):
    with pytest.raises(DataError, match=match) as err:
        read_pairs(_pair_file(tmp_path, text))
    assert "\n" not in str(err.value) and "pairs.tsv" in str(err.value)


def test_phi_trains_while_both_towers_stay_frozen_in_the_shared_loop(synth, tmp_path):
    """Through the real Trainer (pair-training hook), masked noun + CAM objective."""
    from composed_retrieval.config import load_config
    from composed_retrieval.train import checkpoint as ckpt
    from composed_retrieval.train.loop import Trainer, build_method_from_config, seed_everything
    from safetensors.torch import save_file

    torch.manual_seed(1)
    enc = build_encoder("tiny")
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(tmp_path / "enc.safetensors"))
    cfg = load_config(None, explicit={
        "method": "textual_inversion", "encoder": "tiny", "encoder_checkpoint": str(tmp_path / "enc.safetensors"),
        "dataset": "cirr", "root": str(synth), "device": "cpu", "batch_size": 16, "max_steps_per_epoch": 3,
        "cache_dir": str(tmp_path / "cache"), "seed": 0,
        "method_config": {"noun_mask": True, "cam_mask": True, "nouns": "synthetic", "tau": 0.3},
        "stages": [{"name": "main", "epochs": 1, "lr": 1e-3}]})
    seed_everything(0)
    before = {k: v.clone() for k, v in build_method_from_config(cfg).state_dict().items()}
    Trainer(cfg, tmp_path / "run", resume=False, progress=False).run()
    after = ckpt.load_weights(tmp_path / "run" / "last")
    enc_keys = [k for k in before if k.startswith("encoder.")]
    phi_keys = [k for k in before if k.startswith("phi.")]
    assert enc_keys and phi_keys and set(before) == set(after)
    assert all(torch.equal(before[k], after[k]) for k in enc_keys)          # incl. batch-norm statistics
    assert all(not torch.equal(before[k], after[k]) for k in phi_keys if k.endswith("weight"))
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["steps"] == 3 and rec["masked_used"] == 16 and "masked" in rec and "recall@1" in rec["val"]


def test_open_clip_random_weights_whole_path(vit, synth):
    """phi -> slot -> text tower -> compose -> shared CIRR evaluation, and one masked training step."""
    from composed_retrieval.data.registry import load_splits
    from composed_retrieval.cache import encode_with
    from composed_retrieval.data.pixels import PixelSource
    from composed_retrieval.zeroshot.evaluate import zeroshot_evaluate

    torch.manual_seed(0)
    method = build_method("textual_inversion", vit, {"noun_mask": True, "cam_mask": True, "nouns": "synthetic"})
    assert method.phi.layers[0].in_features == 512 and method.phi.layers[-1].out_features == 512
    full = load_splits("cirr", synth, "val")[0]
    queries = full.queries[:3]                      # a small gallery keeps ViT-B/32 on CPU quick
    keep = list(dict.fromkeys(n for q in queries for n in [q["reference"], q["target"], *q["subset"]]))
    split = dataclasses.replace(full, queries=queries, gallery=keep)
    names = split.all_image_names()
    table = encode_with(vit, names, PixelSource(names, split.image_path, vit.image_transform(), progress=False),
                        batch_size=64, progress=False)
    metrics = zeroshot_evaluate(method, [split], [table])
    assert {"recall@1", "recall@50", "recall_subset@1"} <= set(metrics)
    source = PixelSource(names[:2], split.image_path, vit.image_transform(), progress=False)
    pixels = torch.stack([source(n) for n in names[:2]])
    method.train()
    vit.eval()
    for p in vit.parameters():
        p.requires_grad_(False)
    out = method({"reference": pixels, "target": pixels,
                  "caption": ["a large red circle on the left", "a small blue square"]})
    out["loss"].backward()
    assert method.phi.layers[0].weight.grad is not None and float(out["masked_used"]) == 2
    assert all(p.grad is None for p in vit.parameters())


def test_fashioniq_queries_use_both_caption_orders(synth):
    from composed_retrieval.data.base import CIRSplit
    from composed_retrieval.zeroshot.evaluate import fashioniq_orders

    split = CIRSplit("fashioniq", "val", [{"query_id": "dress/0", "reference": "r", "target": "t",
                                           "caption": "Is red and has dots", "captions": ["is red.", " has dots?"]}],
                     ["r", "t"], {}, protocol="fashioniq", category="dress")
    a, b = fashioniq_orders(split)
    assert a.queries[0]["caption"] == "is red and has dots" and b.queries[0]["caption"] == "has dots and is red"


def test_pretrain_checkpoint_loads_as_encoder_weights(synth, tmp_path):
    from composed_retrieval.train.pretrain import pretrain_tiny

    res = pretrain_tiny(synth / "pairs" / "train.tsv", tmp_path / "pre", epochs=1, batch_size=32,
                        image_root=synth, max_pairs=64, progress=False)
    assert res["n_pairs"] == 64 and res["history"][0]["loss"] > 0
    enc = build_encoder("tiny", checkpoint=res["checkpoint"])
    fresh = build_encoder("tiny")
    assert not all(torch.equal(a, b) for a, b in zip(enc.state_dict().values(), fresh.state_dict().values()))


def test_circo_zero_shot_path_runs_on_circo_format(tmp_path, capsys, monkeypatch):
    """phi on a CIRCO-format folder (annotations + COCO unlabeled ids): every query is scored
    with mAP@K; with 6 gallery images both ground truths of a query lie in the top 50. The
    temporary feature cache of a call without one is removed, also when the call fails."""
    import tempfile

    from fixtures_data import write_circo_fixture

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    from composed_retrieval.cli import main
    from composed_retrieval.zeroshot.commands import evaluate_zeroshot

    write_circo_fixture(tmp_path / "circo")
    torch.manual_seed(0)
    method = build_method("textual_inversion", build_encoder("tiny")).eval()
    got = evaluate_zeroshot(method, "circo", str(tmp_path / "circo"), "val", device="cpu",
                            cache_dir=str(tmp_path / "cache"))
    assert set(got) == {"map@5", "map@10", "map@25", "map@50"}
    assert 0.0 < got["map@50"] <= 100.0 and got["map@5"] <= got["map@10"] <= got["map@50"]
    assert main(["zeroshot-eval", "--method", "image_only", "--random-weights", "--dataset", "circo", "--root", str(tmp_path / "circo"),
                 "--device", "cpu", "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == set(got) | {"model", "gallery"} and 0.0 < printed["map@50"] <= 100.0
    assert printed["gallery"]["reference_removed"] is False and printed["model"]["encoder"]["name"] == "tiny"
    for command in (["zeroshot-eval", "--method", "image_only"], ["eval", "--encoder", "tiny", "--method", "sum"]):
        with pytest.raises(SystemExit):
            main([*command, "--random-weights", "--dataset", "circo", "--root", str(tmp_path / "circo"),
                  "--split", "no_such_split", "--device", "cpu", "--quiet"])
    assert [p.name for p in scratch.iterdir() if p.name.startswith("cir-")] == []


# ---- masking direction: complementary pairs by default (issue 13) ---------------------------
def test_render_masks_are_the_objects_pixels_and_leave_the_image_unchanged():
    import numpy as np

    from composed_retrieval.synth.render import COLOR_RGB, render_scene
    from composed_retrieval.synth.world import Obj, make_scene

    scene = make_scene([Obj(0, "circle", "red", "large"), Obj(4, "triangle", "blue", "small"),
                        Obj(8, "square", "yellow", "large")])
    masks: list = []
    img = np.asarray(render_scene(scene, 64, np.random.default_rng(5), masks=masks)).astype(float)
    plain = np.asarray(render_scene(scene, 64, np.random.default_rng(5))).astype(float)
    assert np.array_equal(img, plain) and len(masks) == 3          # the masks take nothing from the rng
    covered = np.zeros((64, 64), dtype=bool)
    for o, m in zip(scene, masks):
        on = m >= 0.99
        assert on.sum() > 20
        # inside an object's mask the pixels have its colour (jitter 12 + noise), outside none of them
        assert np.abs(img[on] - np.array(COLOR_RGB[o.color])).max(axis=1).mean() < 25
        covered |= m > 0
    background = img[~covered]
    assert np.abs(background - background.mean(axis=0)).max(axis=1).mean() < 15


def test_cam_iou_and_object_survival_under_both_directions():
    """The scoring of benchmarks/cam_masking.py: a perfect CAM (the object itself) has IoU 1, and
    the default direction keeps the whole object while the other removes it; for a real CAM the
    two directions' survivals add up to one (each object pixel is kept by exactly one)."""
    from composed_retrieval.zeroshot.cam_check import masking_report, synthetic_scenes

    torch.manual_seed(0)
    enc = build_encoder("tiny").eval()
    scenes = synthetic_scenes(enc, 12, seed=1)
    assert scenes.pixels.shape == (12, 3, enc.image_size, enc.image_size)
    for cap, masked, noun, obj in zip(scenes.captions, scenes.masked_captions, scenes.nouns, scenes.objects):
        assert noun in ("circle", "square", "triangle") and "$" in masked and masked.replace("$", noun) == cap
        assert obj.sum() > 0
    perfect = masking_report(enc, scenes, (0.3,), cam=scenes.objects.float())["0.3"]
    assert perfect["iou"] == 1.0 and perfect["survival_unrelated"] == 1.0 and perfect["survival_noun"] == 0.0
    # a CAM shifted off the objects finds none of them: IoU 0, and the default keeps nothing either
    away = masking_report(enc, scenes, (0.3,), cam=(~scenes.objects).float())["0.3"]
    assert away["iou"] == 0.0 and away["survival_unrelated"] == 0.0 and away["survival_noun"] == 1.0
    real = masking_report(enc, scenes, (0.2, 0.4))
    for r in real.values():
        assert 0.0 <= r["iou"] <= 1.0
        assert r["survival_unrelated"] + r["survival_noun"] == pytest.approx(1.0, abs=1e-6)
    assert real["0.2"]["region_area"] > real["0.4"]["region_area"]


@pytest.mark.parametrize("region", ["unrelated", "noun"])
def test_masked_objective_pairs_text_and_image_complementarily_by_default(region):
    """What phi sees in the masked objective: the caption with its noun replaced by "$" and the
    image with the part unrelated to that noun masked (default), or the noun's region masked."""
    from composed_retrieval.methods.textual_inversion import DEFAULTS

    assert DEFAULTS["cam_region"] == "unrelated"
    torch.manual_seed(0)
    enc = build_encoder("tiny").eval()
    config = {"noun_mask": True, "cam_mask": True, "nouns": "synthetic", "tau": 0.3, "cam_fill": "mean"}
    if region != "unrelated":
        config["cam_region"] = region
    method = build_method("textual_inversion", enc, config)
    captions = ["a large red circle at the top left", "a small blue square at the center",
                "a large green triangle at the bottom"]
    pixels = torch.randn(3, 3, enc.image_size, enc.image_size)
    seen_pixels, seen_ids = [], []
    h1 = enc.visual.register_forward_pre_hook(lambda _m, args: seen_pixels.append(args[0].detach().clone()))
    h2 = enc.text.register_forward_pre_hook(lambda _m, args: seen_ids.append(args[0].detach().clone()))
    try:
        method.train()
        out = method({"reference": pixels, "target": pixels, "caption": captions})
    finally:
        h1.remove()
        h2.remove()
    assert float(out["masked_used"]) == 3
    cam = noun_cams(enc, pixels, ["circle", "square", "triangle"])
    query = seen_pixels[-1]           # the masked query image (after the CAM passes)
    drop = cam_drop_mask(cam, 0.3, region)
    expect = pixels.masked_fill(drop[:, None].expand_as(pixels), 0.0)
    assert torch.equal(query, expect)
    inside = (cam > 0.3)[:, None].expand_as(pixels)
    if region == "unrelated":         # the image keeps the noun's object
        assert torch.equal(query[inside], pixels[inside]) and bool((query[~inside] == 0).all())
    else:                             # the noun leaves the image too
        assert bool((query[inside] == 0).all()) and torch.equal(query[~inside], pixels[~inside])
    masked_texts = [c.replace(n, "$") for c, n in zip(captions, ["circle", "square", "triangle"])]
    assert any(torch.equal(ids, enc.tokenize(masked_texts)) for ids in seen_ids)
    with pytest.raises(ConfigError, match="cam_region"):
        build_method("textual_inversion", enc, {"cam_region": "highlight"})
