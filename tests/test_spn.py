"""SPN: generated positives (files, determinism, duplicates) and the static-negative stage
(bank never optimised, loss by hand, k-sampling)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from composed_retrieval.cli import main
from composed_retrieval.config import load_config
from composed_retrieval.data.cirr import load_cirr
from composed_retrieval.data.fashioniq import load_fashioniq
from composed_retrieval.encoders.base import Features
from composed_retrieval.encoders.registry import build_encoder
from composed_retrieval.encoders.tokenizer import split_words
from composed_retrieval.errors import ConfigError
from composed_retrieval.methods.registry import build_method
from composed_retrieval.spn.bank import (NegativeBank, StaticNegatives, bank_loss, build_bank, read_options,
                                         sample_candidates)
from composed_retrieval.spn.captioners import build_captioner
from composed_retrieval.spn.generate import TEMPLATES, content_groups
from composed_retrieval.train.loop import Trainer
from composed_retrieval.cache import FeatureTable

SMALL = {"image_width": 32, "text_width": 64, "embed_dim": 64}


@pytest.fixture(scope="module")
def cirr_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from composed_retrieval.synth.writer import write_synth
    out = tmp_path_factory.mktemp("spn") / "cirr"
    write_synth(out, seed=0, size="tiny", workers=1)
    return out


def _generate(root: Path, *extra: str, dataset: str = "cirr") -> None:
    args = ["spn", "generate", "--dataset", dataset, "--root", str(root), "--encoder", "tiny",
            "--captioner", "scenes", "--window", "5,40", "--device", "cpu", "--quiet", *extra]
    assert main(args) == 0


def test_short_scene_captions_fit_the_templates_where_full_ones_fall_back(cirr_root: Path) -> None:
    """scenes:short (colour and shape per object, like SPN's 8-word captions) makes most texts
    real templates; the full scene captions mostly do not fit the tiny tower's 32 tokens."""
    from composed_retrieval.spn.captioners import build_captioner
    from composed_retrieval.synth import world

    scenes = json.loads((cirr_root / "scenes" / "train.json").read_text())
    names = sorted(scenes)[:50]
    short = build_captioner("scenes:short", cirr_root, "train").captions(names, lambda n: Path(n))
    for name, cap in zip(names, short):
        objects = scenes[name]["objects"]
        assert cap == world.short_caption(world.scene_from_dicts(objects))
        assert len(cap.split()) <= 2 * len(objects) + 1 and all(o["color"] in cap and o["shape"] in cap for o in objects)
    counts = {}
    for spec in ("scenes", "scenes:short"):
        split = "short" if spec == "scenes:short" else "full"
        assert main(["spn", "generate", "--dataset", "cirr", "--root", str(cirr_root), "--encoder", "tiny",
                     "--captioner", spec, "--window", "5,40", "--out-split", split, "--device", "cpu", "--quiet"]) == 0
        m = json.loads((cirr_root / f"spn.{split}.json").read_text())
        counts[spec] = m["texts_shortened_to_B"] / (2 * m["total_triplets"])
        assert m["options"]["captioner"] == spec
    assert counts["scenes:short"] < 0.2 < counts["scenes"]
    with pytest.raises(ConfigError, match="unknown captioner 'scenes:long'"):
        build_captioner("scenes:long", cirr_root, "train")


def _files(root: Path, split: str = "spn") -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.glob(f"*/*.{split}.json"))}


def _cfg(root: Path, **over) -> dict:
    base = {"method": "combiner", "encoder": "tiny", "encoder_config": SMALL, "dataset": "cirr", "root": str(root),
            "batch_size": 8, "seed": 0, "device": "cpu", "max_steps_per_epoch": 2,
            "stages": [{"name": "combiner", "epochs": 1, "lr": 1e-3, "spn_negatives": {"tau": 0.03}}]}
    base.update(over)
    return load_config(None, [], base)


