"""Ranking and retrieval metrics on score matrices (torch; CPU or CUDA).

Scores are computed a block of query rows at a time, so memory stays bounded for large
galleries (CIRCO: ~120k images) and no Q x N array of names is ever built.

Tie-breaking rule (deterministic on every device): equal scores rank the LOWER gallery index
first. ``torch.topk`` does not promise any order among equal values, so each block checks
whether ties straddle the k-th place and, for those rows only, falls back to a stable sort.
"""
from __future__ import annotations

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
    # a sum is NaN/inf when any element is (one cheap reduction instead of a mask)
    if not bool(torch.isfinite(queries.sum(dtype=torch.float64))):
        raise DataError("query features contain NaN or infinite values")
    if not bool(torch.isfinite(gallery.sum(dtype=torch.float64))):
        raise DataError("gallery features contain NaN or infinite values")


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
    """Set ``scores[i, exclude[start + i]] = -inf`` in place where the index is >= 0."""
    if exclude is None:
        return
    ex = exclude[start:start + scores.shape[0]].to(device=scores.device, dtype=torch.long)
    rows = torch.nonzero(ex >= 0).flatten()
    if rows.numel():
        scores[rows, ex[rows]] = float("-inf")


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
    if k > 1:
        # ties inside the top-k: reorder those rows by index, then stable by score descending
        tied = torch.nonzero((vals[:, 1:] == vals[:, :-1]).any(dim=1)).flatten()
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
    return {k: 100.0 * int((pos < k).sum()) / q for k in ks}


def average_precision_at_k(ranked: Tensor | Sequence[Sequence[int]], gt_sets: Sequence[set[int]],
                           ks: Iterable[int]) -> dict[int, float]:
    """CIRCO mAP@K in percent: AP@K = sum_{i<=K} P@i * rel_i / min(|G|, K), averaged over queries.

    A ranked entry repeated is counted once per occurrence (as the official script does);
    callers validate rankings to be duplicate-free.
    """
    ks = _check_ks(ks)
    rows = ranked.tolist() if isinstance(ranked, Tensor) else [list(r) for r in ranked]
    if len(rows) != len(gt_sets):
        raise ConfigError(f"{len(rows)} rankings but {len(gt_sets)} ground-truth sets")
    if not rows:
        raise DataError("no queries to score")
    sums = {k: 0.0 for k in ks}
    for qi, (row, gts) in enumerate(zip(rows, gt_sets)):
        if not gts:
            raise DataError(f"query #{qi} has no ground-truth images")
        found = 0
        prec_sum = 0.0
        prefix: list[float] = []   # prefix[i] = sum of P@j * rel_j for j <= i
        for i, item in enumerate(row):
            if item in gts:
                found += 1
                prec_sum += found / (i + 1)
            prefix.append(prec_sum)
        for k in ks:
            total = prefix[min(k, len(prefix)) - 1] if prefix else 0.0
            sums[k] += total / min(len(gts), k)
    return {k: 100.0 * sums[k] / len(rows) for k in ks}
