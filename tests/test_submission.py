"""Submission files: build -> validate -> write -> read -> score, and every validator problem kind."""
from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from composed_retrieval.data.base import CIRSplit
from composed_retrieval.errors import CIRError, DataError
from composed_retrieval.evaluation.commands import score_predictions
from composed_retrieval.evaluation.protocols import metrics_from_rankings, rank_split
from composed_retrieval.evaluation.submission import (
    cirr_submission, circo_submission, fashioniq_predictions, read_predictions, validate_circo_submission,
    validate_cirr_submission, validate_fashioniq_predictions, write_circo_submission, write_cirr_submission,
    write_fashioniq_predictions)


def _feats(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, 8, generator=gen), dim=1)


def cirr_split(n_images: int = 64, n_queries: int = 20, split: str = "val") -> CIRSplit:
    rng = random.Random(0)
    names = [f"dev-{i}-img0" for i in range(n_images)]
    queries = []
    for i in range(n_queries):
        members = rng.sample(names, 6)
        q = {"query_id": str(100 + i), "reference": members[0], "caption": "x", "subset": members[1:]}
        if split != "test1":
            q["target"] = rng.choice(members[1:])
        queries.append(q)
    return CIRSplit("cirr", split, queries, names, {}, protocol="cirr")


def circo_split(n_images: int = 70, n_queries: int = 12) -> CIRSplit:
    rng = random.Random(1)
    names = [str(1000 + i) for i in range(n_images)]
    queries = []
    for i in range(n_queries):
        ref, *gts = rng.sample(names, 1 + rng.randint(1, 6))
        queries.append({"query_id": str(i), "reference": ref, "caption": "x", "target": gts[0], "targets": gts})
    return CIRSplit("circo", "val", queries, names, {}, protocol="circo")


def fiq_splits() -> list[CIRSplit]:
    rng = random.Random(2)
    out = []
    for c in ("dress", "shirt", "toptee"):
        names = [f"{c}{i}" for i in range(55)]
        qs = [{"query_id": f"{c}/{i}", "reference": rng.choice(names), "target": rng.choice(names), "category": c}
              for i in range(9)]
        out.append(CIRSplit("fashioniq", "val", qs, names, {}, protocol="fashioniq", category=c))
    return out


def _rank(split: CIRSplit, seed: int = 3):
    return rank_split(split, _feats(len(split.queries), seed), _feats(len(split.gallery), seed + 1), k=50)


# ----------------------------------------------------------------------------- round trips

def test_cirr_round_trip(tmp_path):
    split = cirr_split()
    rk = _rank(split)
    recall, subset = cirr_submission(rk)
    assert recall["version"] == "rc2" and recall["metric"] == "recall"
    assert subset["version"] == "rc2" and subset["metric"] == "recall_subset"
    assert all(len(recall[q]) == 50 for q in rk.query_ids) and all(len(subset[q]) == 3 for q in rk.query_ids)
    assert validate_cirr_submission(split, recall, subset) == []
    p_recall, p_subset = write_cirr_submission(tmp_path, split, rk, stem="run")
    assert (p_recall.name, p_subset.name) == ("run_recall.json", "run_recall_subset.json")
    assert json.loads(p_recall.read_text()) == recall
    preds = read_predictions("cirr", p_subset, p_recall)          # any order: detected by "metric"
    assert score_predictions("cirr", [split], preds) == pytest.approx(
        {k: v for k, v in metrics_from_rankings(split, rk).items()})


def test_cirr_test_split_submission_without_targets(tmp_path):
    split = cirr_split(split="test1")
    rk = _rank(split)
    write_cirr_submission(tmp_path, split, rk)
    assert (tmp_path / "cirr_recall.json").is_file() and (tmp_path / "cirr_recall_subset.json").is_file()


def test_circo_round_trip(tmp_path):
    split = circo_split()
    rk = _rank(split)
    obj = circo_submission(rk)
    assert all(isinstance(v, int) for lst in obj.values() for v in lst)
    assert validate_circo_submission(split, obj) == []
    path = write_circo_submission(tmp_path / "circo.json", split, rk)
    preds = read_predictions("circo", path)
    assert score_predictions("circo", [split], preds) == pytest.approx(metrics_from_rankings(split, rk))


def test_fashioniq_round_trip(tmp_path):
    splits = fiq_splits()
    per = {sp.category: _rank(sp) for sp in splits}
    obj = fashioniq_predictions(per)
    assert set(obj) == {q["query_id"] for sp in splits for q in sp.queries}
    assert validate_fashioniq_predictions(splits, obj) == []
    path = write_fashioniq_predictions(tmp_path / "fiq.json", splits, per)
    scores = score_predictions("fashioniq", splits, read_predictions("fashioniq", path))
    direct = {sp.category: metrics_from_rankings(sp, per[sp.category]) for sp in splits}
    for c in direct:
        for k in (10, 50):
            assert scores[f"{c}_recall@{k}"] == pytest.approx(direct[c][f"recall@{k}"])
    assert scores["avg_recall@10"] == pytest.approx(sum(d["recall@10"] for d in direct.values()) / 3)


# ----------------------------------------------------------------------------- CIRR validator

@pytest.fixture()
def cirr_valid():
    split = cirr_split()
    recall, subset = cirr_submission(_rank(split))
    return split, recall, subset


