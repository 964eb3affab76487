"""Search past one machine's RAM: the memory budget's choice of engine and PQ code, IVF-PQ builds
and exact re-ranking, memory-mapped search equal to in-RAM search, a build SIGKILLed while
filling its engine resuming without training again, and `cir serve --workers 2` over one index
with Prometheus metrics summed over the workers."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from composed_retrieval.errors import ConfigError
from composed_retrieval.fileio import sha256_file
from composed_retrieval.index import faiss_index
from composed_retrieval.index.build import build_index
from composed_retrieval.index.search import GalleryIndex, Searcher
from composed_retrieval.index.store import read_index

from test_index import make_gallery, saved_model

ROOT = Path(__file__).resolve().parents[1]


def _quiet(**kw):
    return dict(progress=False, num_workers=0, log=lambda s: None, **kw)


def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(n // 100, 4), d)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.4 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_memory_budget_picks_the_engine_and_the_largest_pq_code_that_fits():
    assert faiss_index.parse_memory("4G") == 4 * 2**30 and faiss_index.parse_memory("1.5GiB") == int(1.5 * 2**30)
    with pytest.raises(ConfigError, match="--max-memory must be a size"):
        faiss_index.parse_memory("four gigs")
    assert faiss_index.plan(10_000, 256, "auto", 2**30)[0] == "flat"          # fits: exact search
    n, d, budget = 10_000_000, 640, int(1.5 * 2**30)
    kind, params = faiss_index.plan(n, d, "auto", budget)
    assert kind in faiss_index.PQ_KINDS
    assert faiss_index.sizes(kind, n, d, params)["resident"] <= budget
    bigger = [m for m in faiss_index.pq_sizes(d) if m > params["m"]]
    assert bigger and faiss_index.sizes(kind, n, d, {**params, "m": min(bigger)})["resident"] > budget
    assert faiss_index.plan(n, d, "auto", 64 * 2**30)[0] == "ivf"             # IVF-Flat fits in 64 GiB
    assert faiss_index.plan(n, d, "auto", 2**29) == ("opq-ivfpq", faiss_index.plan(n, d, "auto", 2**29)[1])
    assert faiss_index.plan(n, d, "auto", 2**29)[1]["m"] == 32              # 20 dimensions a byte: rotate
    with pytest.raises(ConfigError, match="above --max-memory"):
        faiss_index.plan(n, d, "auto", 2**20)


def test_ivfpq_engine_compresses_and_reranking_recovers_recall(tmp_path):
    x = clustered(3000, 32)
    engine = faiss_index.build_engine(x, "ivfpq", {"nlist": 8, "nprobe": 8, "m": 4})
    faiss_index.save_engine(engine, tmp_path / "e.faiss")
    assert (tmp_path / "e.faiss").stat().st_size / 3000 < 32 * 4 / 3        # vs 128 bytes of float32
    x16 = x.astype(np.float16)
    plain = faiss_index.recall_at_k(engine, x, sample=300)
    reranked = faiss_index.recall_at_k(lambda q, k: faiss_index.search_reranked(engine, x16, q, k, 100),
                                       x, sample=300)
    assert reranked > plain and reranked >= 0.95, (plain, reranked)


def test_ivfpq_index_build_stores_float16_and_searches_like_exact(tmp_path):
    gallery = tmp_path / "gallery"
    names = make_gallery(gallery, n=40)
    model, _ = saved_model(tmp_path / "model")
    logs: list[str] = []
    report = build_index(tmp_path / "pq", gallery, model, kind="ivfpq", progress=False, num_workers=0,
                         log=logs.append)
    data = read_index(tmp_path / "pq")
    assert report.kind == data.kind == "ivfpq" and data.vectors.dtype == np.float16
    assert data.meta["params"]["rerank"] == faiss_index.DEFAULT_RERANK and data.engine_path.is_file()
    assert report.recall_at_10 is not None and any("recall@10" in line for line in logs)
    build_index(tmp_path / "flat", gallery, model, **_quiet())
    a, b = Searcher.open(tmp_path / "pq"), Searcher.open(tmp_path / "flat")
    for ref in names[:3]:    # every list probed and re-ranked from float16: the exact order up to
        hits_a = a.search(a.reference(ref), "add a square", 5)        # float16 near-ties
        hits_b = b.search(b.reference(ref), "add a square", 10)
        exact = {h.name: h.score for h in hits_b}
        for got, want in zip(hits_a, hits_b):
            assert got.name == want.name or (got.name in exact and abs(exact[got.name] - want.score) < 2e-3), \
                (ref, [h.name for h in hits_a], [h.name for h in hits_b[:5]])
        np.testing.assert_allclose([h.score for h in hits_a], [h.score for h in hits_b[:5]], atol=2e-3)


@pytest.mark.parametrize("kind", ["ivfpq", "flat"])
def test_memory_mapped_search_equals_in_ram_search(tmp_path, kind):
    gallery = tmp_path / "gallery"
    make_gallery(gallery, n=40)
    model, _ = saved_model(tmp_path / "model")
    build_index(tmp_path / "idx", gallery, model, kind=kind, **_quiet())
    mapped, loaded = GalleryIndex.open(tmp_path / "idx"), GalleryIndex.open(tmp_path / "idx", mmap=False)
    assert isinstance(mapped.data.vectors, np.memmap) and not isinstance(loaded.data.vectors, np.memmap)
    if kind == "ivfpq":
        lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(mapped.engine).invlists)
        assert type(lists).__name__ == "OnDiskInvertedLists"      # codes read from the mapped file
    queries = clustered(8, mapped.dim, seed=5)
    for a, b in zip(mapped.search(queries, 10), loaded.search(queries, 10)):
        assert [(h.name, h.score) for h in a] == [(h.name, h.score) for h in b]


CHILD = """
import os, signal, sys
from composed_retrieval.index import faiss_index
from composed_retrieval.cli import main
faiss_index.ADD_CHUNK = 8
real = faiss_index._add_chunk
calls = []
def add_then_die(index, block):
    calls.append(1)
    if len(calls) == 3:                  # trained, two chunks added, then killed
        os.kill(os.getpid(), signal.SIGKILL)
    real(index, block)
