"""Ranking and retrieval metrics on score matrices (torch; CPU or CUDA).

Scores are computed a block of query rows at a time, so memory stays bounded for large
galleries (CIRCO: ~120k images) and no Q x N array of names is ever built.

Tie-breaking rule (deterministic on every device): equal scores rank the LOWER gallery index
first. ``torch.topk`` does not promise any order among equal values, so each block checks
whether ties straddle the k-th place and, for those rows only, falls back to a stable sort.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError, DataError

# Upper bound on the number of scores held at once (floats): 32M floats = 128 MiB.
MAX_BLOCK_ELEMENTS = 1 << 25


def _check_features(queries: Tensor, gallery: Tensor) -> None:
    if queries.ndim != 2 or gallery.ndim != 2:
        raise ConfigError(
            f"features must be 2-D [rows, dim]; got queries {tuple(queries.shape)}, gallery {tuple(gallery.shape)}"
        )
    if queries.shape[1] != gallery.shape[1]:
        raise ConfigError(
            f"query features have dim {queries.shape[1]} but gallery features have dim {gallery.shape[1]}"
        )
    # a sum is NaN/inf when any element is: one cheap reduction per tensor and one device sync;
    # only when a sum is not finite (NaN/inf, or an overflow of huge finite values) is each
    # element looked at, so huge values alone are never refused
    sums = torch.stack([queries.sum().float(), gallery.sum().float()]).tolist() if queries.numel() and gallery.numel() else [0.0, 0.0]
    for what, x, total in (("query", queries, sums[0]), ("gallery", gallery, sums[1])):
        if not math.isfinite(total) and not bool(torch.isfinite(x).all()):
            raise DataError(f"{what} features contain NaN or infinite values")


def iter_score_blocks(queries: Tensor, gallery: Tensor, chunk_size: int = 1024) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(first_row, scores[rows, N])`` in float32, on the queries' device."""
    _check_features(queries, gallery)
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    device = queries.device
    g = gallery.to(device=device, dtype=torch.float32)
    n = max(1, g.shape[0])
    rows = max(1, min(chunk_size, MAX_BLOCK_ELEMENTS // n))
    gt = g.T.contiguous()
    for start in range(0, queries.shape[0], rows):
        q = queries[start:start + rows].to(dtype=torch.float32)
        yield start, q @ gt


def mask_excluded(scores: Tensor, exclude: Tensor | None, start: int) -> None:
    """Set ``scores[i, exclude[start + i]] = -inf`` in place where the index is >= 0.

    Without a device sync: every row writes one column, rows without an exclusion write their
    own column-0 score back unchanged.
    """
    if exclude is None:
        return
    ex = exclude[start:start + scores.shape[0]].to(device=scores.device, dtype=torch.long).view(-1, 1)
    col = ex.clamp(min=0)
    keep = torch.gather(scores, 1, col)
    scores.scatter_(1, col, torch.where(ex >= 0, torch.full_like(keep, float("-inf")), keep))


def topk_block(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of each row, highest score first, equal scores by lower column index first."""
    n = scores.shape[1]
    if not 1 <= k <= n:
        raise ConfigError(f"k must be between 1 and the gallery size {n}, got {k}")
    # one extra column shows whether ties straddle the k-th place: then the k-th and the
    # (k+1)-th largest values are equal and the top-k set itself depends on the tie rule
    vals, idx = torch.topk(scores, min(k + 1, n), dim=1, largest=True, sorted=True)
    straddle = vals[:, k] == vals[:, k - 1] if k < n else None
    vals, idx = vals[:, :k], idx[:, :k]
    inner = (vals[:, 1:] == vals[:, :-1]).any(dim=1) if k > 1 else None
    # one device sync for both tie checks (they are rare with real features)
    flags = [m.any() for m in (inner, straddle) if m is not None]
    if not flags or not any(torch.stack(flags).tolist()):
        return vals, idx
    if inner is not None:
        # ties inside the top-k: reorder those rows by index, then stable by score descending
        tied = torch.nonzero(inner).flatten()
        if tied.numel():
            t_idx, _ = torch.sort(idx[tied], dim=1)
            t_vals = torch.gather(scores[tied], 1, t_idx)
            t_vals, perm = torch.sort(t_vals, dim=1, descending=True, stable=True)
            vals[tied] = t_vals
            idx[tied] = torch.gather(t_idx, 1, perm)
    if straddle is not None:
        rows = torch.nonzero(straddle).flatten()
        if rows.numel():
            s_vals, s_idx = torch.sort(scores[rows], dim=1, descending=True, stable=True)
            vals[rows] = s_vals[:, :k]
            idx[rows] = s_idx[:, :k]
    return vals, idx


def chunked_topk(
    queries: Tensor,
    gallery: Tensor,
    k: int,
    exclude: Tensor | None = None,
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Top-k gallery rows by dot product for each query: ``(scores [Q,k], indices [Q,k] long)``.

    ``exclude[q]`` is a gallery index scored -inf for query q (CIRR removes the reference image),
    -1 for none. Ties: lower gallery index first. Results are on the queries' device.
    """
    if exclude is not None and exclude.shape != (queries.shape[0],):
        raise ConfigError(f"exclude must have shape ({queries.shape[0]},), got {tuple(exclude.shape)}")
    out_v, out_i = [], []
    for start, scores in iter_score_blocks(queries, gallery, chunk_size):
        mask_excluded(scores, exclude, start)
        v, i = topk_block(scores, k)
        out_v.append(v)
        out_i.append(i)
    if not out_v:
        empty = torch.empty((0, k), device=queries.device)
        return empty, empty.long()
    return torch.cat(out_v), torch.cat(out_i)


def _check_ks(ks: Iterable[int]) -> list[int]:
    ks = [int(k) for k in ks]
    if not ks or any(k < 1 for k in ks):
        raise ConfigError(f"ranks K must be positive integers, got {ks}")
    return ks


def recall_at_k(ranked: Tensor, target: Tensor, ks: Iterable[int]) -> dict[int, float]:
    """Percent of queries whose target index is among the first K ranked indices.

    A K larger than the ranking width counts the whole ranking (a gallery smaller than K).
    """
    ks = _check_ks(ks)
    if ranked.ndim != 2 or target.shape != (ranked.shape[0],):
        raise ConfigError(f"ranked must be [Q,K] and target [Q]; got {tuple(ranked.shape)} and {tuple(target.shape)}")
    q = ranked.shape[0]
    if q == 0:
        raise DataError("no queries to score")
    hits = ranked == target.to(ranked.device).view(-1, 1)
    # first position of the target (beyond every K when absent), so one pass serves every K
    absent = ranked.shape[1] + max(ks)
    pos = torch.where(hits.any(dim=1), hits.int().argmax(dim=1), torch.full((q,), absent, device=ranked.device))
    counts = torch.stack([(pos < k).sum() for k in ks]).tolist()   # one device sync for every K
    return {k: 100.0 * c / q for k, c in zip(ks, counts)}


def average_precision_at_k(ranked: Tensor | Sequence[Sequence[int]], gt_sets: Sequence[set[int]],
                           ks: Iterable[int]) -> dict[int, float]:
    """CIRCO mAP@K in percent: AP@K = sum_{i<=K} P@i * rel_i / min(|G|, K), averaged over queries.

    A ranked entry repeated is counted once per occurrence (as the official script does);
    callers validate rankings to be duplicate-free. Rows may differ in length.
    """
    ks = _check_ks(ks)
    rows = ranked.tolist() if isinstance(ranked, Tensor) else [list(r) for r in ranked]
    if len(rows) != len(gt_sets):
        raise ConfigError(f"{len(rows)} rankings but {len(gt_sets)} ground-truth sets")
    if not rows:
        raise DataError("no queries to score")
    for qi, gts in enumerate(gt_sets):
        if not gts:
            raise DataError(f"query #{qi} has no ground-truth images")
    width = max(1, max(len(r) for r in rows))
    gwidth = max(len(g) for g in gt_sets)
    r = torch.tensor([list(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long)
    r_valid = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows])
    g = torch.tensor([sorted(s) + [0] * (gwidth - len(s)) for s in gt_sets], dtype=torch.long)
    g_valid = torch.tensor([[True] * len(s) + [False] * (gwidth - len(s)) for s in gt_sets])
    return average_precision_from_matrix(r, r_valid, g, g_valid, ks)


def average_precision_from_matrix(ranked: Tensor, ranked_valid: Tensor | None, gts: Tensor, gts_valid: Tensor,
                                  ks: Iterable[int]) -> dict[int, float]:
    """mAP@K (percent) of ``ranked [Q, K]`` against padded ground truths ``gts [Q, G]``; the
    ``*_valid`` masks mark real entries (``None``: all ranked entries are real). Vectorised:
    no per-query Python, one device sync."""
    ks = _check_ks(ks)
    q = ranked.shape[0]
    if q == 0:
        raise DataError("no queries to score")
    rel = ((ranked.unsqueeze(2) == gts.unsqueeze(1)) & gts_valid.unsqueeze(1)).any(dim=2)
    if ranked_valid is not None:
        rel &= ranked_valid
    rel = rel.double()
    found = rel.cumsum(dim=1)
    ranks = torch.arange(1, ranked.shape[1] + 1, device=ranked.device, dtype=torch.float64)
    prefix = (found / ranks * rel).cumsum(dim=1)      # prefix[:, i] = sum_{j<=i} P@j * rel_j
    n_gt = gts_valid.sum(dim=1).double()
    if bool((n_gt == 0).any()):
        raise DataError(f"query #{int(torch.nonzero(n_gt == 0)[0])} has no ground-truth images")
    per_k = torch.stack([prefix[:, min(k, prefix.shape[1]) - 1] / n_gt.clamp(max=k) for k in ks])
    means = (per_k.sum(dim=1) / q).tolist()
    return {k: 100.0 * m for k, m in zip(ks, means)}
