"""The index-based scoring path (rank_split -> metrics_from_rankings without names) gives the
same rankings and metrics as the name-based path and as an independent full sort."""
from __future__ import annotations

import random

import pytest
import torch

from composed_retrieval.data.base import CIRSplit
from composed_retrieval.errors import DataError
from composed_retrieval.evaluation.metrics import average_precision_at_k
from composed_retrieval.evaluation.protocols import Rankings, metrics_from_rankings, rank_split


def _random_split(dataset: str, nq: int = 60, ng: int = 90, seed: int = 0) -> CIRSplit:
    rng = random.Random(seed)
    names = [f"{i:06d}" for i in range(ng)]
    queries = []
    for i in range(nq):
        members = rng.sample(names, 6)
        q = {"query_id": str(i), "reference": members[0], "target": members[1], "caption": "x"}
        if dataset == "cirr":
            q["subset"] = rng.sample(members[1:], 5)
        if dataset == "circo":
            q["targets"] = members[1:1 + rng.randint(1, 4)]
        queries.append(q)
    proto = {"user": "generic"}.get(dataset, dataset)
    return CIRSplit(dataset, "val", queries, names, {}, protocol=proto)


def _features(nq: int, ng: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # small integer features: many tied scores, so the tie rule is exercised
    return (torch.randint(-2, 3, (nq, 4), generator=gen).float(),
            torch.randint(-2, 3, (ng, 4), generator=gen).float())


@pytest.mark.parametrize("dataset", ["cirr", "fashioniq", "circo", "user"])
def test_index_path_equals_name_path_and_full_sort(dataset):
    split = _random_split(dataset)
    q, g = _features(60, 90)
    rk = rank_split(split, q, g, k=50, chunk_size=7)
    fast = metrics_from_rankings(split, rk)
    by_names = Rankings(list(rk.query_ids), [list(r) for r in rk.names],
                        None if rk.subset_names is None else [list(r) for r in rk.subset_names])
    assert by_names.indices is None
    assert metrics_from_rankings(split, by_names) == pytest.approx(fast, abs=1e-9)
    # independent reference: full stable sort by (-score, index), reference removed where the protocol does
    scores = (q @ g.T).tolist()
    removes = dataset in ("cirr", "user")
    for i, query in enumerate(split.queries):
        order = [split.gallery[j] for j in sorted(range(90), key=lambda j: (-scores[i][j], j))
                 if not (removes and split.gallery[j] == query["reference"])]
        assert rk.names[i] == order[:50]
        if dataset == "cirr":
            assert rk.subset_names[i] == [n for n in order if n in query["subset"]][:3]
    # the same split scored again (the cached arrays) and a fresh copy agree
    assert metrics_from_rankings(split, rank_split(split, q, g, k=50)) == fast
    copy = CIRSplit(dataset, "val", [dict(x) for x in split.queries], list(split.gallery), {}, protocol=split.protocol)
    assert metrics_from_rankings(copy, rank_split(copy, q, g, k=50)) == pytest.approx(fast, abs=1e-9)


def test_rankings_from_another_split_use_names():
    a = _random_split("user", seed=1)
    b = _random_split("user", seed=2)
    q, g = _features(60, 90)
    rk_a = rank_split(a, q, g)
    # rankings of split a scored against split b go through names and b's own targets
    expect = metrics_from_rankings(b, Rankings(list(rk_a.query_ids), [list(r) for r in rk_a.names]))
    assert metrics_from_rankings(b, rk_a) == expect


def test_replaced_gallery_list_is_noticed():
    split = _random_split("user")
    q, g = _features(60, 90)
    metrics_from_rankings(split, rank_split(split, q, g))
    split.gallery = list(split.gallery[:-1]) + ["not-a-target-image"]
    split.queries[0]["target"] = "missing-image"   # a change the cache must not hide once lists are new
    split.queries = list(split.queries)
    with pytest.raises(DataError, match="missing-image"):
        metrics_from_rankings(split, rank_split(split, q, g[:90]))


def test_vectorised_average_precision_equals_per_query_loop():
    rng = random.Random(3)
    ranked = [[rng.randrange(40) for _ in range(rng.randint(0, 30))] for _ in range(50)]
    gts = [set(rng.sample(range(40), rng.randint(1, 12))) for _ in range(50)]
    ks = [1, 5, 10, 25, 50]
    expect = {}
    for k in ks:   # the official definition, one query at a time (repeats counted per occurrence)
        total = 0.0
        for row, gt in zip(ranked, gts):
            found, s = 0, 0.0
            for i, item in enumerate(row[:k]):
                if item in gt:
                    found += 1
                    s += found / (i + 1)
            total += s / min(len(gt), k)
        expect[k] = 100 * total / len(ranked)
    assert average_precision_at_k(ranked, gts, ks) == pytest.approx(expect, abs=1e-9)
