"""Index kinds at 1M and 10M vectors: bytes per vector on disk and resident, build time, one-thread
query latency (p50 / p99) and recall@10 against exact search, side by side in one run.

For each size and dimension the gallery is drawn as clustered unit vectors (around n/100 random
centres, as embeddings of real photos group) straight into a memory-mapped float32 file on disk
in chunks, with a float16 copy (what `cir index` stores for the PQ kinds' re-ranking); queries are
noisy copies of random gallery vectors. Nothing ever holds the whole gallery in RAM: exact
ground truth is a chunked scan of the file, engines are trained on a sample and filled in chunks
(``faiss_index.train_engine`` / ``add_vectors``, the code `cir index` runs), and searched from
files opened memory-mapped, as `cir serve` opens them.

Kinds: flat (exact scan of the memory-mapped vectors), ivf (IVF-Flat), hnsw, ivfpq and opq-ivfpq
(PQ code from ``--pq-m`` or ~d/8 bytes, exact re-ranking of the top ``--rerank`` candidates from
the float16 file). IVF kinds get the smallest nprobe in a doubling ladder reaching
``--recall-target`` on the queries. A kind whose estimated resident size is above ``--ram-limit``
(default 60% of this machine's RAM) is skipped and says so: at 10M x 640, IVF-Flat and HNSW
need ~26-28 GB and do not fit a 24 GiB machine, which is the point of the compressed kinds. Exact
search is never skipped: it streams the memory-mapped file, from disk when the file is larger
than the limit (then only 10 of its queries are timed).

    python benchmarks/search_scale.py --sizes 100000 --dims 256,640          # quick check
    python benchmarks/search_scale.py --sizes 1000000,10000000 --dims 256,640 \\
        --workdir /data/scratch --out search_scale.jsonl                  # the docs' table

Time: on 2 cores the 10M runs take hours (IVF training and assignment to ~12,600 lists, and
HNSW's build at 10M x 256 most of all; leave it out with --kinds flat,ivf,ivfpq,opq-ivfpq, or
lower --nlist). Disk needed at 10M x 640: ~26 GB float32 + 13 GB float16 + engines; files are deleted after
each (size, dim) unless --keep. Build time uses --build-threads (default all cores); queries one
thread. The last lines print each kind's p50 as ``ratio:`` against exact search and the 100M
extrapolation (bytes/vector x 1e8, centroids added) for disk and RAM.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import faiss
import numpy as np

from composed_retrieval.index import faiss_index

KINDS = ("flat", "ivf", "hnsw", "ivfpq", "opq-ivfpq")
CHUNK = 100_000


def mappings(paths: list[Path]) -> dict[str, int]:
    """{address range: resident bytes} of the mappings of these files in this process (from
    /proc/self/smaps): what searching actually touched of a memory-mapped index."""
    names = {str(p.resolve()) for p in paths}
    out: dict[str, int] = {}
    current = None
    with open("/proc/self/smaps") as fh:
        for line in fh:
            parts = line.split()
            if parts and "-" in parts[0] and len(parts) >= 5 and not parts[0].endswith(":"):
                current = parts[0] if len(parts) > 5 and parts[5] in names else None
            elif parts and parts[0] == "Rss:" and current is not None:
                out[current] = out.get(current, 0) + int(parts[1]) * 1024
    return out


def mem_total() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def drop_cache(path: Path) -> None:
    """Ask the kernel to forget a file's cached pages (so resident numbers start from zero)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    except (OSError, AttributeError):
        pass


def make_gallery(folder: Path, n: int, d: int, seed: int, spread: float = 0.35,
                 reuse: bool = False) -> tuple[np.memmap, np.memmap]:
    """Clustered unit vectors written chunk by chunk: float32 [n, d] and its float16 copy. With
    ``reuse``, files a completed earlier generation left (its marker names n, d, seed and spread)
    are opened instead: at 10M x 640 writing them takes ~10 minutes."""
    f32_path, f16_path, marker = (folder / f"vectors-{n}-{d}{ext}" for ext in (".npy", ".f16.npy", ".done"))
    stamp = json.dumps({"n": n, "d": d, "seed": seed, "spread": spread})
    if reuse and marker.is_file() and marker.read_text() == stamp:
        return np.load(f32_path, mmap_mode="r"), np.load(f16_path, mmap_mode="r")
    marker.unlink(missing_ok=True)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(n // 100, 10), d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    f32 = np.lib.format.open_memmap(f32_path, mode="w+", dtype=np.float32, shape=(n, d))
    f16 = np.lib.format.open_memmap(f16_path, mode="w+", dtype=np.float16, shape=(n, d))
    for lo in range(0, n, CHUNK):
        m = min(CHUNK, n - lo)
        block = centres[rng.integers(0, len(centres), m)] \
            + rng.standard_normal((m, d), dtype=np.float32) * (spread / np.sqrt(d))
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        f32[lo:lo + m] = block
        f16[lo:lo + m] = block
    f32.flush()
    f16.flush()
    marker.write_text(stamp)
    return f32, f16


def make_queries(gallery: np.ndarray, count: int, seed: int, noise: float = 0.35) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)
    rows = np.sort(rng.choice(gallery.shape[0], count, replace=False))
    q = np.asarray(gallery[rows], dtype=np.float32)
    q += rng.standard_normal(q.shape, dtype=np.float32) * (noise / np.sqrt(q.shape[1]))
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[f >= 0].tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth)]))


