"""The evaluation protocols of CIRR, FashionIQ, CIRCO and user data (DESIGN.md section 5).

Protocol facts, as the official/public evaluation code defines them:
- cirr: the reference image is removed from the gallery ranking (CLIP4Cir/SEARLE delete it
  from the sorted names); Recall@{1,5,10,50} over that ranking; Recall_subset@{1,2,3} over the
  img_set members other than the reference, ordered as in the full ranking (same scores, same
  tie rule); headline (R@5 + Rsubset@1) / 2.
- fashioniq: per category, reference NOT removed (CLIP4Cir ranks the whole category gallery);
  R@10, R@50; the summary averages the three categories.
- circo: reference NOT removed -- SEARLE (by the CIRCO authors) ranks the full gallery with a
  plain top-50, and the official scorer only reads the submitted lists. mAP@{5,10,25,50} over
  all ground truths (``targets``).
- generic (user data): like cirr without the subset: the reference is removed when it is in
  the gallery (a query's target is another image); Recall@{1,5,10,50}.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import torch
from torch import Tensor

from ..data.base import CIRSplit
from ..errors import ConfigError, DataError
from .metrics import average_precision_at_k, iter_score_blocks, mask_excluded, recall_at_k, topk_block

RECALL_KS = (1, 5, 10, 50)
SUBSET_KS = (1, 2, 3)
FASHIONIQ_KS = (10, 50)
CIRCO_KS = (5, 10, 25, 50)
SUBSET_TOP = 3
FASHIONIQ_CATEGORY_ORDER = ("dress", "shirt", "toptee")

# protocols that rank the gallery without the query's own reference image
REMOVES_REFERENCE = {"cirr": True, "generic": True, "user": True, "fashioniq": False, "circo": False}


@dataclass
class Rankings:
    """Top-k gallery names per query (the content of a prediction/submission file)."""

    query_ids: list[str]
    names: list[list[str]]                    # top-k gallery names per query, best first
    subset_names: list[list[str]] | None = None   # CIRR: top-3 img_set members per query


def protocol_of(split: CIRSplit) -> str:
    """The protocol a split is scored with; user data and unknown names fall back to generic."""
    proto = split.protocol if split.protocol != "generic" else split.dataset
    return proto if proto in ("cirr", "fashioniq", "circo") else "generic"


def _ids_preview(ids: list[str], n: int = 5) -> str:
    shown = ", ".join(ids[:n])
    return f"{shown}, ..." if len(ids) > n else shown


def _gallery_positions(split: CIRSplit) -> dict[str, int]:
    index: dict[str, int] = {}
    dupes: list[str] = []
    for i, name in enumerate(split.gallery):
        if name in index:
            dupes.append(name)
        else:
            index[name] = i
    if dupes:
        raise DataError(
            f"the {split.dataset} {split.split} gallery lists {len(dupes)} image(s) more than once "
            f"(first: {_ids_preview(dupes)})"
        )
    return index


def _subset_members(q: Mapping[str, Any]) -> list[str]:
    """Img_set members other than the reference, duplicates dropped (order kept)."""
    return [m for m in dict.fromkeys(q.get("subset") or []) if m != q["reference"]]


def rank_split(split: CIRSplit, query_feats: Tensor, gallery_feats: Tensor, k: int = 50,
               chunk_size: int = 1024) -> Rankings:
    """Rank ``split.gallery`` for every query under the split's protocol; keep the top k names.

    ``gallery_feats`` rows are aligned with ``split.gallery``. Features are used as given
    (callers L2-normalise); ties rank the lower gallery index first.
    """
    proto = protocol_of(split)
    nq, ng = len(split.queries), len(split.gallery)
    if query_feats.shape[0] != nq:
        raise ConfigError(f"{query_feats.shape[0]} query feature rows for {nq} queries of {split.dataset} {split.split}")
    if gallery_feats.shape[0] != ng:
        raise ConfigError(f"{gallery_feats.shape[0]} gallery feature rows for {ng} gallery images of {split.dataset} {split.split}")
    if ng == 0:
        raise DataError(f"the {split.dataset} {split.split} gallery is empty")
    pos = _gallery_positions(split)
    device = query_feats.device

    exclude = None
    if REMOVES_REFERENCE.get(proto, True):
        exclude = torch.tensor([pos.get(q["reference"], -1) for q in split.queries], dtype=torch.long)
    width = min(k, ng - (1 if exclude is not None and bool((exclude >= 0).any()) else 0))
    if width < 1:
        raise DataError(f"the {split.dataset} {split.split} gallery has nothing to rank once the reference is removed")

    subset_idx = None
    if proto == "cirr":
        rows = []
        for q in split.queries:
            members = _subset_members(q)
            missing = [m for m in members if m not in pos]
            if missing:
                raise DataError(f"query {q['query_id']}: img_set member(s) {_ids_preview(missing)} not in the gallery")
            rows.append(sorted(map(pos.__getitem__, members)))   # by gallery index: the tie order
        m = max(1, max((len(r) for r in rows), default=0))
        subset_idx = torch.tensor([r + [-1] * (m - len(r)) for r in rows], dtype=torch.long)
        subset_idx = subset_idx.view(nq, m).to(device)

    top_i: list[Tensor] = []
    sub_order: list[Tensor] = []
    for start, scores in iter_score_blocks(query_feats, gallery_feats, chunk_size):
        if exclude is not None:
            mask_excluded(scores, exclude, start)
        top_i.append(topk_block(scores, width)[1].cpu())
        if subset_idx is not None:
            sidx = subset_idx[start:start + scores.shape[0]]
            # subset scores come from the same score block, so the order matches the full ranking
            s = torch.gather(scores, 1, sidx.clamp(min=0))
            s[sidx < 0] = float("-inf")
            # members are in gallery-index order, so a stable sort keeps the full ranking's tie rule
            perm = torch.sort(s, dim=1, descending=True, stable=True)[1]
            sub_order.append(torch.gather(sidx, 1, perm).cpu())

    gallery = split.gallery
    idx = torch.cat(top_i).tolist() if top_i else []
    names = [list(itemgetter(*row)(gallery)) if len(row) > 1 else [gallery[row[0]]] for row in idx]
    subset_names = None
    if subset_idx is not None:
        sub = torch.cat(sub_order).tolist() if sub_order else []
        subset_names = [[gallery[j] for j in row if j >= 0][:SUBSET_TOP] for row in sub]
    return Rankings([str(q["query_id"]) for q in split.queries], names, subset_names)


def _align(split: CIRSplit, rankings: Rankings) -> list[int]:
    """Index into ``rankings`` for each split query, in split order; missing/extra ids fail."""
    where: dict[str, int] = {}
    for i, qid in enumerate(rankings.query_ids):
        if qid in where:
            raise DataError(f"rankings list query {qid} more than once")
        where[qid] = i
    ids = [str(q["query_id"]) for q in split.queries]
    missing = [qid for qid in ids if qid not in where]
    if missing:
        raise DataError(f"predictions missing for {len(missing)} of {len(ids)} queries (first: {_ids_preview(missing)})")
    extra = sorted(set(where) - set(ids))
    if extra:
        raise DataError(
            f"{len(extra)} predicted query id(s) are not queries of {split.dataset} {split.split} "
            f"(first: {_ids_preview(extra)})"
        )
    return [where[qid] for qid in ids]


def circo_int(name: str | int) -> int:
    """CIRCO image id of a gallery name ("000000123456.jpg", "123456" or an int)."""
    if isinstance(name, int) and not isinstance(name, bool):
        return name
    stem = str(name).rsplit("/", 1)[-1].split(".", 1)[0]
    if not stem.isdigit():
        raise DataError(f"CIRCO image name {name!r} is not a numeric COCO id")
    return int(stem)


def _targets_of(q: Mapping[str, Any]) -> list[str]:
    if "targets" in q and q["targets"]:
        return list(q["targets"])
    return [q["target"]]


def _check_targets(split: CIRSplit, proto: str) -> dict[str, int] | None:
    """Every target occurs exactly once in the gallery (and is not the removed reference)."""
    if not split.queries:
        raise DataError(f"the {split.dataset} {split.split} split has no queries")
    no_target = [str(q["query_id"]) for q in split.queries if "target" not in q]
    if no_target:
        raise DataError(
            f"{len(no_target)} queries of {split.dataset} {split.split} have no target "
            f"(first: {_ids_preview(no_target)}); test splits are scored by the official server"
        )
    if not split.gallery:
        if proto == "circo":
            return None   # CIRCO gallery listed only by the image folder; ids are checked by value
        raise DataError(f"the {split.dataset} {split.split} gallery is empty")
    counts: dict[str, int] = {}
    for name in split.gallery:
        counts[name] = counts.get(name, 0) + 1
    for q in split.queries:
        for t in _targets_of(q) if proto == "circo" else [q["target"]]:
            c = counts.get(t, 0)
            if c != 1:
                how = "is missing from" if c == 0 else f"occurs {c} times in"
                raise DataError(f"query {q['query_id']}: target {t!r} {how} the {split.dataset} {split.split} gallery")
        if REMOVES_REFERENCE.get(proto, True) and q["target"] == q["reference"]:
            raise DataError(
                f"query {q['query_id']}: target {q['target']!r} is the reference image, which the {proto} protocol removes"
            )
        if proto == "cirr" and q["target"] not in _subset_members(q):
            raise DataError(f"query {q['query_id']}: target {q['target']!r} is not a member of its img_set subset")
    return _gallery_positions(split)


def metrics_from_rankings(split: CIRSplit, rankings: Rankings) -> dict[str, float]:
    """Metrics in percent for one split; key names depend on the protocol (module docstring)."""
    proto = protocol_of(split)
    _check_targets(split, proto)
    order = _align(split, rankings)
    ranked_names = [rankings.names[i] for i in order]

    if proto == "circo":
        ranked = [[circo_int(n) for n in row] for row in ranked_names]
        gts = [{circo_int(t) for t in _targets_of(q)} for q in split.queries]
        ap = average_precision_at_k(ranked, gts, CIRCO_KS)
        return {f"map@{k}": ap[k] for k in CIRCO_KS}

    # names -> integer codes (gallery positions first; targets and unknown names get new
    # codes, so they never match by accident), then hit positions
    codes: dict[str, int] = dict(zip(split.gallery, range(len(split.gallery))))
    target = torch.tensor([codes.setdefault(q["target"], len(codes)) for q in split.queries], dtype=torch.long)
    ranked = _code_matrix(ranked_names, codes)

    if proto == "fashioniq":
        r = recall_at_k(ranked, target, FASHIONIQ_KS)
        return {f"recall@{k}": r[k] for k in FASHIONIQ_KS}
    r = recall_at_k(ranked, target, RECALL_KS)
    out = {f"recall@{k}": r[k] for k in RECALL_KS}
    if proto == "cirr":
        if rankings.subset_names is None:
            raise ConfigError("CIRR metrics need subset rankings (Rankings.subset_names)")
        sub = _code_matrix([rankings.subset_names[i][:SUBSET_TOP] for i in order], codes)
        rs = recall_at_k(sub, target, SUBSET_KS)
        out.update({f"recall_subset@{k}": rs[k] for k in SUBSET_KS})
        out["avg"] = (out["recall@5"] + out["recall_subset@1"]) / 2
    return out


def _code_matrix(rows: list[list[str]], codes: dict[str, int]) -> Tensor:
    """[Q, max width] long tensor of name codes, -1 padded; one tensor build for speed."""
    width = max(1, max((len(r) for r in rows), default=0))
    lookup = codes.__getitem__
    flat: list[int] = []
    for row in rows:
        start = len(flat)
        try:
            flat.extend(map(lookup, row))
        except KeyError:   # names outside the gallery get codes of their own (never a target's)
            del flat[start:]
            flat.extend(codes.setdefault(n, len(codes)) for n in row)
        if len(row) < width:
            flat.extend([-1] * (width - len(row)))
    return torch.tensor(flat, dtype=torch.long).view(len(rows), width)


def evaluate_split(split: CIRSplit, query_feats: Tensor, gallery_feats: Tensor) -> dict[str, float]:
    """Rank and score one split with its protocol (top 50 kept)."""
    return metrics_from_rankings(split, rank_split(split, query_feats, gallery_feats, k=50))


def fashioniq_summary(per_category: Mapping[str, Mapping[str, float]], *, require_all: bool = True) -> dict[str, float]:
    """Per-category R@10/R@50 plus their averages over categories and (avg R@10 + avg R@50) / 2.

    The published FashionIQ numbers average dress, shirt and toptee, so by default all three
    are required; ``require_all=False`` averages whichever categories are given.
    """
    cats = [c for c in FASHIONIQ_CATEGORY_ORDER if c in per_category]
    unknown = sorted(set(per_category) - set(FASHIONIQ_CATEGORY_ORDER))
    if unknown:
        raise ConfigError(f"unknown FashionIQ categories {unknown}; expected {list(FASHIONIQ_CATEGORY_ORDER)}")
    if not cats or (require_all and len(cats) != len(FASHIONIQ_CATEGORY_ORDER)):
        raise ConfigError(
            f"FashionIQ summary needs categories {list(FASHIONIQ_CATEGORY_ORDER)}, got {sorted(per_category)}"
        )
    out: dict[str, float] = {}
    for c in cats:
        for k in FASHIONIQ_KS:
            key = f"recall@{k}"
            if key not in per_category[c]:
                raise ConfigError(f"FashionIQ {c} metrics lack {key}")
            out[f"{c}_{key}"] = float(per_category[c][key])
    for k in FASHIONIQ_KS:
        out[f"avg_recall@{k}"] = sum(out[f"{c}_recall@{k}"] for c in cats) / len(cats)
    out["avg"] = (out["avg_recall@10"] + out["avg_recall@50"]) / 2
    return out


HEADLINE_KEY = {"cirr": "avg", "fashioniq": "avg", "circo": "map@10"}


def headline(dataset: str, metrics: Mapping[str, float]) -> float:
    """The single number papers report for a dataset (generic/user data: recall@1)."""
    key = HEADLINE_KEY.get(dataset, "recall@1")
    if key not in metrics:
        raise ConfigError(f"{dataset} metrics lack the headline key {key!r} (have {sorted(metrics)})")
    return float(metrics[key])