# ---- generated positives ---------------------------------------------------------------------
def test_generated_cirr_files_load_and_train(cirr_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _generate(cirr_root)
    capsys.readouterr()
    gen = load_cirr(cirr_root, "spn")
    scenes = json.loads((cirr_root / "scenes" / "train.json").read_text())
    assert len(gen.queries) == len(load_cirr(cirr_root, "train").all_image_names())   # one partner per image
    manifest = json.loads((cirr_root / "spn.spn.json").read_text())
    context = build_encoder("tiny").tokenizer.context_length
    shortened = 0
    for q in gen.queries:
        a, b = scenes[q["reference"]]["caption"], scenes[q["target"]]["caption"]
        # one text per allowed template (0 and 1), in order; the first is the CIRR "caption"
        assert len(q["caption_choices"]) == 2 and q["caption"] == q["caption_choices"][0]
        for t, text in zip((0, 1), q["caption_choices"]):
            full = TEMPLATES[t].format(A=a, B=b)
            if text == b:   # only a template text too long for the text tower falls back to "{B}"
                shortened += 1
                assert len(split_words(full)) + 2 > context
            else:
                assert text == full and len(split_words(text)) + 2 <= context
        assert q["target"] != q["reference"] and len(q["subset"]) == 5 and q["target"] in q["subset"]
        assert gen.image_path(q["target"]) == load_cirr(cirr_root, "train").image_path(q["target"])
    assert manifest["texts_shortened_to_B"] == shortened < 2 * len(gen.queries)
    run = tmp_path / "run"
    cfg = _cfg(cirr_root, extra_train_splits=["spn"], stages=[
        {"name": "combiner", "epochs": 1, "lr": 1e-3, "spn_negatives": {"tau": 0.03, "k": 4}}])
    Trainer(cfg, run, progress=False).run()
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["steps"] == 2 and rows[0]["spn_negatives"] > 0
    meta = json.loads((run / "spn_bank" / "stage0.json").read_text())
    assert meta["shape"][0] == len(load_cirr(cirr_root, "train").all_image_names())


def test_generated_fashioniq_files_load_and_train(tmp_path: Path) -> None:
    from composed_retrieval.synth.writer import write_synth
    root = tmp_path / "fiq"
    write_synth(root, seed=0, size="tiny", fmt="fashioniq", workers=1)
    _generate(root, "--templates", "0,1,2", dataset="fashioniq")
    for cat in ("dress", "shirt", "toptee"):
        split = load_fashioniq(root, "spn", cat, caption_policy="random")
        assert split.queries and all(len(q["captions"]) == 2 for q in split.queries)
        for q in split.queries:   # one text per template (0, 1, 2); the format's two captions repeat the first two
            assert len(q["caption_choices"]) == 3 and q["captions"] == q["caption_choices"][:2]
            assert q["caption"] == q["caption_choices"][0]
        assert any(len(set(q["caption_choices"])) > 1 for q in split.queries)
    cfg = _cfg(root, dataset="fashioniq", categories=["shirt"], extra_train_splits=["spn"], max_steps_per_epoch=1)
    Trainer(cfg, tmp_path / "run", progress=False).run()
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["steps"] == 1


def test_same_seed_same_bytes_other_seed_differs(cirr_root: Path, capsys: pytest.CaptureFixture) -> None:
    _generate(cirr_root, "--out-split", "seedtest", "--seed", "3")
    first = _files(cirr_root, "seedtest")
    assert set(first) == {"cap.rc2.seedtest.json", "split.rc2.seedtest.json"}
    _generate(cirr_root, "--out-split", "seedtest", "--seed", "3")
    assert _files(cirr_root, "seedtest") == first
    _generate(cirr_root, "--out-split", "seedtest", "--seed", "4")
    assert _files(cirr_root, "seedtest")["cap.rc2.seedtest.json"] != first["cap.rc2.seedtest.json"]


def test_duplicate_images_are_removed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from composed_retrieval.synth.writer import write_synth
    root = tmp_path / "dup"
    write_synth(root, seed=0, size="tiny", workers=1)
    split_file = root / "image_splits" / "split.rc2.train.json"
    rel = json.loads(split_file.read_text())
    original = "train-0-0-img0"
    shutil.copyfile(root / rel[original], root / "train" / "0" / "copy-of-img0.png")
    rel["copy-of-img0"] = "./train/0/copy-of-img0.png"
    split_file.write_text(json.dumps(rel))
    caps = json.loads((root / "captions" / "cap.rc2.train.json").read_text())
    extra = dict(caps[0], pairid=99999, reference="copy-of-img0",
                 img_set={"id": 999, "members": ["copy-of-img0", caps[0]["target_hard"]]})
    (root / "captions" / "cap.rc2.train.json").write_text(json.dumps(caps + [extra]))
    scenes = json.loads((root / "scenes" / "train.json").read_text())
    scenes["copy-of-img0"] = scenes[original]
    (root / "scenes" / "train.json").write_text(json.dumps(scenes))

    _generate(root, "--window", "all", "--per-image", "3")
    manifest = json.loads((root / "spn.spn.json").read_text())
    assert manifest["duplicates_removed"] == [["copy-of-img0", original]]
    assert all(b"copy-of-img0" not in data for data in _files(root).values())
    train = load_cirr(root, "train")
    assert content_groups(train.all_image_names(), train.image_path)["copy-of-img0"] == original
    # the bank gives a duplicate the row of the image it duplicates
    names = train.all_image_names()
    table = FeatureTable(names, Features(torch.randn(len(names), 8), torch.zeros(len(names), 0, 4)))
    method = build_method("combiner", build_encoder("tiny", **SMALL), {})
    bank = build_bank(method, [train], [table])
    assert len(bank) == len(names) - 1
    assert bank.rows(["copy-of-img0"]).item() == bank.rows([original]).item()


# ---- static negatives ------------------------------------------------------------------------
def test_bank_is_not_updated_by_the_optimizer() -> None:
    torch.manual_seed(0)
    method = build_method("combiner", build_encoder("tiny", **SMALL), {})
    method.set_stage("combiner")
    d, n, b = method.encoder.embed_dim, 12, 6
    bank = NegativeBank(torch.randn(n, d), [f"img{i}" for i in range(n)])
    before = bank.vectors.clone()
    step = StaticNegatives(bank, read_options({"name": "combiner", "spn_negatives": {"tau": 0.03}}))
    params = method.trainable_parameters()
    assert list(bank.parameters()) == [] and "vectors" in dict(bank.named_buffers())
    assert not bank.vectors.requires_grad
    assert all(p is not bank.vectors for p in params) and all(p is not bank.vectors for p in method.parameters())
    head_before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    batch = {"reference": Features(torch.randn(b, d), torch.randn(b, 4, method.encoder.image_token_dim)),
             "target": Features(torch.randn(b, d), torch.randn(b, 4, method.encoder.image_token_dim)),
             "text": method.encoder.tokenize(["add a red circle"] * b),
             "target_name": [f"img{i}" for i in range(b)]}
    method.train()
    for _ in range(3):
        out = step(method, batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert torch.equal(bank.vectors, before)
    assert any(not torch.equal(a, p) for a, p in zip(head_before, params))   # the optimizer did step


def test_bank_loss_equals_hand_computation() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]])
    q = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    tau = 0.5
    target = torch.tensor([3, 1])
    expected = 0.0
    for i in range(2):
        logits = [sum(a * b for a, b in zip(q[i].tolist(), row)) / tau for row in bank.tolist()]
        expected += -(logits[target[i]] - math.log(sum(math.exp(x) for x in logits)))
    expected /= 2
    assert bank_loss(q, bank, target, tau).item() == pytest.approx(expected, rel=1e-6)

    class Fixed:  # the stage hook maps target names to bank rows and uses the method's query
        def query_from_batch(self, batch: dict) -> torch.Tensor:
            return q

    step = StaticNegatives(NegativeBank(bank, ["a", "b", "c", "d"]), {"tau": tau, "k": None, "method_loss_weight": 0.0})
    assert step(Fixed(), {"target_name": ["d", "b"]})["loss"].item() == pytest.approx(expected, rel=1e-6)


