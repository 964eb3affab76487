"""Metrics and protocols against hand-computed small cases (see the comments for the arithmetic)."""
from __future__ import annotations

import random

import pytest
import torch

from composed_retrieval.data.base import CIRSplit
from composed_retrieval.errors import ConfigError, DataError
from composed_retrieval.evaluation.metrics import average_precision_at_k, chunked_topk, recall_at_k
from composed_retrieval.evaluation.protocols import (Rankings, evaluate_split, fashioniq_summary, headline,
                                                     metrics_from_rankings, rank_split)

# 1-D features: a query of [1] scores each gallery image with its own value.
NAMES = ["a", "b", "c", "d", "e", "f", "g"]
VALUES = [0.9, 0.5, 0.7, 0.7, 0.8, 0.1, 0.7]   # c, d, g tie at 0.7


def _gallery() -> torch.Tensor:
    return torch.tensor(VALUES).view(-1, 1)


def _split(dataset: str, queries: list[dict], names: list[str] = NAMES) -> CIRSplit:
    return CIRSplit(dataset=dataset, split="val", queries=queries, gallery=list(names),
                    images={}, protocol=dataset if dataset != "user" else "generic")


# ----------------------------------------------------------------------------- chunked_topk

def test_topk_ties_lower_index_first():
    q = torch.tensor([[1.0]])
    _, idx = chunked_topk(q, _gallery(), k=4)
    # a(0.9) e(0.8) then the 0.7 tie c(2) d(3) g(6) by index
    assert idx.tolist() == [[0, 4, 2, 3]]
    _, idx = chunked_topk(q, _gallery(), k=3)    # the tie straddles the cut: c before d and g
    assert idx.tolist() == [[0, 4, 2]]


def test_topk_exclude_and_all_equal_gallery():
    g = torch.ones(300, 4)
    q = torch.ones(3, 4)
    _, idx = chunked_topk(q, g, k=5, exclude=torch.tensor([-1, 0, 2]), chunk_size=2)
    assert idx.tolist() == [[0, 1, 2, 3, 4], [1, 2, 3, 4, 5], [0, 1, 3, 4, 5]]


def test_topk_matches_stable_reference_with_many_ties():
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-2, 3, (37, 3), generator=gen).float()
    g = torch.randint(-2, 3, (91, 3), generator=gen).float()     # integer scores: ties everywhere
    exclude = torch.randint(-1, 91, (37,), generator=gen)
    scores = (q @ g.T).tolist()
    for chunk in (1, 5, 1024):
        vals, idx = chunked_topk(q, g, k=10, exclude=exclude, chunk_size=chunk)
        for i, row in enumerate(scores):
            order = sorted((j for j in range(91) if j != exclude[i]), key=lambda j: (-row[j], j))
            assert idx[i].tolist() == order[:10]
            assert vals[i].tolist() == [row[j] for j in order[:10]]


def test_topk_rejects_nan_and_bad_k():
    with pytest.raises(DataError, match="NaN"):
        chunked_topk(torch.tensor([[float("nan")]]), _gallery(), k=1)
    with pytest.raises(ConfigError):
        chunked_topk(torch.ones(1, 1), _gallery(), k=8)


# ----------------------------------------------------------------------------- recall / AP

def test_recall_at_k_hand():
    ranked = torch.tensor([[3, 1, 2], [0, 2, 1], [4, 5, 6]])
    target = torch.tensor([1, 0, 9])
    # q0 hit at rank 2, q1 at rank 1, q2 never
    assert recall_at_k(ranked, target, [1, 2, 3, 50]) == pytest.approx({1: 100 / 3, 2: 200 / 3, 3: 200 / 3, 50: 200 / 3})