def _one(problems: list[str], needle: str) -> None:
    assert any(needle in p for p in problems), problems


def test_cirr_validator_problem_kinds(cirr_valid):
    split, recall, subset = cirr_valid
    r, s = copy.deepcopy(recall), copy.deepcopy(subset)
    r["version"] = "rc1"
    s["metric"] = "recall"
    del r["100"]                                   # missing pairid
    r["999"] = r["101"]                            # extra pairid
    r["102"] = r["102"][:49]                       # wrong length
    r["103"][1] = r["103"][0]                      # duplicate
    r["104"][0] = "not-an-image"                   # unknown name
    r["105"][0] = next(q["reference"] for q in split.queries if q["query_id"] == "105")   # reference listed
    r["106"] = "dev-1-img0"                        # not a list
    r["107"] = [1] * 50                            # wrong item type
    other = next(n for n in split.gallery if n not in split.queries[8]["subset"])
    s["108"] = [s["108"][0], s["108"][1], other]   # subset name outside the img_set
    s["109"] = s["109"][:2]                        # subset length
    problems = validate_cirr_submission(split, r, s)
    for needle in ['"version" must be', '"metric" must be', "1 query id(s) missing (first: 100)",
                   "key(s) that are not query ids (first: 999)", "query 102: expected 50 entries, got 49",
                   "query 103: duplicate entries", "query 104: 1 name(s) not in the val gallery",
                   "query 105: lists its reference image", "query 106: expected a list",
                   "query 107: entries must be strs", "query 108: " + other + " not in its img_set",
                   "recall_subset query 109: expected 3 entries, got 2"]:
        _one(problems, needle)
    assert all("\n" not in p for p in problems)


def test_cirr_validator_non_object(cirr_valid):
    split, recall, _ = cirr_valid
    _one(validate_cirr_submission(split, recall, [1, 2]), "recall_subset: expected a JSON object, got list")


def test_write_refuses_invalid(tmp_path):
    split = cirr_split()
    rk = _rank(split)
    rk.names[0] = rk.names[0][:10]
    with pytest.raises(CIRError, match="not written.*expected 50 entries, got 10"):
        write_cirr_submission(tmp_path, split, rk)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- CIRCO validator

def test_circo_validator_problem_kinds():
    split = circo_split()
    obj = circo_submission(_rank(split))
    obj.pop("0")
    obj["77"] = obj["1"]
    obj["2"] = obj["2"][:40]
    obj["3"][1] = obj["3"][0]
    obj["4"][0] = 5
    obj["5"] = [str(v) for v in obj["5"]]
    obj["6"] = [True] * 50
    problems = validate_circo_submission(split, obj)
    for needle in ["1 query id(s) missing (first: 0)", "not query ids (first: 77)", "query 2: expected 50 entries, got 40",
                   "query 3: duplicate entries", "query 4: 1 id(s) not in the gallery (first: 5)",
                   "query 5: entries must be ints", "query 6: entries must be ints"]:
        _one(problems, needle)
    assert validate_circo_submission(split, [1]) == ["expected a JSON object, got list"]


def test_circo_validator_without_known_gallery_checks_shape_only():
    split = circo_split()
    obj = circo_submission(_rank(split))
    unlisted = CIRSplit("circo", "val", split.queries, [], {}, protocol="circo")
    obj["1"][0] = 999999
    assert validate_circo_submission(unlisted, obj) == []
    # scoring by id still works without a gallery listing
    metrics = score_predictions("circo", [unlisted], read_predictions_obj(obj))
    assert set(metrics) == {"map@5", "map@10", "map@25", "map@50"}


def read_predictions_obj(obj):
    from composed_retrieval.evaluation.submission import Predictions
    return Predictions("circo", {k: list(v) for k, v in obj.items()}, raw=obj)


# ----------------------------------------------------------------------------- reading

@pytest.mark.parametrize("content, needle", [
    ("{not json", "malformed CIRCO prediction file"),
    ("[1, 2]", "must be a JSON object keyed by query id, got list"),
    ('{"0": 5}', "query 0: expected a list, got int"),
    ('{"0": ["a"]}', "query 0: entries must be ints, found 'a'"),
])
def test_read_predictions_bad_circo(tmp_path, content, needle):
    p = tmp_path / "p.json"
    p.write_text(content)
    with pytest.raises(DataError, match=needle) as info:
        read_predictions("circo", p)
    assert str(p) in str(info.value) and "\n" not in str(info.value)


def test_read_predictions_cirr_header_errors(tmp_path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps({"version": "rc2", "metric": "recall", "1": ["x"]}))
    b = tmp_path / "b.json"
    b.write_text(json.dumps({"version": "rc2", "metric": "recall", "1": ["x"]}))
    with pytest.raises(DataError, match="both have"):
        read_predictions("cirr", a, b)
    b.write_text(json.dumps({"version": "rc2", "1": ["x"]}))
    with pytest.raises(DataError, match='needs "metric"'):
        read_predictions("cirr", a, b)
    b.write_text(json.dumps({"version": "rc2", "metric": "recall_subset", "1": ["x"]}))
    with pytest.raises(DataError, match='no CIRR file with "metric": "recall"'):
        read_predictions("cirr", b)
    missing = tmp_path / "nope.json"
    with pytest.raises(DataError, match="not found"):
        read_predictions("fashioniq", missing)