faiss_index._add_chunk = add_then_die
main({argv!r})
"""


def test_build_sigkilled_while_adding_resumes_without_training_again(tmp_path):
    gallery = tmp_path / "gallery"
    make_gallery(gallery, n=40)
    model, _ = saved_model(tmp_path / "model")
    argv = ["index", "--gallery", str(gallery), "--model", str(model), "--out", str(tmp_path / "idx"),
            "--kind", "ivfpq", "--quiet", "--num-workers", "0", "--chunk-size", "16"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-c", CHILD.format(argv=argv)], env=env, capture_output=True,
                           text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert (tmp_path / "idx" / "partial" / "trained.faiss").is_file()
    assert not (tmp_path / "idx" / "index.json").exists()

    logs: list[str] = []
    report = build_index(tmp_path / "idx", gallery, model, kind="ivfpq", progress=False, num_workers=0,
                         log=logs.append)
    assert report.embedded == 0 and report.reused == 40
    assert any("reusing the engine trained" in line for line in logs)
    assert not (tmp_path / "idx" / "partial").exists()
    threads = torch.get_num_threads()
    # embedded as the child did (one thread, 16-image chunks): a GEMM of another shape or split
    # over 2 threads can round the last bit differently on some CPUs (seen on an AMD EPYC)
    torch.set_num_threads(1)
    try:
        build_index(tmp_path / "clean", gallery, model, kind="ivfpq", chunk_size=16, **_quiet())
    finally:
        torch.set_num_threads(threads)
    a, b = read_index(tmp_path / "idx"), read_index(tmp_path / "clean")
    np.testing.assert_array_equal(a.vectors, b.vectors)
    assert sha256_file(a.engine_path) == sha256_file(b.engine_path)      # the same engine, byte for byte


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


@pytest.mark.slow
def test_serve_with_two_workers_shares_the_index_and_sums_metrics(tmp_path):
    gallery = tmp_path / "gallery"
    names = make_gallery(gallery, n=10)
    model, _ = saved_model(tmp_path / "model")
    build_index(tmp_path / "idx", gallery, model, **_quiet())
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "composed_retrieval", "serve", "--index", str(tmp_path / "idx"),
                               "--port", str(port), "--workers", "2"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=5) as r:
                    assert r.status == 200
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "server did not start"
                time.sleep(0.5)
        time.sleep(1.0)   # the second worker may answer a moment after the first
        import httpx
        for i in range(6):
            r = httpx.post(base + "/search", data={"text": "make it red", "k": "3", "name": names[i]}, timeout=60)
            assert r.status_code == 200, r.text
        assert len(_children(server.pid)) >= 2
        text = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
        total = sum(float(v) for v in re.findall(
            r'cir_http_requests_total\{method="POST",route="/search",status="200"\} ([0-9.e+]+)', text))
        assert total == 6.0, text[:2000]
        assert "cir_http_request_seconds_bucket" in text and "cir_http_requests_queued" in text
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_cli_max_memory_picks_a_pq_index_and_add_keeps_it(tmp_path, capsys):
    from composed_retrieval.cli import main
    from test_index import write_image
    gallery = tmp_path / "gallery"
    make_gallery(gallery, n=40)
    model, _ = saved_model(tmp_path / "model")
    base = ["--quiet", "--num-workers", "0"]
    with pytest.raises(SystemExit) as exit_:
        main(["index", "--gallery", str(gallery), "--model", str(model), "--out", str(tmp_path / "bad"),
              "--max-memory", "lots"] + base)
    assert exit_.value.code == 2
    assert "--max-memory must be a size" in capsys.readouterr().err
    budget = 40 * 32 * 4 - 100                    # just below what exact search needs
    assert main(["index", "--gallery", str(gallery), "--model", str(model), "--out", str(tmp_path / "idx"),
                 "--max-memory", str(budget)] + base) == 0
    expected_kind, expected = faiss_index.plan(40, 32, "auto", budget)
    data = read_index(tmp_path / "idx")
    assert data.kind == expected_kind and data.kind in faiss_index.PQ_KINDS
    assert data.meta["params"]["m"] == expected["m"] and data.meta["max_memory"] == budget
    assert "recall@10 vs exact" in capsys.readouterr().out
    write_image(gallery / "new.png", seed=77)
    assert main(["index", "--add", "--out", str(tmp_path / "idx")] + base) == 0
    after = read_index(tmp_path / "idx")
    assert len(after.names) == 41 and after.kind == data.kind and after.meta["params"]["m"] == expected["m"]


def test_search_scale_benchmark_streams_exact_search_and_reuses_its_vectors(tmp_path: Path) -> None:
    """benchmarks/search_scale.py: a kind over --ram-limit is skipped with its estimate, but exact
    search is not (it streams the mapped file: 10 timed queries); --keep then --reuse opens the
    same vectors files instead of writing them again and measures the same recall."""
    def run(*extra: str) -> list[dict]:
        out = tmp_path / f"rows{len(list(tmp_path.glob('rows*')))}.jsonl"
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "search_scale.py"), "--sizes", "3000",
                               "--dims", "16", "--kinds", "flat,ivfpq", "--queries", "40", "--build-threads", "1",
                               "--ram-limit", "10K", "--workdir", str(tmp_path / "work"), "--out", str(out), *extra],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return [json.loads(line) for line in out.read_text().splitlines()]

    first = run("--keep")
    flat, pq = first
    assert flat["kind"] == "flat" and "skipped" not in flat and flat["queries_timed"] == 10
    assert flat["recall_at_10"] == 1.0 and "from disk" in flat["note"]
    assert pq["kind"] == "ivfpq" and "above --ram-limit" in pq["skipped"]
    vectors = tmp_path / "work" / "3000-16" / "vectors-3000-16.npy"
    before = vectors.stat()
    again = run("--reuse")
    after = vectors.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)   # opened, not rewritten
    assert again[0]["recall_at_10"] == 1.0 and again[0]["queries_timed"] == 10
    (vectors.parent / "vectors-3000-16.done").write_text("{}")      # another generation's marker: regenerate
    run("--reuse")
    assert vectors.stat().st_mtime_ns != before.st_mtime_ns


def test_index_build_warns_when_the_recall_target_is_out_of_reach(tmp_path):
    # the nprobe ladder stops at every list; PQ codes without re-ranking cannot reach 1.0, and
    # the build must say so in one line instead of printing the recall as if it were the target
    gallery = tmp_path / "gallery"
    make_gallery(gallery, n=40)
    model, _ = saved_model(tmp_path / "model")
    logs: list[str] = []
    build_index(tmp_path / "pq", gallery, model, kind="ivfpq", params={"rerank": 0, "m": 2}, recall_target=1.0,
                progress=False, num_workers=0, log=logs.append)
    warnings = [line for line in logs if line.startswith("warning: recall@10")]
    assert len(warnings) == 1 and "below --recall-target 1" in warnings[0] and "nprobe" in warnings[0], logs
    logs.clear()
    build_index(tmp_path / "pq2", gallery, model, kind="ivfpq", progress=False, num_workers=0, log=logs.append)
    assert not [line for line in logs if line.startswith("warning")], logs
