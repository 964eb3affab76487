"""How long does one query take, and where does the time go: the encoder or the index?

For galleries of random L2-normalised vectors (10k, 100k, 1M by default; d=256) this measures the
latency of one query (k=10, one query per call, as the HTTP service issues them) against an exact
FAISS index (IndexFlatIP) and an approximate one (IVF-Flat by default, or HNSW), with the
approximate index's recall@10 against exact search on the same queries. Next to it, in the same
run: the encoder-side time of one query with the built-in tiny encoder + the Sum method
(preprocess one reference image, tokenize and encode the text, compose).

By default the gallery and the queries are uniformly random unit vectors: nothing is clustered,
the hardest case for IVF/HNSW, so that recall is a lower bound. ``--data clustered`` draws the
gallery around n/100 centres and the queries near gallery vectors, closer to real embeddings.

    python benchmarks/search_latency.py                         # 10k, 100k, 1M
    python benchmarks/search_latency.py --sizes 10000,100000 --approx hnsw
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import faiss
import numpy as np
import torch
from PIL import Image, ImageDraw

from composed_retrieval.index import faiss_index


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000.0
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def random_unit(n: int, d: int, rng: np.random.Generator, chunk: int = 100_000) -> np.ndarray:
    """float32 unit vectors, generated in chunks so that 1M x d never needs a float64 copy."""
    out = np.empty((n, d), dtype=np.float32)
    for lo in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - lo), d), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[lo:lo + len(block)] = block
    return out


def clustered_unit(n: int, d: int, rng: np.random.Generator, spread: float = 0.35,
                   chunk: int = 100_000) -> np.ndarray:
    """Unit vectors around n/100 random centres (a crude stand-in for embeddings of real
    photos, which form groups of similar images)."""
    centres = random_unit(max(n // 100, 10), d, rng)
    out = np.empty((n, d), dtype=np.float32)
    for lo in range(0, n, chunk):
        m = min(chunk, n - lo)
        block = centres[rng.integers(0, len(centres), m)] \
            + rng.standard_normal((m, d), dtype=np.float32) * (spread / np.sqrt(d))
        out[lo:lo + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def near(gallery: np.ndarray, count: int, rng: np.random.Generator, noise: float = 0.35) -> np.ndarray:
    """Queries near random gallery vectors (a query usually resembles some gallery images)."""
    q = gallery[rng.integers(0, len(gallery), count)] \
        + rng.standard_normal((count, gallery.shape[1]), dtype=np.float32) * (noise / np.sqrt(gallery.shape[1]))
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def time_queries(index: faiss.Index, queries: np.ndarray, k: int, warmup: int = 5) -> tuple[list[float], np.ndarray]:
    for q in queries[:warmup]:
        index.search(q[None], k)
    times, ids = [], []
    for q in queries:
        t0 = time.perf_counter()
        _, i = index.search(q[None], k)
        times.append(time.perf_counter() - t0)
        ids.append(i[0])
    return times, np.stack(ids)


def encoder_latency(repeats: int, seed: int) -> dict[str, float]:
    """One composed query with the tiny encoder + Sum, from a PIL image and a string."""
    from composed_retrieval.encoders.tiny import TinyEncoder
    from composed_retrieval.methods.baselines import Sum
    torch.manual_seed(seed)
    method = Sum(TinyEncoder(), {}).eval()
    transform = method.encoder.image_transform("targetpad")
    image = Image.new("RGB", (320, 240), (20, 20, 20))
    ImageDraw.Draw(image).ellipse([60, 40, 200, 180], fill=(200, 40, 40))
    text = "make the circle blue and add a small square on the left"

    def once() -> torch.Tensor:
        with torch.no_grad():
            pixels = transform(image)[None]
            tokens = method.encoder.tokenize([text])
            return method.compose(method.image_features(pixels), method.text_features(tokens))

    for _ in range(5):
        once()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return {**percentiles(times), "dim": int(once().shape[1]), "repeats": repeats}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated gallery sizes")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=200, help="timed single queries per engine")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--approx", choices=("ivf", "hnsw"), default="ivf")
    p.add_argument("--nprobe", type=int, help="IVF lists visited (default: the index default for the size)")
    p.add_argument("--tune", action="store_true",
                   help="IVF: tune nprobe to recall 0.95 on gallery vectors, as `cir index` does (on "
                        "random data that ends near nprobe = nlist, i.e. no speed-up)")
    p.add_argument("--ef-search", type=int, help="HNSW candidate list size (default 64)")
    p.add_argument("--threads", type=int, default=1,
                   help="FAISS and torch threads (default 1: one query at a time gains little from more)")
    p.add_argument("--encoder-repeats", type=int, default=100)
    p.add_argument("--data", choices=("uniform", "clustered"), default="uniform",
                   help="uniform random unit vectors and queries (worst case for IVF/HNSW), or "
                        "clustered vectors with queries near gallery vectors (closer to real embeddings)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    build_threads = faiss.omp_get_max_threads()         # building uses every core, queries --threads
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    queries = random_unit(args.queries, args.dim, rng)

    env = {"cpus": os.cpu_count(), "faiss_threads": faiss.omp_get_max_threads(),
           "torch_threads": torch.get_num_threads(), "faiss": faiss.__version__, "python": sys.version.split()[0]}
    print(f"# search latency, {args.data} data, d={args.dim}, k={args.k}, {args.queries} single queries "
          f"per engine; {env}")
    enc = encoder_latency(args.encoder_repeats, args.seed)
    print(f"encoder (tiny + sum, 1 image + 1 text -> {enc['dim']}-d query): "
          f"p50 {enc['p50_ms']:.2f} ms, p99 {enc['p99_ms']:.2f} ms", flush=True)

    rows = []
    for n in sizes:
        if args.data == "uniform":
            gallery = random_unit(n, args.dim, rng)
        else:
            gallery = clustered_unit(n, args.dim, rng)
            queries = near(gallery, args.queries, rng)
        t0 = time.perf_counter()
        flat = faiss_index.build_engine(gallery, "flat")
        flat_build = time.perf_counter() - t0
        flat_times, exact_ids = time_queries(flat, queries, args.k)
        params = faiss_index.default_params(args.approx, n)
        if args.approx == "ivf" and args.nprobe:
            params["nprobe"] = args.nprobe
        if args.approx == "hnsw" and args.ef_search:
            params["ef_search"] = args.ef_search
        t0 = time.perf_counter()
        faiss.omp_set_num_threads(build_threads)
        approx = faiss_index.build_engine(gallery, args.approx, params)
        if args.approx == "ivf" and args.tune and not args.nprobe:   # what `cir index` does
            params["nprobe"], params["tuned_recall_on_gallery_sample"] = faiss_index.tune_nprobe(
                approx, gallery, target=0.95, sample=300, seed=args.seed)
        approx_build = time.perf_counter() - t0
        faiss.omp_set_num_threads(args.threads)
        approx_times, approx_ids = time_queries(approx, queries, args.k)
        recall = float(np.mean([len(set(a) & set(e)) / args.k for a, e in zip(approx_ids, exact_ids)]))
        row = {"n": n, "flat": {**percentiles(flat_times), "build_s": flat_build},
               args.approx: {**percentiles(approx_times), "build_s": approx_build, "params": params,
                             "recall_at_10": recall}}
        rows.append(row)
        f, a = row["flat"], row[args.approx]
        print(f"n={n:>9,}  flat p50 {f['p50_ms']:8.3f} ms  p99 {f['p99_ms']:8.3f} ms | "
              f"{args.approx} p50 {a['p50_ms']:8.3f} ms  p99 {a['p99_ms']:8.3f} ms  recall@10 {recall:.3f}  "
              f"build {approx_build:.1f}s {params}", flush=True)
        del gallery, flat, approx

    print("\n| gallery | exact p50 / p99 (ms) | " + args.approx + " p50 / p99 (ms) | " + args.approx
          + " recall@10 | encoder p50 / p99 (ms) |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        f, a = r["flat"], r[args.approx]
        print(f"| {r['n']:,} | {f['p50_ms']:.2f} / {f['p99_ms']:.2f} | {a['p50_ms']:.2f} / {a['p99_ms']:.2f} | "
              f"{a['recall_at_10']:.3f} | {enc['p50_ms']:.2f} / {enc['p99_ms']:.2f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"env": env, "data": args.data, "dim": args.dim, "k": args.k, "encoder": enc, "sizes": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
