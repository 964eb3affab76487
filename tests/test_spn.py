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
        assert q["caption"] in {TEMPLATES[0].format(A=a, B=b), TEMPLATES[1].format(A=a, B=b), b}
        if q["caption"] == b:   # only a template text too long for the text tower falls back to "{B}"
            shortened += 1
            assert len(split_words(TEMPLATES[1].format(A=a, B=b))) + 2 > context
        else:
            assert len(split_words(q["caption"])) + 2 <= context
        assert q["target"] != q["reference"] and len(q["subset"]) == 5 and q["target"] in q["subset"]
        assert gen.image_path(q["target"]) == load_cirr(cirr_root, "train").image_path(q["target"])
    assert manifest["texts_shortened_to_B"] == shortened < len(gen.queries)
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
        for q in split.queries:   # two different templates, unless both were too long and fell back to "{B}"
            c0, c1 = q["captions"]
            assert c0 != c1 or not (c0.startswith("Unlike ") or " instead of " in c0)
        assert any(q["captions"][0] != q["captions"][1] for q in split.queries)
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