def test_average_precision_hand():
    # q0: gts {1,3,6}; ranked 1 2 3 4 5 -> rel 1 0 1 0 0; P@1 = 1, P@3 = 2/3
    #     AP@1 = 1/min(3,1) = 1; AP@2 = 1/2; AP@5 = (1 + 2/3)/3 = 5/9
    # q1: one gt {2} (fewer gts than K) at rank 2 -> AP@1 = 0, AP@K>=2 = (1/2)/1 = 1/2
    ranked = torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, 4, 5]])
    ap = average_precision_at_k(ranked, [{1, 3, 6}, {2}], [1, 2, 5, 50])
    assert ap[1] == pytest.approx(100 * (1 + 0) / 2)
    assert ap[2] == pytest.approx(100 * (0.5 + 0.5) / 2)
    assert ap[5] == pytest.approx(100 * (5 / 9 + 0.5) / 2)
    assert ap[50] == pytest.approx(100 * (5 / 9 + 0.5) / 2)   # K beyond the list: min(|G|, K) = |G|


def test_average_precision_many_gts_denominator_is_k():
    # 12 gts, all of the first 10 relevant: AP@10 = 10 / min(12, 10) = 1
    ranked = [list(range(10))]
    assert average_precision_at_k(ranked, [set(range(12))], [10])[10] == pytest.approx(100.0)
    with pytest.raises(DataError):
        average_precision_at_k(ranked, [set()], [10])


# ----------------------------------------------------------------------------- CIRR protocol

CIRR_QUERIES = [
    {"query_id": "10", "reference": "a", "target": "c", "subset": ["b", "c", "d"]},
    {"query_id": "11", "reference": "f", "target": "b", "subset": ["e", "b", "g"]},
    {"query_id": "12", "reference": "e", "target": "f", "subset": ["f", "a", "b"]},
]
CIRR_Q = torch.tensor([[1.0], [-1.0], [1.0]])


def test_cirr_rank_split_removes_reference_and_ranks_subset():
    rk = rank_split(_split("cirr", CIRR_QUERIES), CIRR_Q, _gallery(), k=50)
    assert rk.query_ids == ["10", "11", "12"]
    # width = min(50, 7 - 1); reference a/f/e absent; ties c < d < g
    assert rk.names == [["e", "c", "d", "g", "b", "f"],
                        ["b", "c", "d", "g", "e", "a"],
                        ["a", "c", "d", "g", "b", "f"]]
    assert rk.subset_names == [["c", "d", "b"], ["b", "g", "e"], ["a", "b", "f"]]


def test_cirr_metrics_hand():
    m = evaluate_split(_split("cirr", CIRR_QUERIES), CIRR_Q, _gallery())
    # target ranks: q10 -> 2, q11 -> 1, q12 -> 6; subset ranks: 1, 1, 3
    assert m == pytest.approx({
        "recall@1": 100 / 3, "recall@5": 200 / 3, "recall@10": 100.0, "recall@50": 100.0,
        "recall_subset@1": 200 / 3, "recall_subset@2": 200 / 3, "recall_subset@3": 100.0,
        "avg": (200 / 3 + 200 / 3) / 2,
    })
    assert headline("cirr", m) == m["avg"]


def test_cirr_rankings_order_independent_and_missing_queries():
    split = _split("cirr", CIRR_QUERIES)
    rk = rank_split(split, CIRR_Q, _gallery())
    rev = Rankings(rk.query_ids[::-1], rk.names[::-1], rk.subset_names[::-1])
    assert metrics_from_rankings(split, rev) == metrics_from_rankings(split, rk)
    with pytest.raises(DataError, match="missing for 1 of 3 queries.*11"):
        metrics_from_rankings(split, Rankings(["10", "12"], rk.names[:1] * 2, rk.subset_names[:2]))


def test_target_missing_or_duplicated_in_gallery_is_an_error():
    bad = [dict(CIRR_QUERIES[0]), dict(CIRR_QUERIES[1], target="zzz")]
    split = _split("cirr", bad)
    rk = Rankings(["10", "11"], [["e"], ["b"]], [["c"], ["b"]])
    with pytest.raises(DataError, match="query 11: target 'zzz' is missing"):
        metrics_from_rankings(split, rk)
    dup = _split("fashioniq", [{"query_id": "dress/0", "reference": "a", "target": "c"}], NAMES + ["c"])
    with pytest.raises(DataError, match="query dress/0: target 'c' occurs 2 times"):
        metrics_from_rankings(dup, Rankings(["dress/0"], [["c"]]))


