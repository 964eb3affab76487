"""The evaluation protocols of CIRR, FashionIQ, CIRCO and user data.

Metric semantics follow CLIP4Cir's and SEARLE's validate.py.

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
from operator import itemgetter
from typing import Any

import torch
from torch import Tensor

from ..data.base import CIRSplit
from ..errors import ConfigError, DataError
from .metrics import (MAX_BLOCK_ELEMENTS, average_precision_at_k, average_precision_from_matrix, iter_score_blocks,
                      mask_excluded, recall_at_k, topk_block)

RECALL_KS = (1, 5, 10, 50)
SUBSET_KS = (1, 2, 3)
FASHIONIQ_KS = (10, 50)
CIRCO_KS = (5, 10, 25, 50)
SUBSET_TOP = 3
FASHIONIQ_CATEGORY_ORDER = ("dress", "shirt", "toptee")

# protocols that rank the gallery without the query's own reference image
REMOVES_REFERENCE = {"cirr": True, "generic": True, "user": True, "fashioniq": False, "circo": False}


class Rankings:
    """Top-k gallery names per query (the content of a prediction/submission file).

    Made from names (a prediction file), or by :func:`rank_split` from gallery indices: then the
    names are only built when read (CIRR val is 200k strings), and :func:`metrics_from_rankings`
    scores the indices directly instead of turning names back into indices.
    """

    def __init__(self, query_ids: list[str], names: list[list[str]] | None = None,
                 subset_names: list[list[str]] | None = None, *, indices: Tensor | None = None,
                 subset_indices: Tensor | None = None, gallery: list[str] | None = None,
                 origin: Any = None) -> None:
        if names is None and (indices is None or gallery is None):
            raise ConfigError("Rankings need names, or gallery indices together with the gallery")
        self.query_ids = query_ids
        self._names = names
        self._subset_names = subset_names
        self.indices = indices                  # [Q, k] gallery indices, best first
        self.subset_indices = subset_indices    # CIRR: [Q, m] member indices by score, -1 padded
        self.gallery = gallery
        self._origin = origin                   # the _SplitArrays of the split that was ranked

    @property
    def names(self) -> list[list[str]]:
        """Top-k gallery names per query, best first."""
        if self._names is None:
            g = self.gallery
            rows = self.indices.cpu().tolist()  # type: ignore[union-attr]
            self._names = [list(itemgetter(*row)(g)) if len(row) > 1 else [g[j] for j in row] for row in rows]
        return self._names

    @names.setter
    def names(self, value: list[list[str]]) -> None:
        self._names, self.indices, self._origin = value, None, None

    @property
    def subset_names(self) -> list[list[str]] | None:
        """CIRR: the top-3 img_set members per query."""
        if self._subset_names is None and self.subset_indices is not None:
            g = self.gallery
            rows = self.subset_indices[:, :SUBSET_TOP].cpu().tolist()
            self._subset_names = [[g[j] for j in row if j >= 0] for row in rows]  # type: ignore[index]
        return self._subset_names

    @subset_names.setter
    def subset_names(self, value: list[list[str]] | None) -> None:
        self._subset_names, self.subset_indices, self._origin = value, None, None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Rankings):
            return NotImplemented
        return (self.query_ids, self.names, self.subset_names) == (other.query_ids, other.names, other.subset_names)

    def __repr__(self) -> str:
        return f"Rankings({len(self.query_ids)} queries)"


def protocol_of(split: CIRSplit) -> str:
    """The protocol a split is scored with; user data and unknown names fall back to generic."""
    proto = split.protocol if split.protocol != "generic" else split.dataset
    return proto if proto in ("cirr", "fashioniq", "circo") else "generic"


def _ids_preview(ids: list[str], n: int = 5) -> str:
    shown = ", ".join(ids[:n])
    return f"{shown}, ..." if len(ids) > n else shown


def _gallery_positions(split: CIRSplit) -> dict[str, int]:
    index = dict(zip(split.gallery, range(len(split.gallery))))
    if len(index) == len(split.gallery):
        return index
    seen: set[str] = set()
    dupes: list[str] = []
    for name in split.gallery:
        if name in seen:
            dupes.append(name)
        seen.add(name)
    raise DataError(
        f"the {split.dataset} {split.split} gallery lists {len(dupes)} image(s) more than once "
        f"(first: {_ids_preview(dupes)})"
    )


def _subset_members(q: Mapping[str, Any]) -> list[str]:
    """Img_set members other than the reference, duplicates dropped (order kept)."""
    return [m for m in dict.fromkeys(q.get("subset") or []) if m != q["reference"]]


class _SplitArrays:
    """A split's names as integer tensors (reference, target and img_set positions in the
    gallery), built and checked once per split object and kept on each device used.

    Scoring every epoch of a run then does no per-query Python at all. Splits are treated as
    unchanging once loaded (loaders build new ones); the key below still notices a new query or
    gallery list, or a changed length, on the same split object.
    """

    def __init__(self, key: tuple) -> None:
        self.key = key
        self.pos: dict[str, int] | None = None
        self.query_ids: list[str] | None = None
        self.unique_ids = False
        self.reference: Tensor | None = None      # [Q] gallery index or -1
        self.any_reference = False
        self.subset: Tensor | None = None         # [Q, m] member indices, sorted, -1 padded
        self.targets_checked = False
        self.target: Tensor | None = None         # [Q] gallery index of the target
        self.circo: tuple[Tensor, Tensor] | None = None   # gallery ids [N], gt ids [Q, G] (-1 pad)
        self._devices: dict[tuple[str, str], Tensor] = {}

    def on(self, name: str, device: torch.device) -> Tensor:
        key = (name, str(device))
        if key not in self._devices:
            value = getattr(self, name)
            self._devices[key] = tuple(v.to(device) for v in value) if isinstance(value, tuple) else value.to(device)
        return self._devices[key]


def _arrays(split: CIRSplit) -> _SplitArrays:
    key = (id(split.queries), len(split.queries), id(split.gallery), len(split.gallery),
           split.dataset, split.split, split.protocol)
    arrays = split.__dict__.get("_scoring_arrays")
    if arrays is None or arrays.key != key:
        arrays = _SplitArrays(key)
        split.__dict__["_scoring_arrays"] = arrays
    if arrays.query_ids is None:
        arrays.query_ids = [str(q["query_id"]) for q in split.queries]
        arrays.unique_ids = len(set(arrays.query_ids)) == len(arrays.query_ids)
    return arrays


def _positions(split: CIRSplit, arrays: _SplitArrays) -> dict[str, int]:
    if arrays.pos is None:
        arrays.pos = _gallery_positions(split)
    return arrays.pos


def _reference_index(split: CIRSplit, arrays: _SplitArrays) -> None:
    if arrays.reference is None:
        get = _positions(split, arrays).get
        ref = torch.tensor([get(q["reference"], -1) for q in split.queries], dtype=torch.long)
        arrays.any_reference = bool((ref >= 0).any())
        arrays.reference = ref


def _subset_index(split: CIRSplit, arrays: _SplitArrays) -> None:
    if arrays.subset is None:
        pos = _positions(split, arrays)
        rows = []
        for q in split.queries:
            members = _subset_members(q)
            missing = [m for m in members if m not in pos]
            if missing:
                raise DataError(f"query {q['query_id']}: img_set member(s) {_ids_preview(missing)} not in the gallery")
            rows.append(sorted(map(pos.__getitem__, members)))   # by gallery index: the tie order
        m = max(1, max((len(r) for r in rows), default=0))
        arrays.subset = torch.tensor([r + [-1] * (m - len(r)) for r in rows], dtype=torch.long).view(len(rows), m)


def rank_split(split: CIRSplit, query_feats: Tensor, gallery_feats: Tensor, k: int = 50,
               chunk_size: int | None = None) -> Rankings:
    """Rank ``split.gallery`` for every query under the split's protocol; keep the top k.

    ``gallery_feats`` rows are aligned with ``split.gallery``. Features are used as given
    (callers L2-normalise); ties rank the lower gallery index first. The result holds gallery
    indices on the features' device (names are made when read). ``chunk_size`` (query rows per
    score block) defaults to 1024 on CPU and to as many as MAX_BLOCK_ELEMENTS allows on a GPU.
    """
    proto = protocol_of(split)
    nq, ng = len(split.queries), len(split.gallery)
    if query_feats.shape[0] != nq:
        raise ConfigError(f"{query_feats.shape[0]} query feature rows for {nq} queries of {split.dataset} {split.split}")
    if gallery_feats.shape[0] != ng:
        raise ConfigError(f"{gallery_feats.shape[0]} gallery feature rows for {ng} gallery images of {split.dataset} {split.split}")
    if ng == 0:
        raise DataError(f"the {split.dataset} {split.split} gallery is empty")
    arrays = _arrays(split)
    _positions(split, arrays)
    device = query_feats.device
    if chunk_size is None:
        chunk_size = 1024 if device.type == "cpu" else MAX_BLOCK_ELEMENTS

    exclude = None
    if REMOVES_REFERENCE.get(proto, True):
        _reference_index(split, arrays)
        exclude = arrays.on("reference", device)
    width = min(k, ng - (1 if exclude is not None and arrays.any_reference else 0))
    if width < 1:
        raise DataError(f"the {split.dataset} {split.split} gallery has nothing to rank once the reference is removed")

    subset_idx = None
    if proto == "cirr":
        _subset_index(split, arrays)
        subset_idx = arrays.on("subset", device)

    top_i: list[Tensor] = []
    sub_order: list[Tensor] = []
    for start, scores in iter_score_blocks(query_feats, gallery_feats, chunk_size):
        if exclude is not None:
            mask_excluded(scores, exclude, start)
        top_i.append(topk_block(scores, width)[1])
        if subset_idx is not None:
            sidx = subset_idx[start:start + scores.shape[0]]
            # subset scores come from the same score block, so the order matches the full ranking
            s = torch.gather(scores, 1, sidx.clamp(min=0)).masked_fill_(sidx < 0, float("-inf"))
            # members are in gallery-index order, so a stable sort keeps the full ranking's tie rule
            perm = torch.sort(s, dim=1, descending=True, stable=True)[1]
            sub_order.append(torch.gather(sidx, 1, perm))

    def joined(parts: list[Tensor], cols: int) -> Tensor:
        if not parts:
            return torch.empty((0, cols), dtype=torch.long, device=device)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    subset = joined(sub_order, subset_idx.shape[1]) if subset_idx is not None else None
    return Rankings(list(arrays.query_ids or []), indices=joined(top_i, width), subset_indices=subset,
                    gallery=split.gallery, origin=arrays)


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


def _checked_targets(split: CIRSplit, proto: str, arrays: _SplitArrays) -> None:
    """_check_targets once per split; also keeps the target positions for scoring indices."""
    if arrays.targets_checked:
        return
    pos = _check_targets(split, proto)
    if pos is not None:
        arrays.pos = pos
        arrays.target = torch.tensor([pos[q["target"]] for q in split.queries], dtype=torch.long)
        if proto == "circo":
            gts = [list(dict.fromkeys(circo_int(t) for t in _targets_of(q))) for q in split.queries]
            width = max(len(g) for g in gts)
            arrays.circo = (torch.tensor([circo_int(n) for n in split.gallery], dtype=torch.long),
                            torch.tensor([g + [-1] * (width - len(g)) for g in gts], dtype=torch.long))
        arrays.targets_checked = True


def metrics_from_rankings(split: CIRSplit, rankings: Rankings) -> dict[str, float]:
    """Metrics in percent for one split; key names depend on the protocol (module docstring).

    Queries that carry an ``edit_type`` (the synthetic benchmark's files do) add recall@1 (and
    CIRR's Rsubset@1) per type: ``edit_type/{type}/recall@1``, ``.../queries``.
    """
    out = _metrics_from_rankings(split, rankings)
    if protocol_of(split) in ("cirr", "generic", "user"):
        out.update(edit_type_breakdown(split, rankings))
    return out


def edit_type_breakdown(split: CIRSplit, rankings: Rankings) -> dict[str, float]:
    """Top-1 hits grouped by the queries' ``edit_type``; empty unless every query has a type and
    a target. The per-type recalls, weighted by their query counts, give the split's recall@1."""
    queries = split.queries
    if not queries or any("edit_type" not in q or "target" not in q for q in queries):
        return {}
    order = _align(split, rankings)
    if rankings.indices is not None and rankings.gallery is not None:
        g = rankings.gallery
        firsts = rankings.indices[:, 0].tolist() if rankings.indices.shape[1] else []
        top = [g[j] if j >= 0 else None for j in firsts]
    else:
        top = [row[0] if row else None for row in rankings.names]
    sub = rankings.subset_names
    hits: dict[str, list[tuple[bool, bool | None]]] = {}
    for q, i in zip(queries, order):
        s_hit = (bool(sub[i]) and sub[i][0] == q["target"]) if sub is not None else None
        hits.setdefault(str(q["edit_type"]), []).append((top[i] == q["target"], s_hit))
    out: dict[str, float] = {}
    for kind in sorted(hits):
        rows = hits[kind]
        out[f"edit_type/{kind}/queries"] = float(len(rows))
        out[f"edit_type/{kind}/recall@1"] = 100.0 * sum(h for h, _ in rows) / len(rows)
        if sub is not None:
            out[f"edit_type/{kind}/recall_subset@1"] = 100.0 * sum(bool(s) for _, s in rows) / len(rows)
    return out


def _metrics_from_rankings(split: CIRSplit, rankings: Rankings) -> dict[str, float]:
    proto = protocol_of(split)
    arrays = _arrays(split)
    _checked_targets(split, proto, arrays)
    if rankings._origin is arrays and rankings.indices is not None and arrays.targets_checked and arrays.unique_ids:
        return _metrics_from_indices(proto, arrays, rankings)
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
    subset = None
    if proto == "cirr":
        if rankings.subset_names is None:
            raise ConfigError("CIRR metrics need subset rankings (Rankings.subset_names)")
        subset = _code_matrix([rankings.subset_names[i][:SUBSET_TOP] for i in order], codes)
    return _recall_metrics(proto, ranked, target, subset)


def _metrics_from_indices(proto: str, arrays: _SplitArrays, rankings: Rankings) -> dict[str, float]:
    """The rankings of rank_split on this very split: score its gallery indices as they are
    (same values as through names: gallery names are unique, so a name's code is its index)."""
    ranked = rankings.indices
    device = ranked.device  # type: ignore[union-attr]
    if proto == "circo":
        gallery_ids, gts = arrays.on("circo", device)
        ap = average_precision_from_matrix(gallery_ids[ranked], None, gts, gts >= 0, CIRCO_KS)
        return {f"map@{k}": ap[k] for k in CIRCO_KS}
    subset = None
    if proto == "cirr":
        subset = rankings.subset_indices[:, :SUBSET_TOP]  # type: ignore[index]
    return _recall_metrics(proto, ranked, arrays.on("target", device), subset)  # type: ignore[arg-type]


def _recall_metrics(proto: str, ranked: Tensor, target: Tensor, subset: Tensor | None) -> dict[str, float]:
    if proto == "fashioniq":
        r = recall_at_k(ranked, target, FASHIONIQ_KS)
        return {f"recall@{k}": r[k] for k in FASHIONIQ_KS}
    r = recall_at_k(ranked, target, RECALL_KS)
    out = {f"recall@{k}": r[k] for k in RECALL_KS}
    if proto == "cirr":
        rs = recall_at_k(subset, target, SUBSET_KS)  # type: ignore[arg-type]
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