def timed_queries(search, queries: np.ndarray, k: int) -> tuple[list[float], np.ndarray]:
    for q in queries[:3]:
        search(q[None], k)
    times, ids = [], []
    for q in queries:
        t0 = time.perf_counter()
        _, i = search(q[None], k)
        times.append(time.perf_counter() - t0)
        ids.append(i[0])
    return times, np.stack(ids)


def run_kind(kind: str, work: Path, f32: np.memmap, f16: np.memmap, queries: np.ndarray, truth: np.ndarray,
             args: argparse.Namespace) -> dict:
    n, d = f32.shape
    params = faiss_index.default_params(kind, n, d)
    if kind in faiss_index.PQ_KINDS:
        if args.pq_m:
            params["m"] = args.pq_m
        params["rerank"] = args.rerank
    if args.nlist and kind in faiss_index.IVF_KINDS:
        params["nlist"] = args.nlist
    est = faiss_index.sizes(kind, n, d, params)
    row = {"n": n, "d": d, "kind": kind, "params": params, "resident_est_bytes_per_vector": est["resident"] / n}
    if est["resident"] > args.ram_limit and kind != "flat":   # flat streams its mapped file (below)
        row["skipped"] = f"needs ~{est['resident'] / 2**30:.1f} GiB resident, above --ram-limit {args.ram_limit / 2**30:.1f} GiB"
        return row
    vectors_file = Path(f32.filename) if kind not in faiss_index.PQ_KINDS else Path(f16.filename)
    faiss.omp_set_num_threads(args.build_threads)
    t0 = time.perf_counter()
    if kind == "flat":
        engine_path = None
    else:
        engine = faiss_index.train_engine(f32, kind, params, sample=args.train_sample)
        faiss_index.add_vectors(engine, f32)
        engine_path = work / f"engine-{kind}.faiss"
        faiss_index.save_engine(engine, engine_path)
        del engine
    row["build_s"] = time.perf_counter() - t0
    row["disk_bytes_per_vector"] = (vectors_file.stat().st_size
                                    + (engine_path.stat().st_size if engine_path else 0)) / n

    faiss.omp_set_num_threads(1)
    if engine_path is not None:
        drop_cache(engine_path)
    files = [vectors_file] + ([engine_path] if engine_path else [])
    earlier = set(mappings(files))                          # the generator's own mappings
    stored = np.load(vectors_file, mmap_mode="r")          # a fresh mapping, as `cir serve` opens it
    if kind == "flat":
        engine = faiss_index.MappedFlat(stored)
    else:
        engine = faiss_index.load_engine(engine_path, mmap=True)
    mapped = faiss.downcast_InvertedLists(faiss.extract_index_ivf(engine).invlists).__class__.__name__ \
        == "OnDiskInvertedLists" if kind in faiss_index.IVF_KINDS else kind == "flat"
    rerank = int(params.get("rerank", 0)) if kind in faiss_index.PQ_KINDS else 0

    def search(q: np.ndarray, k: int):
        return faiss_index.search_reranked(engine, stored, q, k, rerank)

    count = args.flat_queries if kind == "flat" else len(queries)
    if kind == "flat" and vectors_file.stat().st_size > args.ram_limit:
        count = min(count, 10)      # every query reads the whole file from disk: a few suffice
        row["note"] = "vectors file larger than --ram-limit: exact search reads it from disk per query"
    tune_q = queries[: min(200, len(queries))]
    score = lambda: recall(search(tune_q, args.k)[1], truth[: len(tune_q)])  # noqa: E731
    if kind in faiss_index.IVF_KINDS:       # smallest nprobe of the ladder that reaches the target
        ivf = faiss.extract_index_ivf(engine)
        nprobe, _ = faiss_index.tune_ladder(lambda v: setattr(ivf, "nprobe", v), 1, ivf.nlist, score, args.recall_target)
        row["params"] = {**params, "nprobe": nprobe}
    elif kind == "hnsw":                    # the same for efSearch, from the default
        ef, _ = faiss_index.tune_ladder(lambda v: setattr(engine.hnsw, "efSearch", v), int(params["ef_search"]),
                                        faiss_index.MAX_EF_SEARCH, score, args.recall_target)
        row["params"] = {**params, "ef_search": ef}
    times, ids = timed_queries(search, queries[:count], args.k)
    ms = np.asarray(times) * 1000
    row.update({"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
                "queries_timed": count, "recall_at_10": recall(ids, truth[:count]),
                # pages of the mapped files that searching touched, plus an engine read into RAM
                "resident_measured_bytes_per_vector": (sum(v for a, v in mappings(files).items() if a not in earlier)
                                                       + (0 if mapped else engine_path.stat().st_size)) / n})
    return row


