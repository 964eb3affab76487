"""The Qdrant backend in embedded local mode (no server): `cir index --backend qdrant` gives the
same top-10 as an exact FAISS index of the same images, resumes after a SIGKILL without
re-embedding what the collection already holds, `--add` embeds only new or changed files and
drops the points of changed or deleted ones, and the HTTP service answers from it unchanged."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from composed_retrieval.cli import main
from composed_retrieval.index import qdrant_index
from composed_retrieval.index.build import build_index
from composed_retrieval.index.qdrant_index import QdrantIndex, build_qdrant_index, point_id
from composed_retrieval.index.search import GalleryIndex, Searcher
from composed_retrieval.index.store import read_meta
from composed_retrieval.service.app import create_app

from test_index import make_gallery, saved_model, write_image

ROOT = Path(__file__).resolve().parents[1]


def _quiet(**kw):
    return dict(progress=False, num_workers=0, log=lambda s: None, **kw)


@pytest.fixture(autouse=True)
def _release_local_folders():
    yield
    for key in list(qdrant_index._clients):
        qdrant_index.close(key)


def _build_both(tmp_path: Path, n: int = 14):
    gallery = tmp_path / "gallery"
    names = make_gallery(gallery, n=n)
    model, method = saved_model(tmp_path / "model")
    build_index(tmp_path / "flat", gallery, model, **_quiet())
    report = build_qdrant_index(tmp_path / "qidx", str(tmp_path / "qdrant"), "photos", gallery, model,
                                progress=False, num_workers=0, chunk_size=5)
    return gallery, names, model, report


def test_qdrant_search_gives_the_top10_of_exact_faiss(tmp_path):
    gallery, names, model, report = _build_both(tmp_path)
    assert (report.count, report.embedded, report.kind) == (14, 14, "qdrant")
    meta = read_meta(tmp_path / "qidx")
    assert meta["backend"] == "qdrant" and meta["collection"] == "photos" and meta["count"] == 14

    flat, q = GalleryIndex.open(tmp_path / "flat"), QdrantIndex.open(tmp_path / "qidx")
    assert sorted(q.names) == sorted(flat.names) and q.dim == flat.dim
    queries = np.random.default_rng(0).standard_normal((6, flat.dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    for a, b in zip(flat.search(queries, 10), q.search(queries, 10)):
        assert [h.name for h in a] == [h.name for h in b]
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-5)

    # through the searcher (model + left-out reference), as `cir search` runs it
    s_flat, s_q = Searcher.open(tmp_path / "flat"), Searcher.open(tmp_path / "qidx")
    for ref in names[:3]:
        a = s_flat.search(s_flat.reference(ref), "make it red", 10)
        b = s_q.search(s_q.reference(ref), "make it red", 10)
        assert ref not in [h.name for h in b] and len(b) == 10
        assert [h.name for h in a] == [h.name for h in b]
    copy = tmp_path / "copy.png"                       # a byte-identical upload is left out too
    copy.write_bytes((gallery / names[2]).read_bytes())
    assert names[2] not in [h.name for h in s_q.search(s_q.reference(copy), "make it red", 13)]


CHILD = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from composed_retrieval.index import qdrant_index
from composed_retrieval.cli import main
real = qdrant_index._upsert
calls = []
def upsert_then_die(*a, **kw):
    calls.append(1)
    if len(calls) == 2:                 # the first chunk is in the collection, the second not
        os.kill(os.getpid(), signal.SIGKILL)
    real(*a, **kw)
qdrant_index._upsert = upsert_then_die
main({argv!r})
"""


def test_qdrant_build_resumes_after_sigkill_and_add_updates(tmp_path):
    gallery = tmp_path / "gallery"
    names = make_gallery(gallery, n=12)
    model, _ = saved_model(tmp_path / "model")
    argv = ["index", "--backend", "qdrant", "--qdrant", str(tmp_path / "qdrant"), "--collection", "c",
            "--gallery", str(gallery), "--model", str(model), "--out", str(tmp_path / "qidx"),
            "--chunk-size", "5", "--quiet", "--num-workers", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-c", CHILD.format(tests=str(ROOT / "tests"), argv=argv)],
                           env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert not (tmp_path / "qidx" / "index.json").exists()      # no manifest before the collection is whole

    report = build_qdrant_index(tmp_path / "qidx", str(tmp_path / "qdrant"), "c", gallery, model,
                                progress=False, num_workers=0, chunk_size=5)
    assert (report.count, report.embedded, report.reused) == (12, 7, 5)   # the killed run's chunk is kept
    build_index(tmp_path / "flat", gallery, model, **_quiet())
    flat, q = GalleryIndex.open(tmp_path / "flat"), QdrantIndex.open(tmp_path / "qidx")
    queries = flat.data.vectors[:4]
    assert [[h.name for h in r] for r in flat.search(queries, 10)] == [[h.name for h in r] for r in q.search(queries, 10)]
    qdrant_index.close(str(tmp_path / "qdrant"))

    # --add: one changed, one deleted, one new file; nothing else is embedded again
    write_image(gallery / names[3], seed=999)
    (gallery / names[5]).unlink()
    write_image(gallery / "new" / "extra.png", seed=1234)
    assert main(["index", "--add", "--out", str(tmp_path / "qidx"), "--quiet", "--num-workers", "0"]) == 0
    meta = read_meta(tmp_path / "qidx")
    assert meta["count"] == 12
    q = QdrantIndex.open(tmp_path / "qidx")
    assert sorted(q.names) == sorted(set(names) - {names[5]} | {"new/extra.png"})
    ids = set(qdrant_index._existing(q.client, "c"))
    from composed_retrieval.fileio import sha256_file
    assert ids == {point_id(n, sha256_file(gallery / n)) for n in q.names}   # no stale point is left
    build_index(tmp_path / "flat2", gallery, model, **_quiet())
    flat2 = GalleryIndex.open(tmp_path / "flat2")
    queries = flat2.data.vectors[:4]
    assert [[h.name for h in r] for r in flat2.search(queries, 10)] == [[h.name for h in r] for r in q.search(queries, 10)]


def test_service_answers_from_a_qdrant_searcher(tmp_path):
    gallery, names, model, _ = _build_both(tmp_path, n=10)
    q_client = TestClient(create_app(Searcher.open(tmp_path / "qidx")))
    f_client = TestClient(create_app(Searcher.open(tmp_path / "flat")))
    health = q_client.get("/healthz").json()
    assert health["images"] == 10 and health["engine"] == "qdrant" and health["dim"] == 32
    page = q_client.get("/gallery", params={"limit": 4}).json()
    assert page["total"] == 10 and [it["name"] for it in page["items"]] == sorted(names)[:4]
    form = {"text": "make it blue", "k": "5", "name": names[1]}
    a, b = q_client.post("/search", data=form), f_client.post("/search", data=form)
    assert a.status_code == 200, a.text
    assert [r["name"] for r in a.json()["results"]] == [r["name"] for r in b.json()["results"]]
    assert names[1] not in [r["name"] for r in a.json()["results"]]
    assert q_client.get(a.json()["results"][0]["thumbnail_url"]).status_code == 200
    assert q_client.get("/images/not-there.png").status_code == 404
    metrics = q_client.get("/metrics").text
    assert 'cir_http_requests_total{method="POST",route="/search",status="200"} 1.0' in metrics
