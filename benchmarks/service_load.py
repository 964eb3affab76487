"""Load test of `cir serve` on loopback: throughput, latency, failures and the server's peak memory.

Builds (once, under --work) a small synthetic gallery, a tiny untrained model and its index, starts
the real `cir serve` as a subprocess on 127.0.0.1, then runs many concurrent clients (threads with
httpx) for a bounded time and request count. Half the queries name a gallery image, half upload
one. Prints one JSON object: requests/s, p50/p99 latency, failed requests (anything but 200,
including 429/503 from the service's own limits) and the server's peak RSS sampled from
/proc/<pid>/status while the load runs.

    .venv/bin/python benchmarks/service_load.py --clients 16 --seconds 20 --max-requests 5000
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"   # loopback only


def prepare(work: Path, n_images: int) -> tuple[Path, list[str], list[bytes]]:
    """Gallery of synthetic scenes + a tiny saved model + its index (reused when present)."""
    import torch

    from composed_retrieval.encoders.tiny import TinyEncoder
    from composed_retrieval.index.build import build_index
    from composed_retrieval.methods.baselines import Sum
    from composed_retrieval.synth.writer import write_synth
    from composed_retrieval.train.checkpoint import save_method

    idx = work / "index"
    synth = work / "synth"
    if not (synth / "synth.json").is_file():
        write_synth(synth, seed=0, size="tiny", workers=1)
    images = sorted((synth / "dev").glob("*.png")) + sorted((synth / "train").glob("*.png"))
    images = images[:n_images]
    gallery = work / "gallery"
    if not gallery.is_dir():
        gallery.mkdir(parents=True)
        for p in images:
            (gallery / p.name).write_bytes(p.read_bytes())
    names = sorted(p.name for p in gallery.glob("*.png"))
    if not (idx / "index.json").is_file():
        torch.manual_seed(0)
        method = Sum(TinyEncoder(embed_dim=32, image_width=16, text_width=32), {}).eval()
        save_method(method, work / "model")
        build_index(idx, gallery, work / "model", method=method, progress=False, num_workers=0,
                    log=lambda s: None)
    uploads = [(gallery / n).read_bytes() for n in names[:8]]
    return idx, names, uploads


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def start_server(idx: Path, port: int, args: argparse.Namespace) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    cmd = [sys.executable, "-m", "composed_retrieval", "serve", "--index", str(idx), "--host", HOST,
           "--port", str(port), "--max-concurrent", str(args.max_concurrent),
           "--max-queued", str(args.max_queued), "--request-timeout", str(args.request_timeout)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t_end = time.time() + 120
    while time.time() < t_end:
        if proc.poll() is not None:
            raise SystemExit(f"cir serve exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://{HOST}:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("cir serve did not come up in 120 s")


def run_load(port: int, names: list[str], uploads: list[bytes], clients: int, seconds: float,
             max_requests: int, seed: int) -> dict:
    url = f"http://{HOST}:{port}/search"
    latencies: list[float] = []
    failures: dict[str, int] = {}
    lock = threading.Lock()
    budget = {"left": max_requests}
    stop_at = time.perf_counter() + seconds
    texts = ["add a red circle", "make the square blue", "remove the triangle", "change the size to large"]

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        with httpx.Client(timeout=60) as c:
            while time.perf_counter() < stop_at:
                with lock:
                    if budget["left"] <= 0:
                        return
                    budget["left"] -= 1
                data = {"text": rng.choice(texts), "k": "10"}
                files = None
                if rng.random() < 0.5:
                    data["name"] = rng.choice(names)
                else:
                    files = {"image": ("q.png", rng.choice(uploads), "image/png")}
                t0 = time.perf_counter()
                try:
                    r = c.post(url, data=data, files=files)
                    key = None if r.status_code == 200 and len(r.json()["results"]) == 10 else str(r.status_code)
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    if key:
                        failures[key] = failures.get(key, 0) + 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    pct = lambda q: round(1000 * lat[min(len(lat) - 1, int(q * len(lat)))], 1) if lat else None  # noqa: E731
    return {"requests": len(lat), "seconds": round(wall, 2), "requests_per_s": round(len(lat) / wall, 1),
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": round(1000 * lat[-1], 1) if lat else None,
            "failed": sum(failures.values()), "failures": failures}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/service_load", help="folder for the gallery, model and index")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--max-requests", type=int, default=5000)
    ap.add_argument("--max-concurrent", type=int, default=8)
    ap.add_argument("--max-queued", type=int, default=64)
    ap.add_argument("--request-timeout", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    idx, names, uploads = prepare(Path(args.work), args.images)
    port = free_port()
    server = start_server(idx, port, args)
    peak = {"rss": rss_kib(server.pid)}
    idle_rss = peak["rss"]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            peak["rss"] = max(peak["rss"], rss_kib(server.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = run_load(port, names, uploads, args.clients, args.seconds, args.max_requests, args.seed)
    finally:
        sampling.set()
        sampler.join()
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
    result.update({"gallery_images": len(names), "clients": args.clients,
                   "limits": {"max_concurrent": args.max_concurrent, "max_queued": args.max_queued,
                              "request_timeout_s": args.request_timeout},
                   "server_rss_idle_mib": round(idle_rss / 1024, 1),
                   "server_rss_peak_mib": round(peak["rss"] / 1024, 1), "cpus": os.cpu_count()})
    print(json.dumps(result, indent=2))
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