def extrapolate(row: dict, target: int = 100_000_000) -> tuple[float, float]:
    """(disk GB, RAM GB) at ``target`` vectors: per-vector bytes plus the centroids of an IVF
    with 4 sqrt(target) lists (the per-vector numbers already include today's centroids, a
    rounding error at these sizes)."""
    n, d, kind = row["n"], row["d"], row["kind"]
    p = {**row["params"]}
    if kind in faiss_index.IVF_KINDS:
        p["nlist"] = faiss_index.default_params(kind, target, d)["nlist"]
    est = faiss_index.sizes(kind, target, d, p)
    disk = row.get("disk_bytes_per_vector", est["disk"] / target) * target
    return disk / 1e9, est["resident"] / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000000,10000000")
    ap.add_argument("--dims", default="256,640")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--queries", type=int, default=1000, help="queries for latency and recall")
    ap.add_argument("--flat-queries", type=int, default=100, help="queries timed for exact search")
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--recall-target", type=float, default=0.95)
    ap.add_argument("--pq-m", type=int, help="PQ bytes per vector (default ~d/8)")
    ap.add_argument("--rerank", type=int, default=faiss_index.DEFAULT_RERANK)
    ap.add_argument("--nlist", type=int, help="IVF lists (default ~4 sqrt(n), as cir index)")
    ap.add_argument("--train-sample", type=int, default=100_000)
    ap.add_argument("--build-threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--ram-limit", default=None, help="skip kinds estimated above this (default 60%% of RAM)")
    ap.add_argument("--workdir", default="/tmp/cir-search-scale")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--reuse", action="store_true",
                    help="open the vectors a completed earlier run kept in --workdir (with --keep) instead of "
                         "generating them; the files are kept afterwards")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write one JSON line per result here")
    args = ap.parse_args()
    args.ram_limit = faiss_index.parse_memory(args.ram_limit) if args.ram_limit else int(0.6 * mem_total())
    kinds = [k for k in args.kinds.split(",") if k]
    for k in kinds:
        if k not in KINDS:
            ap.error(f"unknown kind {k!r}; expected some of {', '.join(KINDS)}")
    rows = []
    for n in [int(float(s)) for s in args.sizes.split(",")]:
        for d in [int(s) for s in args.dims.split(",")]:
            work = Path(args.workdir) / f"{n}-{d}"
            work.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            f32, f16 = make_gallery(work, n, d, args.seed, reuse=args.reuse)
            queries = make_queries(f32, args.queries, args.seed)
            faiss.omp_set_num_threads(args.build_threads)
            _, truth = faiss_index.exact_topk(queries, f32, args.k)
            print(f"n={n} d={d}: generated and exact ground truth in {time.perf_counter() - t0:.1f}s", flush=True)
            for kind in kinds:
                row = run_kind(kind, work, f32, f16, queries, truth, args)
                rows.append(row)
                if "skipped" in row:
                    print(f"  {kind:10s} skipped: {row['skipped']}", flush=True)
                else:
                    print(f"  {kind:10s} disk {row['disk_bytes_per_vector']:8.1f} B/vec  resident est "
                          f"{row['resident_est_bytes_per_vector']:8.1f} (measured "
                          f"{row['resident_measured_bytes_per_vector']:7.1f}) B/vec  build {row['build_s']:7.1f}s  "
                          f"p50 {row['p50_ms']:8.3f} ms  p99 {row['p99_ms']:8.3f} ms  "
                          f"recall@10 {row['recall_at_10']:.3f}  {row['params']}", flush=True)
                if args.out:
                    with open(args.out, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
            del f32, f16
            if not args.keep and not args.reuse:
                shutil.rmtree(work, ignore_errors=True)

    print("\n| n | d | kind | disk B/vec | resident B/vec (est.) | build s | p50 ms | p99 ms | recall@10 |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['n']:,} | {r['d']} | {r['kind']} | skipped: {r['skipped']} | | | | | |")
        else:
            print(f"| {r['n']:,} | {r['d']} | {r['kind']} | {r['disk_bytes_per_vector']:.0f} | "
                  f"{r['resident_est_bytes_per_vector']:.0f} | {r['build_s']:.1f} | {r['p50_ms']:.2f} | "
                  f"{r['p99_ms']:.2f} | {r['recall_at_10']:.3f} |")
    print("\n100M extrapolation (disk GB incl. stored vectors, RAM GB resident):")
    for r in rows:
        disk, ram = extrapolate(r)
        print(f"  n=100,000,000 d={r['d']} {r['kind']:10s} disk {disk:7.1f} GB  RAM {ram:7.1f} GB"
              f"  (from n={r['n']:,})")
    for r in rows:
        flat = next((f for f in rows if f["kind"] == "flat" and f["n"] == r["n"] and f["d"] == r["d"]
                     and "p50_ms" in f), None)
        if flat and "p50_ms" in r and r["kind"] != "flat":
            print(f"ratio: {r['p50_ms'] / flat['p50_ms']:.4f}  ({r['kind']} p50 / exact p50, n={r['n']:,} d={r['d']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