def test_cirr_target_equal_to_reference_is_an_error():
    split = _split("cirr", [{"query_id": "1", "reference": "a", "target": "a", "subset": ["a", "b"]}])
    with pytest.raises(DataError, match="query 1: target 'a' is the reference"):
        metrics_from_rankings(split, Rankings(["1"], [["b"]], [["b"]]))


def test_test_split_without_targets_cannot_be_scored():
    split = _split("cirr", [{"query_id": "1", "reference": "a", "subset": ["b", "c"]}])
    with pytest.raises(DataError, match="no target"):
        metrics_from_rankings(split, Rankings(["1"], [["b"]], [["b"]]))


# ----------------------------------------------------------------------------- FashionIQ / CIRCO / generic

def test_fashioniq_keeps_reference():
    qs = [{"query_id": "dress/0", "reference": "a", "target": "c", "category": "dress"}]
    split = _split("fashioniq", qs)
    rk = rank_split(split, torch.tensor([[1.0]]), _gallery(), k=50)
    assert rk.names == [["a", "e", "c", "d", "g", "b", "f"]]    # all 7, reference first
    assert rk.subset_names is None
    assert metrics_from_rankings(split, rk) == {"recall@10": 100.0, "recall@50": 100.0}
    # target at rank 3: a top-2 list misses it
    assert metrics_from_rankings(split, Rankings(["dress/0"], [["a", "e"]]))["recall@10"] == 0.0


def test_fashioniq_summary_hand():
    per = {"dress": {"recall@10": 10.0, "recall@50": 40.0}, "shirt": {"recall@10": 20.0, "recall@50": 50.0},
           "toptee": {"recall@10": 30.0, "recall@50": 60.0}}
    s = fashioniq_summary(per)
    assert s == pytest.approx({
        "dress_recall@10": 10, "dress_recall@50": 40, "shirt_recall@10": 20, "shirt_recall@50": 50,
        "toptee_recall@10": 30, "toptee_recall@50": 60,
        "avg_recall@10": 20, "avg_recall@50": 50, "avg": 35,
    })
    assert headline("fashioniq", s) == 35
    with pytest.raises(ConfigError):
        fashioniq_summary({"dress": per["dress"]})
    assert fashioniq_summary({"dress": per["dress"]}, require_all=False)["avg"] == 25


CIRCO_NAMES = ["1", "2", "3", "4", "5", "6", "7"]


def test_circo_keeps_reference_and_map_hand():
    qs = [{"query_id": "0", "reference": "1", "target": "4", "targets": ["4", "2"]},
          {"query_id": "1", "reference": "2", "target": "1", "targets": ["1"]}]
    split = _split("circo", qs, CIRCO_NAMES)
    rk = rank_split(split, torch.tensor([[1.0], [1.0]]), _gallery())
    # ranking 1 5 3 4 7 2 6: the reference "1" stays (SEARLE does not remove it)
    assert rk.names[0] == ["1", "5", "3", "4", "7", "2", "6"]
    m = metrics_from_rankings(split, rk)
    # q0: gts at ranks 4 and 6 -> AP@5 = (1/4)/2, AP@10 = (1/4 + 2/6)/2; q1: gt at rank 1 -> AP = 1
    ap5, ap10 = (1 / 4) / 2, (1 / 4 + 2 / 6) / 2
    assert m == pytest.approx({"map@5": 100 * (ap5 + 1) / 2, "map@10": 100 * (ap10 + 1) / 2,
                               "map@25": 100 * (ap10 + 1) / 2, "map@50": 100 * (ap10 + 1) / 2})
    assert headline("circo", m) == m["map@10"]


def test_generic_removes_reference_and_reports_recall():
    qs = [{"query_id": "0", "reference": "a", "target": "e"}]
    split = _split("user", qs)
    m = evaluate_split(split, torch.tensor([[1.0]]), _gallery())
    assert m == {"recall@1": 100.0, "recall@5": 100.0, "recall@10": 100.0, "recall@50": 100.0}
    assert headline("user", m) == 100.0


