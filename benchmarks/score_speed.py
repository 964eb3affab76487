"""Scoring speed at CIRR-val size: the toolkit's protocol path versus a bare matmul + top-k.

4181 queries x 2297 gallery images, d=640, random L2-normalised features, a synthetic CIRSplit
with CIRR-style img_set subsets. The toolkit path is rank_split (reference removal, deterministic
ties, subset ranking) + metrics_from_rankings (target checks, recall, subset recall); the
baseline is ``(q @ g.T).topk(50)`` alone. Both end with their results on the CPU.

"warm" is a split scored before (every epoch of a run after the first): the split's names were
turned into index tensors and checked once (protocols._SplitArrays). "cold" is a fresh split
object each call (one-off `cir eval`), so it includes that once-per-split preparation.
Goal: warm ratio <= 1.5 on CPU, <= 2 on GPU.

    python benchmarks/score_speed.py [--reps 5] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from composed_retrieval.data.base import CIRSplit
from composed_retrieval.evaluation.protocols import metrics_from_rankings, rank_split


def synthetic_cirr(n_queries: int, n_images: int, seed: int = 0) -> CIRSplit:
    rng = random.Random(seed)
    names = [f"dev-{i}-img{i % 2}" for i in range(n_images)]
    queries = []
    for i in range(n_queries):
        members = rng.sample(names, 6)
        queries.append({"query_id": str(i), "reference": members[0], "caption": "x",
                        "target": rng.choice(members[1:]), "subset": members[1:]})
    return CIRSplit("cirr", "val", queries, names, {}, protocol="cirr")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, reps: int) -> tuple[float, object]:
    out = fn()   # warm-up
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=4181)
    ap.add_argument("--images", type=int, default=2297)
    ap.add_argument("--dim", type=int, default=640)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(args.queries, args.dim, generator=gen), dim=1).to(device)
    g = torch.nn.functional.normalize(torch.randn(args.images, args.dim, generator=gen), dim=1).to(device)
    split = synthetic_cirr(args.queries, args.images)

    def bare():
        return (q @ g.T).topk(50, dim=1).indices.cpu()

    def toolkit():
        return metrics_from_rankings(split, rank_split(split, q, g, k=50))

    def toolkit_cold():
        fresh = CIRSplit(split.dataset, split.split, list(split.queries), list(split.gallery), {}, protocol="cirr")
        return metrics_from_rankings(fresh, rank_split(fresh, q, g, k=50))

    t_bare, _ = timed(bare, device, args.reps)
    t_kit, metrics = timed(toolkit, device, args.reps)
    t_cold, _ = timed(toolkit_cold, device, args.reps)
    print(f"device={device} threads={torch.get_num_threads()} queries={args.queries} images={args.images} "
          f"dim={args.dim} reps={args.reps} (median)")
    print(f"bare q@g.T + topk(50): {t_bare * 1000:.1f} ms")
    print(f"toolkit rank_split + metrics_from_rankings, warm split: {t_kit * 1000:.1f} ms")
    print(f"toolkit, cold split (first scoring of a split object): {t_cold * 1000:.1f} ms "
          f"(ratio {t_cold / t_bare:.2f})")
    goal = 1.5 if device.type == "cpu" else 2.0
    print(f"ratio: {t_kit / t_bare:.2f} (goal <= {goal:g})")
    print(f"sanity (random features, chance level): recall@50={metrics['recall@50']:.2f} "
          f"recall_subset@1={metrics['recall_subset@1']:.2f}")


if __name__ == "__main__":
    main()