def test_k_sampling_includes_the_target() -> None:
    gen = torch.Generator().manual_seed(0)
    target = torch.tensor([0, 4, 9, 4, 7])
    for _ in range(20):
        cand = sample_candidates(target, 10, 3, gen)
        assert cand.shape == (5, 4) and torch.equal(cand[:, 0], target)
        for row, t in zip(cand.tolist(), target.tolist()):
            assert t not in row[1:] and len(set(row)) == 4 and all(0 <= r < 10 for r in row)
    # the sampled loss is the cross-entropy over exactly these candidates, target first
    bank = torch.nn.functional.normalize(torch.randn(10, 3, generator=gen), dim=-1)
    q = torch.nn.functional.normalize(torch.randn(5, 3, generator=gen), dim=-1)
    cand = sample_candidates(target, 10, 3, torch.Generator().manual_seed(7))
    logits = torch.stack([bank[c] @ q[i] for i, c in enumerate(cand)]) / 0.05
    expected = torch.nn.functional.cross_entropy(logits, torch.zeros(5, dtype=torch.long))
    got = bank_loss(q, bank, target, 0.05, k=3, generator=torch.Generator().manual_seed(7))
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


# ---- errors ----------------------------------------------------------------------------------
def test_bad_settings_are_one_line_errors(cirr_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ConfigError, match="tau must be a positive"):
        read_options({"name": "x", "spn_negatives": {"tau": 0}})
    with pytest.raises(ConfigError, match="unknown option"):
        read_options({"name": "x", "spn_negatives": {"temperature": 0.02}})
    cfg = _cfg(cirr_root, stages=[{"name": "finetune", "epochs": 1, "train_image_tower": True,
                                   "spn_negatives": {"tau": 0.02}}])
    with pytest.raises(ConfigError, match="frozen image tower"):
        Trainer(cfg, tmp_path / "run", progress=False).run()
    with pytest.raises(SystemExit) as exc:
        _generate(cirr_root, "--out-split", "bigwindow", "--window", "500,900")
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error:") and "window is empty" in err and err.count("\n") == 1
    with pytest.raises(SystemExit):
        _generate(cirr_root, "--out-split", "train")
    assert "would replace an original split" in capsys.readouterr().err
    # an empty folder: "needs transformers" without the package, "cannot load" with it
    with pytest.raises(ConfigError, match="transformers|cannot load an image-to-text model"):
        build_captioner(f"model:{tmp_path}", cirr_root, "train")