def test_cirr_against_independent_full_sort():
    """Random CIRR-like data: recall from a full argsort with the reference deleted (CLIP4Cir style)."""
    rng = random.Random(1)
    gen = torch.Generator().manual_seed(1)
    names = [f"img{i}" for i in range(120)]
    queries = []
    for i in range(80):
        members = rng.sample(names, 6)
        queries.append({"query_id": str(i), "reference": members[0], "target": rng.choice(members[1:]),
                        "subset": members[1:]})
    q = torch.nn.functional.normalize(torch.randn(80, 16, generator=gen), dim=1)
    g = torch.nn.functional.normalize(torch.randn(120, 16, generator=gen), dim=1)
    m = evaluate_split(_split("cirr", queries, names), q, g)
    scores = (q @ g.T).tolist()
    hits = {k: 0 for k in (1, 5, 10, 50)}
    sub_hits = {k: 0 for k in (1, 2, 3)}
    for i, qd in enumerate(queries):
        order = [names[j] for j in sorted(range(120), key=lambda j: -scores[i][j]) if names[j] != qd["reference"]]
        rank = order.index(qd["target"])
        sub_rank = [n for n in order if n in qd["subset"]].index(qd["target"])
        for k in hits:
            hits[k] += rank < k
        for k in sub_hits:
            sub_hits[k] += sub_rank < k
    for k in hits:
        assert m[f"recall@{k}"] == pytest.approx(100 * hits[k] / 80)
    for k in sub_hits:
        assert m[f"recall_subset@{k}"] == pytest.approx(100 * sub_hits[k] / 80)


def test_names_outside_the_gallery_are_misses():
    split = _split("user", [{"query_id": "0", "reference": "a", "target": "e"},
                            {"query_id": "1", "reference": "a", "target": "c"}])
    # q0: unknown name first, target second; q1: only unknown names (shorter row)
    m = metrics_from_rankings(split, Rankings(["0", "1"], [["zzz", "e"], ["yyy"]]))
    assert m == {"recall@1": 0.0, "recall@5": 50.0, "recall@10": 50.0, "recall@50": 50.0}


# ----------------------------------------------------------------------------- per-edit-type breakdown

def test_edit_type_breakdown_groups_top1_hits_and_adds_up_to_recall_at_1():
    typed = [dict(q, edit_type=t) for q, t in zip(CIRR_QUERIES, ["add", "add", "color"])]
    split = _split("cirr", typed)
    m = evaluate_split(split, CIRR_Q, _gallery())
    # top-1 hits: q10 no (e first), q11 yes (b), q12 no; subset top-1: q10 c yes, q11 b yes, q12 a no
    assert m["edit_type/add/queries"] == 2 and m["edit_type/color/queries"] == 1
    assert m["edit_type/add/recall@1"] == pytest.approx(50.0)
    assert m["edit_type/color/recall@1"] == 0.0
    assert m["edit_type/add/recall_subset@1"] == 100.0 and m["edit_type/color/recall_subset@1"] == 0.0
    weighted = sum(m[f"edit_type/{k}/recall@1"] * m[f"edit_type/{k}/queries"] for k in ("add", "color")) / 3
    assert weighted == pytest.approx(m["recall@1"])
    # the same numbers through names (a prediction file), in another query order
    rk = rank_split(split, CIRR_Q, _gallery())
    rev = Rankings(rk.query_ids[::-1], rk.names[::-1], rk.subset_names[::-1])
    assert metrics_from_rankings(split, rev) == pytest.approx(m)


def test_no_breakdown_without_edit_types_on_every_query():
    assert not any(k.startswith("edit_type/") for k in evaluate_split(_split("cirr", CIRR_QUERIES), CIRR_Q, _gallery()))
    partly = [dict(CIRR_QUERIES[0], edit_type="add")] + CIRR_QUERIES[1:]
    assert not any(k.startswith("edit_type/") for k in evaluate_split(_split("cirr", partly), CIRR_Q, _gallery()))
