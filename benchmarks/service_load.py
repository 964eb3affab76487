"""Load test of `cir serve` on loopback: throughput, latency, failures and the server's peak memory,
and whether slow clients and decode-heavy uploads can starve the page or a normal search.

Builds (once, under --work) a small synthetic gallery, a tiny untrained model and its index, starts
the real `cir serve` as a subprocess on 127.0.0.1, then runs two phases, each for a bounded time:

- ``throughput``: many concurrent clients (threads with httpx), half naming a gallery image, half
  uploading one: requests/s, p50/p99 latency, failed requests (anything but 200, including
  429/503 from the service's own limits).
- ``abuse``: two probes (``GET /`` and a normal search by gallery name, one request at a time)
  first alone (the baseline), then while ``--slow-clients`` sockets trickle one byte per
  ``--trickle-s`` (half of them their headers, half a search body) and ``--decode-clients``
  upload a ``--big-side`` square PNG (6300: ~40 Mpx, under the default pixel limit, a small file)
  as fast as they are answered. Reports the probes' p50/p99 in both, what the attackers got
  (408s, 503 "busy decoding") and the server's peak RSS against ``--rss-bound-mib`` (default:
  idle RSS + the decode budget + 256 MiB). Exit 1 when a probe failed or the bound was passed.

- ``burst``: ``--decode-clients`` upload the big PNG at once, each once (retrying a 503 after
  0.2 s, bounded): the answers, the time and the peak RSS (the issue's "8 uploads of a 6300x6300
  PNG took the server from 1.0 to 6.5 GB").

RSS is sampled from /proc/<pid>/status every 50 ms. Loopback only; every loop is bounded by time.

    .venv/bin/python benchmarks/service_load.py --clients 16 --seconds 20 --max-requests 5000
    .venv/bin/python benchmarks/service_load.py --phases abuse --seconds 20   # slow clients + big uploads
    .venv/bin/python benchmarks/service_load.py --phases burst --decode-clients 8            # 8 big uploads at once
    .venv/bin/python benchmarks/service_load.py --seconds 3 --slow-clients 8 --decode-clients 2  # a quick check
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


def big_png(work: Path, side: int) -> bytes:
    """A ``side`` x ``side`` PNG that compresses to little (flat shapes; ~170 kB at 6300)."""
    path = work / f"big_{side}.png"
    if not path.is_file():
        import numpy as np
        from PIL import Image
        rng = np.random.default_rng(0)
        im = Image.new("RGB", (side, side), (235, 235, 235))
        for _ in range(40):
            x0, y0 = (int(v) for v in rng.integers(0, side * 3 // 4, 2))
            w, h = (int(v) for v in rng.integers(side // 20, side // 4, 2))
            im.paste(tuple(int(c) for c in rng.integers(0, 255, 3)), (x0, y0, x0 + w, y0 + h))
        im.save(path, "PNG")
    return path.read_bytes()


def start_server(idx: Path, port: int, args: argparse.Namespace) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    cmd = [sys.executable, "-m", "composed_retrieval", "serve", "--index", str(idx), "--host", HOST,
           "--port", str(port), "--max-concurrent", str(args.max_concurrent),
           "--max-queued", str(args.max_queued), "--request-timeout", str(args.request_timeout),
           "--header-timeout", str(args.header_timeout), "--body-timeout", str(args.body_timeout),
           "--decode-memory-mb", str(args.decode_memory_mb)]
    # The server's log goes to a file: a pipe nobody reads fills after 64 KiB of uvicorn warnings
    # (every slow client logs one) and then blocks the server, which is what stalled earlier runs.
    log_path = Path(args.work) / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    t_end = time.time() + 120
    while time.time() < t_end:
        if proc.poll() is not None:
            raise SystemExit(f"cir serve exited: {log_path.read_text(errors='replace')[-2000:]}")
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
    return {"requests": len(lat), "seconds": round(wall, 2), "requests_per_s": round(len(lat) / wall, 1),
            "p50_ms": pct(lat, 0.50), "p99_ms": pct(lat, 0.99), "max_ms": round(1000 * lat[-1], 1) if lat else None,
            "failed": sum(failures.values()), "failures": failures}


def pct(sorted_s: list[float], q: float) -> float | None:
    return round(1000 * sorted_s[min(len(sorted_s) - 1, int(q * len(sorted_s)))], 1) if sorted_s else None


# ---- abuse phase -------------------------------------------------------------------------------
def probe(port: int, names: list[str], seconds: float) -> dict:
    """GET / and a normal search, one at a time each, for ``seconds``: their latencies and failures."""
    base = f"http://{HOST}:{port}"
    stop_at = time.perf_counter() + seconds
    out = {"page": ([], {}), "search": ([], {})}

    def loop(kind: str) -> None:
        lat, fail = out[kind]
        rng = random.Random(kind)
        with httpx.Client(base_url=base, timeout=60) as c:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    if kind == "page":
                        r = c.get("/")
                        ok = r.status_code == 200
                    else:
                        r = c.post("/search", data={"text": "add a red circle", "k": "10", "name": rng.choice(names)})
                        ok = r.status_code == 200 and len(r.json()["results"]) == 10
                    key = None if ok else str(r.status_code)
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                lat.append(time.perf_counter() - t0)
                if key:
                    fail[key] = fail.get(key, 0) + 1
                time.sleep(0.02)

    threads = [threading.Thread(target=loop, args=(k,)) for k in out]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result = {}
    for kind, (lat, fail) in out.items():
        lat = sorted(lat)
        result[kind] = {"requests": len(lat), "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99),
                        "failed": sum(fail.values()), "failures": fail}
    return result


def trickler(port: int, i: int, stop: threading.Event, gap_s: float, tally: dict, lock: threading.Lock) -> None:
    """A slow client: its headers (even i) or a search body (odd i), one byte per ``gap_s``;
    reconnects when the server closes, until ``stop``."""
    if i % 2 == 0:
        head, tail = b"GET / HTTP/1.1\r\nHo", b"st: 127.0.0.1\r\nX-Slow: " + b"a" * 100_000
    else:
        head = (b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                b"Content-Length: 100000\r\n\r\n")
        tail = b"-" * 100_000
    while not stop.is_set():
        try:
            with socket.create_connection((HOST, port), timeout=5) as sock:
                sock.sendall(head)
                sock.settimeout(gap_s)
                answer = b""
                for k in range(len(tail)):
                    if stop.is_set():
                        break
                    try:
                        sock.sendall(tail[k:k + 1])
                        answer = sock.recv(256)
                    except socket.timeout:
                        continue
                    break                                 # answered or closed
                key = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "closed"
        except OSError as exc:
            key = type(exc).__name__
        if stop.is_set():
            return
        with lock:
            tally[key] = tally.get(key, 0) + 1


def decoder(port: int, data: bytes, stop: threading.Event, tally: dict, lat: list, lock: threading.Lock) -> None:
    """Uploads a big PNG as a reference as fast as answers come, until ``stop``."""
    with httpx.Client(timeout=120) as c:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                r = c.post(f"http://{HOST}:{port}/search", data={"text": "make it red", "k": "10"},
                           files={"image": ("big.png", data, "image/png")})
                key = str(r.status_code)
            except httpx.HTTPError as exc:
                key = type(exc).__name__
            with lock:
                tally[key] = tally.get(key, 0) + 1
                if key == "200":
                    lat.append(time.perf_counter() - t0)
            if key != "200":
                time.sleep(0.2)                           # what Retry-After asks


def run_burst(port: int, big: bytes, clients: int) -> dict:
    codes: list[str] = []
    retries = [0]
    lock = threading.Lock()

    def one() -> None:
        key = "none"
        with httpx.Client(timeout=600) as c:
            for _ in range(600):                          # bounded: 600 tries x 0.2 s at most
                try:
                    r = c.post(f"http://{HOST}:{port}/search", data={"text": "make it red", "k": "10"},
                               files={"image": ("big.png", big, "image/png")})
                    key = str(r.status_code)
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                if key != "503":
                    break
                with lock:
                    retries[0] += 1
                time.sleep(0.2)
        with lock:
            codes.append(key)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"uploads": clients, "answers": {k: codes.count(k) for k in sorted(set(codes))},
            "retried_503": retries[0], "seconds": round(time.perf_counter() - t0, 1)}


def run_abuse(port: int, names: list[str], big: bytes, args: argparse.Namespace, phase: dict) -> dict:
    phase["name"] = "baseline"
    baseline = probe(port, names, args.seconds)
    stop, lock = threading.Event(), threading.Lock()
    slow_tally: dict = {}
    decode_tally: dict = {}
    decode_lat: list[float] = []
    attackers = [threading.Thread(target=trickler, args=(port, i, stop, args.trickle_s, slow_tally, lock), daemon=True)
                 for i in range(args.slow_clients)]
    attackers += [threading.Thread(target=decoder, args=(port, big, stop, decode_tally, decode_lat, lock), daemon=True)
                  for _ in range(args.decode_clients)]
    for t in attackers:
        t.start()
    time.sleep(min(2.0, args.seconds / 4))               # let them take hold
    phase["name"] = "abuse"
    health = {}

    def snapshot() -> None:
        time.sleep(args.seconds / 2)
        try:
            health.update(httpx.get(f"http://{HOST}:{port}/healthz", timeout=30).json())
        except httpx.HTTPError as exc:
            health["error"] = type(exc).__name__
    snap = threading.Thread(target=snapshot)
    snap.start()
    attacked = probe(port, names, args.seconds)
    snap.join()
    phase["name"] = "drain"
    stop.set()
    for t in attackers:
        t.join(args.trickle_s + 130)
    decode_lat.sort()
    ratio = {k: round(attacked[k]["p99_ms"] / baseline[k]["p99_ms"], 2)
             if attacked[k]["p99_ms"] and baseline[k]["p99_ms"] else None for k in baseline}
    return {"baseline": baseline, "under_abuse": attacked, "p99_ratio": ratio,
            "slow_clients": {"count": args.slow_clients, "trickle_s": args.trickle_s, "answers": slow_tally},
            "decode_clients": {"count": args.decode_clients, "image": f"{args.big_side}x{args.big_side} PNG",
                               "bytes": len(big), "answers": decode_tally, "p50_ms": pct(decode_lat, 0.5)},
            "healthz_mid_abuse": {k: health.get(k) for k in ("status", "search", "decode") if k in health}}


def report(name: str, value: dict, started: float) -> None:
    """One line per phase as it ends, so a cut run still shows what it measured."""
    print(f"[{time.perf_counter() - started:6.1f} s] {name}: {json.dumps(value)}", flush=True)


def watchdog(deadline_s: float, phase: dict, server: subprocess.Popen) -> None:
    """Ends the run (exit 3, server killed) when the phases overrun ``deadline_s`` in all."""
    time.sleep(deadline_s)
    print(f"deadline of {deadline_s:.0f} s passed during phase {phase['name']!r}; stopping", flush=True)
    server.kill()
    os._exit(3)


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
    ap.add_argument("--header-timeout", type=float, default=10.0)
    ap.add_argument("--body-timeout", type=float, default=30.0)
    ap.add_argument("--decode-memory-mb", type=float, default=512.0)
    ap.add_argument("--phases", default="throughput,abuse,burst", help="comma-separated: throughput, abuse, burst")
    ap.add_argument("--slow-clients", type=int, default=80, help="abuse: sockets trickling bytes")
    ap.add_argument("--trickle-s", type=float, default=1.0, help="abuse: seconds between a slow client's bytes")
    ap.add_argument("--decode-clients", type=int, default=8, help="abuse: clients uploading a big PNG")
    ap.add_argument("--big-side", type=int, default=6300, help="abuse: side of the big square PNG")
    ap.add_argument("--rss-bound-mib", type=float, default=None,
                    help="abuse: peak RSS allowed (default: idle + decode budget + 256 MiB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds for all phases before the run is stopped (default: 6 x --seconds per "
                         "phase + 180)")
    args = ap.parse_args()
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if not phases or set(phases) - {"throughput", "abuse", "burst"}:
        raise SystemExit(f"--phases: expected some of throughput, abuse, burst; got {args.phases!r}")

    work = Path(args.work)
    idx, names, uploads = prepare(work, args.images)
    big = big_png(work, args.big_side) if {"abuse", "burst"} & set(phases) else b""
    port = free_port()
    server = start_server(idx, port, args)
    idle_rss = rss_kib(server.pid)
    phase = {"name": "throughput"}
    peaks: dict[str, int] = {}
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            name = phase["name"]
            peaks[name] = max(peaks.get(name, 0), rss_kib(server.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    deadline = args.deadline or 6 * args.seconds * len(phases) + 180
    threading.Thread(target=watchdog, args=(deadline, phase, server), daemon=True).start()
    print(f"server up (idle RSS {idle_rss / 1024:.0f} MiB); phases {phases}, deadline {deadline:.0f} s",
          flush=True)
    result: dict = {"gallery_images": len(names), "cpus": os.cpu_count(),
                    "limits": {"max_concurrent": args.max_concurrent, "max_queued": args.max_queued,
                               "request_timeout_s": args.request_timeout, "header_timeout_s": args.header_timeout,
                               "body_timeout_s": args.body_timeout, "decode_memory_mb": args.decode_memory_mb},
                    "server_rss_idle_mib": round(idle_rss / 1024, 1)}
    ok = True
    try:
        if "throughput" in phases:
            phase["name"] = "throughput"
            load = run_load(port, names, uploads, args.clients, args.seconds, args.max_requests, args.seed)
            load["clients"] = args.clients
            result["throughput"] = load
            report("throughput", load, started)
            ok &= load["failed"] == 0
        if "abuse" in phases:
            result["abuse"] = run_abuse(port, names, big, args, phase)
            report("abuse", result["abuse"], started)
            ok &= all(result["abuse"][k][p]["failed"] == 0 for k in ("baseline", "under_abuse")
                      for p in ("page", "search"))
        if "burst" in phases:
            phase["name"] = "burst"
            result["burst"] = run_burst(port, big, args.decode_clients)
            report("burst", result["burst"], started)
            ok &= set(result["burst"]["answers"]) == {"200"}
    finally:
        sampling.set()
        sampler.join()
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
    result["server_rss_peak_mib"] = {k: round(v / 1024, 1) for k, v in peaks.items()}
    bound = args.rss_bound_mib or idle_rss / 1024 + args.decode_memory_mb + 256
    for name, sampled in (("abuse", ("abuse", "drain")), ("burst", ("burst",))):
        if name in phases:
            peak = max(peaks.get(k, 0) for k in sampled) / 1024
            result[name]["rss"] = {"peak_mib": round(peak, 1), "bound_mib": round(bound, 1), "within": peak <= bound}
            ok &= peak <= bound
    print(json.dumps(result, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