def test_caption_file_formats(tmp_path: Path) -> None:
    tsv = tmp_path / "caps.tsv"
    tsv.write_text("image\tcaption\ntrain/0/a.png\ta red circle\nb\t a  blue square \n")
    cap = build_captioner(f"file:{tsv}", tmp_path, "train")
    assert cap.captions(["a", "b"], Path) == ["a red circle", "a blue square"]
    js = tmp_path / "caps.json"
    js.write_text(json.dumps([{"image": "a", "caption": "x"}]))
    assert build_captioner(f"file:{js}", tmp_path, "train").captions(["a"], Path) == ["x"]
    from composed_retrieval.errors import DataError
    with pytest.raises(DataError, match="no caption for image 'c'"):
        cap.captions(["c"], Path)


def test_positives_can_join_one_stage_only(cirr_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """SPN4CIR's recipe: stage 1 on the real triplets, positives only in the bank stage."""
    from composed_retrieval.spn.bank import training_splits
    if not (cirr_root / "captions" / "cap.rc2.spn.json").is_file():
        _generate(cirr_root)
        capsys.readouterr()
    stages = [{"name": "finetune", "epochs": 1, "lr": 1e-3, "extra_train_splits": [], "train_text_tower": True},
              {"name": "combiner", "epochs": 1, "lr": 1e-3, "spn_negatives": {"tau": 0.03}}]
    cfg = _cfg(cirr_root, extra_train_splits=["spn"], stages=stages)
    load = lambda name: [load_cirr(cirr_root, name)]   # noqa: E731
    base = load("train")
    assert [s.split for s in training_splits(cfg, False, base, load, stages[0])] == ["train"]
    assert [s.split for s in training_splits(cfg, False, base, load, stages[1])] == ["train", "spn"]
    assert [s.split for s in training_splits(cfg, False, base, load, None)] == ["train", "spn"]
    run = tmp_path / "run"
    Trainer(cfg, run, progress=False).run()
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["finetune", "combiner"]
    with pytest.raises(ConfigError, match=r"stages\[0\]\.extra_train_splits"):
        _cfg(cirr_root, stages=[{"name": "x", "epochs": 1, "extra_train_splits": "spn"}])


# ---- SPN as SPN4CIR does it (issue 13) --------------------------------------------------------
def test_template_is_drawn_each_time_a_generated_triplet_is_read(cirr_root: Path, capsys: pytest.CaptureFixture) -> None:
    """SPN4CIR stores one text per template and draws one per read (random.choice); here the draw
    is per (seed, epoch, index), so a run repeats and epochs differ."""
    from composed_retrieval.data.triplets import TripletDataset
    if not (cirr_root / "captions" / "cap.rc2.spn.json").is_file():
        _generate(cirr_root)
        capsys.readouterr()
    split = load_cirr(cirr_root, "spn")
    data = TripletDataset(split, image_fn=lambda name: name, seed=0)
    drawn: dict[int, set[str]] = {i: set() for i in range(len(data))}
    for epoch in range(8):
        data.set_epoch(epoch)
        texts = [data[i]["caption"] for i in range(len(data))]
        assert texts == [data[i]["caption"] for i in range(len(data))]     # same epoch and seed: same texts
        for i, t in enumerate(texts):
            assert t in split.queries[i]["caption_choices"]
            drawn[i].add(t)
    two = [i for i, q in enumerate(split.queries) if len(set(q["caption_choices"])) == 2]
    assert two and sum(len(drawn[i]) == 2 for i in two) >= 0.8 * len(two)     # both templates are read
    other = TripletDataset(split, image_fn=lambda name: name, seed=1)
    assert [other[i]["caption"] for i in two] != [TripletDataset(split, lambda n: n, seed=0)[i]["caption"] for i in two]


def test_generated_fashioniq_triplets_are_never_concatenated(tmp_path: Path) -> None:
    from composed_retrieval.data.triplets import TripletDataset
    from composed_retrieval.synth.writer import write_synth
    root = tmp_path / "fiq"
    write_synth(root, seed=0, size="tiny", fmt="fashioniq", workers=1)
    _generate(root, "--templates", "0,1", "--categories", "dress", dataset="fashioniq")
    stored = json.loads((root / "captions" / "cap.dress.spn.json").read_text())
    for policy in ("random", "eval"):
        split = load_fashioniq(root, "spn", "dress", caption_policy=policy)
        for q, e in zip(split.queries, stored):
            assert q["caption"] == e["caption_choices"][0]             # not "C1 and c2"
            assert q.get("caption_choices", e["caption_choices"]) == e["caption_choices"]
        data = TripletDataset(split, image_fn=lambda name: name, seed=0)
        for epoch in range(3):
            data.set_epoch(epoch)
            assert all(data[i]["caption"] in stored[i]["caption_choices"] for i in range(len(data)))
    # the original triplets still get CLIP4Cir's four variants, "c1 and c2" among them
    real = load_fashioniq(root, "train", "dress", caption_policy="random").queries[0]
    c1, c2 = (c.strip(".?, ") for c in real["captions"])
    assert f"{c1.capitalize()} and {c2}" in real["caption_choices"]


def test_a_text_of_exactly_the_context_length_fits(cirr_root: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    """clip.tokenize accepts a text of exactly the context length (SPN keeps it); one token more
    falls back to "{B}"."""
    import open_clip

    from composed_retrieval.spn.commands import fits_context
    tiny = build_encoder("tiny")
    n = tiny.tokenizer.context_length
    assert fits_context(tiny, " ".join(["red"] * (n - 2)))          # BOS + n-2 words + EOS = n tokens
    assert not fits_context(tiny, " ".join(["red"] * (n - 1)))
    assert fits_context(tiny, "red circle")

    class OpenClipTokens:   # open_clip's own tokenizer, as the open_clip encoder holds it
        tokenizer = open_clip.get_tokenizer("ViT-B-32")

        def tokenize(self, texts: list[str]) -> torch.Tensor:
            return self.tokenizer(texts)

    clip_like = OpenClipTokens()
    assert int(clip_like.tokenize(["cat " * 75])[0].argmax()) == 76          # 75 words: 77 tokens exactly
    assert fits_context(clip_like, "cat " * 75) and not fits_context(clip_like, "cat " * 76)

    # through the command: "Unlike {A}, I want {B}" of exactly n tokens is kept, n + 2 is not
    names = load_cirr(cirr_root, "train").all_image_names()
    for words, shortened in ((n // 2 - 3, 0), (n // 2 - 2, len(names))):   # 6 + 2 * words tokens
        caps = tmp_path / f"caps{words}.json"
        caps.write_text(json.dumps({name: " ".join(["red"] * words) for name in names}))
        _generate(cirr_root, "--out-split", f"ctx{words}", "--captioner", f"file:{caps}", "--templates", "1")
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert out["texts_shortened_to_B"] == shortened
        gen = load_cirr(cirr_root, f"ctx{words}")
        assert all(q["caption"].startswith("Unlike ") == (shortened == 0) for q in gen.queries)
    # the tokenizer that decides is the text tower's (--text-encoder), not the ranking model's
    from composed_retrieval.train.checkpoint import save_method
    wide = save_method(build_method("sum", build_encoder("tiny", **SMALL, context_length=2 * n), {}), tmp_path / "wide")
    _generate(cirr_root, "--out-split", "ctxwide", "--captioner", f"file:{caps}", "--templates", "1",
              "--text-encoder", str(wide))
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["texts_shortened_to_B"] == 0
    assert json.loads((cirr_root / "spn.ctxwide.json").read_text())["texts_fitted_to"]["method"] == "sum"


def test_rank_window_counts_the_other_images_and_partners_follow_the_given_features(
        cirr_root: Path, capsys: pytest.CaptureFixture) -> None:
    """Rank 0 is the nearest *other* image (SPN4CIR's ranks put the image itself at 0); the
    partners come from the features the command is given (SPN4CIR: a separate image model)."""
    import numpy as np

    from composed_retrieval.spn.generate import RANK_ORIGIN, SPNOptions, generate, rank_windows
    angles = torch.tensor([0.0, 10.0, 25.0, 45.0, 90.0]) * math.pi / 180
    vecs = torch.stack([angles.cos(), angles.sin()], dim=1)
    windows, nearest = rank_windows(vecs, (0, 1), near=2)
    assert [int(w[0]) for w in windows] == [1, 0, 1, 2, 3]                  # never the row itself
    windows, _ = rank_windows(vecs, (1, 3), near=1)
    assert [int(x) for x in windows[0]] == [2, 3] and nearest[0].tolist() == [1, 2]

    gen = torch.Generator().manual_seed(3)
    given: dict[str, torch.Tensor] = {}

    def encode(split, names):   # stands for any image model's features
        v = torch.randn(len(names), 16, generator=gen)
        given.update(zip(names, torch.nn.functional.normalize(v, dim=-1)))
        return v

    opts = SPNOptions(dataset="cirr", root=str(cirr_root), out_split="ranktest", window=(0, 1), seed=0,
                      extra={"ranked_by": {"encoder": "test features"}})
    manifest = generate(opts, build_captioner("scenes", cirr_root, "train"), encode, progress=False)
    assert manifest["rank_origin"] == RANK_ORIGIN and "itself" in RANK_ORIGIN
    assert manifest["ranked_by"] == {"encoder": "test features"}
    names = list(given)
    matrix = torch.stack([given[n] for n in names])
    sims = matrix @ matrix.t()
    sims.fill_diagonal_(-np.inf)
    for q in load_cirr(cirr_root, "ranktest").queries:
        assert q["target"] == names[int(sims[names.index(q["reference"])].argmax())]
    _generate(cirr_root, "--out-split", "ranktest2")
    capsys.readouterr()
    recorded = json.loads((cirr_root / "spn.ranktest2.json").read_text())
    assert recorded["ranked_by"]["encoder"]["name"] == "tiny" and recorded["rank_origin"] == RANK_ORIGIN


def test_spn4cir_clip4cir_stage2_preset(cirr_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """configs/spn_clip4cir.json: raw element-wise sum, no Combiner, image tower frozen, text tower
    trained, bank tau 0.02, lr 2e-5, batch 256, 3 epochs, positives in this stage."""
    from composed_retrieval.train import checkpoint as ckpt
    from composed_retrieval.train.loop import build_method_from_config, seed_everything
    path = Path(__file__).resolve().parents[1] / "src" / "composed_retrieval" / "configs" / "spn_clip4cir.json"
    cfg = load_config(str(path), [])
    (stage,) = cfg["stages"]
    assert cfg["method"] == "sum" and cfg["method_config"] == {"fusion": "raw"}
    assert cfg["encoder"] == "open_clip:RN50x4" and cfg["batch_size"] == 256 and not cfg["grad_clip"]
    assert stage["epochs"] == 3 and stage["lr"] == 2e-5 and stage["extra_train_splits"] == ["spn"]
    assert stage["train_image_tower"] is False and stage["train_text_tower"] is True
    assert read_options(stage)["tau"] == 0.02 and read_options(stage)["k"] is None
    assert read_options({"name": "x", "spn_negatives": {}})["tau"] == 0.02      # CLIP4Cir's value is the default
    enc = build_encoder("tiny", **SMALL)
    try:
        method = build_method("sum", enc, cfg["method_config"])
    except ConfigError as exc:
        if "fusion" not in str(exc):
            raise
        pytest.skip("the sum method's 'fusion' option (issue 13 part A) is not merged yet")
    ref = Features(torch.randn(4, SMALL["embed_dim"]) * 3, torch.zeros(4, 1, 1))
    txt = Features(torch.randn(4, SMALL["embed_dim"]), torch.zeros(4, 1, 1))
    expect = torch.nn.functional.normalize(ref.pooled + txt.pooled, dim=-1)      # SPN4CIR element_wise_sum
    assert torch.allclose(method.compose(ref, txt), expect, atol=1e-6)

    if not (cirr_root / "captions" / "cap.rc2.spn.json").is_file():
        _generate(cirr_root)
        capsys.readouterr()
    small = {**cfg, "encoder": "tiny", "encoder_config": SMALL, "root": str(cirr_root), "batch_size": 8,
             "device": "cpu", "max_steps_per_epoch": 2, "amp": False,
             "stages": [{**stage, "epochs": 1}]}
    small = load_config(None, [], small)
    seed_everything(small["seed"])     # the Trainer builds the method after seeding with the config's seed
    before = {k: v.clone() for k, v in build_method_from_config(small).state_dict().items()}
    run = tmp_path / "run"
    Trainer(small, run, progress=False).run()
    after = ckpt.load_weights(run / "last")
    image_keys = [k for k in before if k.startswith("encoder.visual.")]
    text_keys = [k for k in before if k.startswith("encoder.text.") and k.endswith("weight")]
    assert image_keys and text_keys
    assert all(torch.equal(before[k], after[k]) for k in image_keys)
    assert any(not torch.equal(before[k], after[k]) for k in text_keys)
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["spn_negatives"] > 0 and rows[0]["steps"] == 2
