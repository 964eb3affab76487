"""Scaling past one process: gallery embedding throughput under torchrun, and index memory.

1. ``cir index`` launched by ``torchrun --standalone --nproc_per_node P`` (gloo on the CPU) on
   a generated gallery, for each ``PxT`` setting (P processes with T threads each). Throughput
   is images / seconds of the build as rank 0 reports it (hashing, embedding, the shards'
   merge and the index write; process start-up excluded; the wall time with start-up is
   printed too).
2. Bytes per vector of the saved index (``vectors-*.npy`` + ``items-*.json`` + engine file)
   for the exact index (flat) and the approximate engines ``cir index`` builds (IVF-Flat,
   HNSW), at d=256 (tiny encoder) and d=640 (RN50x4), and the same extrapolated to 100M
   images. IVF-PQ is *not* a kind ``cir index`` builds; its FAISS size is measured alongside,
   clearly labelled, as the option for 100M-scale galleries.

    python benchmarks/scale.py                          # 1024 images, settings 1x2 1x1 2x1
    python benchmarks/scale.py --images 4096 --settings 1x16 2x8 8x2 --json scale.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HUNDRED_M = 100_000_000


def write_gallery(folder: Path, n: int, size: int = 160, seed: int = 0) -> None:
    """PNG photos-to-be: noise (keeps decoding honest) with a few filled shapes."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.fromarray(rng.integers(0, 48, (size, size, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(im)
        for _ in range(3):
            x, y = rng.integers(0, size - 32, 2)
            w, h = rng.integers(16, 96, 2)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if i % 2 else draw.rectangle)([int(x), int(y), int(x + w), int(y + h)], fill=colour)
        im.save(folder / f"img{i:07d}.png")


def save_model(folder: Path, embed_dim: int) -> Path:
    """The tiny encoder at its default widths (random weights: speed does not depend on them)."""
    from composed_retrieval.config import load_config
    from composed_retrieval.train.checkpoint import save_method
    from composed_retrieval.train.loop import build_method_from_config, seed_everything

    seed_everything(0)
    method = build_method_from_config(load_config(None, [], {
        "method": "sum", "encoder": "tiny", "encoder_config": {"embed_dim": embed_dim}}))
    return save_method(method, folder)


def run_index(gallery: Path, model: Path, out: Path, procs: int, threads: int, batch_size: int,
              num_workers: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
           "-m", "composed_retrieval", "index", "--gallery", str(gallery), "--model", str(model),
           "--out", str(out), "--batch-size", str(batch_size), "--num-workers", str(num_workers),
           "--kind", "flat", "--quiet"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"torchrun failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    m = re.search(r"index \S+: (\d+) images .*?, ([0-9.]+)s", done.stdout)
    if not m:
        raise SystemExit(f"unexpected output: {done.stdout[-500:]}")
    count, seconds = int(m.group(1)), float(m.group(2))
    return {"processes": procs, "threads_per_process": threads, "images": count,
            "build_seconds": seconds, "images_per_second": round(count / seconds, 1),
            "wall_seconds_with_startup": round(wall, 2)}


def _saved_sizes(v: np.ndarray, workdir: Path, tag: str, train: np.ndarray, nlist: int) -> dict[str, dict[str, int]]:
    """Bytes of each file of the index kinds ``cir index`` writes, plus a FAISS IVF-PQ file
    (trained on ``train``; the same ``nlist`` at every size, so only per-vector bytes differ)."""
    import faiss

    from composed_retrieval.index import faiss_index
    from composed_retrieval.index.store import write_index

    n, dim = v.shape
    # names as a real gallery has them: nested relative paths + a sha256 each
    items = [{"name": f"images/{i // 10_000:04d}/{i:09d}.jpg", "sha256": f"{i:064x}"} for i in range(n)]
    out: dict[str, dict[str, int]] = {}
    for kind in ("flat", "ivf", "hnsw"):
        folder = workdir / f"{kind}-{dim}-{tag}"
        writer = None
        if kind != "flat":
            engine = faiss_index.build_engine(v, kind, {"nlist": nlist, "nprobe": 1} if kind == "ivf" else None)
            writer = lambda p, e=engine: faiss_index.save_engine(e, p)  # noqa: E731
        write_index(folder, v, items, {"kind": kind}, writer)
        meta = json.loads((folder / "index.json").read_text())
        out[kind] = {role: (folder / name).stat().st_size for role, name in meta["files"].items()}
    # IVF-PQ (not a kind `cir index` builds): 64 sub-quantisers x 8 bits, int64 ids
    pq = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, 64, 8, faiss.METRIC_INNER_PRODUCT)
    pq.train(train)
    pq.add(v)
    path = workdir / f"ivfpq-{dim}-{tag}.faiss"
    faiss.write_index(pq, str(path))
    out["ivfpq64"] = {"engine": path.stat().st_size}
    return out


def index_bytes(n: int, dim: int, workdir: Path, seed: int = 0) -> dict:
    """Marginal bytes per vector of each saved index kind: sizes at ``n`` and ``n/2`` vectors,
    difference / (n/2), so fixed parts (centroids, codebooks, headers) do not inflate it."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    nlist = max(1, n // 2 // 64)   # >= 64 training points per list at both sizes
    full = _saved_sizes(v, workdir, "full", v, nlist)
    half = _saved_sizes(v[: n // 2], workdir, "half", v, nlist)
    out: dict = {"dim": dim, "n": n, "bytes_per_vector": {}}
    for kind, files in full.items():
        per = {role: round((b - half[kind][role]) / (n - n // 2), 1) for role, b in files.items()}
        per["total"] = round(sum(per.values()), 1)
        out["bytes_per_vector"][kind] = per
    return out


def extrapolate(per_vector: dict, dim: int) -> dict:
    """GB for 100M images: marginal bytes x 1e8, plus IVF's centroid table (nlist = 4 sqrt(N))."""
    from composed_retrieval.index import faiss_index

    nlist = faiss_index.default_params("ivf", HUNDRED_M)["nlist"]
    centroids = nlist * dim * 4
    b = per_vector["bytes_per_vector"]
    gb = lambda x: round(x / 1e9, 1)  # noqa: E731
    return {"flat_total_GB": gb(b["flat"]["total"] * HUNDRED_M),
            "flat_vectors_only_GB": gb(b["flat"]["vectors"] * HUNDRED_M),
            "ivf_flat_total_GB": gb(b["ivf"]["total"] * HUNDRED_M + centroids),
            "hnsw_total_GB": gb(b["hnsw"]["total"] * HUNDRED_M),
            "ivfpq64_engine_GB": gb(b["ivfpq64"]["engine"] * HUNDRED_M + centroids),
            "ivf_nlist_at_100M": nlist}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--settings", nargs="+", default=["1x2", "1x1", "2x1"],
                    help="PxT: P processes with T threads each")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-workers", type=int, default=0, help="decoding workers per process")
    ap.add_argument("--repeats", type=int, default=2, help="runs per setting; the fastest is kept")
    ap.add_argument("--vectors", type=int, default=10_000,
                    help="vectors for the memory measurement (>= 9984: IVF-PQ codebook training)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    results: dict = {"cpus": len(os.sched_getaffinity(0)), "load_average_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_gallery(tmp / "gallery", args.images)
        model = save_model(tmp / "model", 256)
        runs = []
        for setting in args.settings:
            procs, threads = (int(x) for x in setting.split("x"))
            best = None
            for r in range(args.repeats):
                res = run_index(tmp / "gallery", model, tmp / f"idx-{setting}-{r}", procs, threads,
                                args.batch_size, args.num_workers)
                best = res if best is None or res["build_seconds"] < best["build_seconds"] else best
            print(json.dumps(best), flush=True)
            runs.append(best)
        results["embedding"] = runs
        results["memory"] = []
        for dim in (256, 640):
            per = index_bytes(args.vectors, dim, tmp)
            per["for_100M_images"] = extrapolate(per, dim)
            print(json.dumps(per), flush=True)
            results["memory"].append(per)
    results["load_average_after"] = os.getloadavg()[0]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
