"""Service limits over real HTTP (uvicorn on 127.0.0.1, an ephemeral port): upload size (with and
without Content-Length), image pixels, text length, request timeout, concurrency and queueing --
each a JSON error with a one-line detail -- and the `cir serve` flags that set them."""
from __future__ import annotations

import io
import os
import re
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

sys.path.insert(0, str(Path(__file__).parent / "badinput"))
from make_corpus import bomb_png, png_bytes  # noqa: E402

from composed_retrieval.cli import main  # noqa: E402
from composed_retrieval.index.build import build_index  # noqa: E402
from composed_retrieval.index.search import Searcher  # noqa: E402
from composed_retrieval.service.app import Limits, create_app  # noqa: E402
from composed_retrieval.service.guard import RequestGuard, TimedH11Protocol  # noqa: E402
from test_index import make_gallery, saved_model  # noqa: E402


@pytest.fixture(scope="module")
def searcher(tmp_path_factory) -> Searcher:
    root = tmp_path_factory.mktemp("limits")
    make_gallery(root / "gallery", n=6)
    model, method = saved_model(root / "model")
    build_index(root / "idx", root / "gallery", model, method=method, progress=False, num_workers=0,
                log=lambda s: None)
    return Searcher.open(root / "idx")


class Server:
    """uvicorn in a thread on 127.0.0.1 with an OS-chosen port."""

    def __init__(self, app, **config) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="critical",
                                                    lifespan="off", **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        t_end = time.time() + 20
        while not self.server.started:
            assert time.time() < t_end and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def serve(searcher: Searcher, slow: threading.Event | None = None, entered: threading.Event | None = None,
          **limits) -> tuple[Server, object]:
    """A server over a copy of ``searcher``; with ``slow``, every search waits until it is set."""
    s = Searcher(searcher.index, searcher.method, searcher.gallery)
    if slow is not None:
        real = s.search

        def slow_search(*a, **k):
            if entered is not None:
                entered.set()
            slow.wait(20)
            return real(*a, **k)
        s.search = slow_search  # type: ignore[method-assign]
    app = create_app(s, Limits(**limits))
    return Server(app), app


def guard_of(app) -> RequestGuard:
    node = app.middleware_stack
    while node is not None and not isinstance(node, RequestGuard):
        node = getattr(node, "app", None)
    assert node is not None
    return node


def check_error(r, status: int, pattern: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    detail = r.json()["detail"]
    assert "\n" not in detail and "Traceback" not in detail and re.search(pattern, detail), detail


def search_form(name: str = "img01.png", text: str = "add a red square") -> dict:
    return {"text": text, "name": name, "k": "3"}


# ---- body, pixels, text ------------------------------------------------------------------------
def test_upload_size_limit_with_and_without_content_length(searcher):
    srv, _ = serve(searcher, max_upload_bytes=20_000)
    big = png_bytes(3, (300, 300))                       # ~270 kB of noise
    assert len(big) > 20_000 + 64 * 1024
    with srv, httpx.Client(base_url=srv.url, timeout=20) as c:
        check_error(c.post("/search", data={"text": "x"}, files={"image": ("big.png", big, "image/png")}),
                    413, r"above the upload limit")
        # the same body streamed in chunks, no Content-Length: cut off while it arrives
        boundary = "bnd"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\nx\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.png\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode() + big + f"\r\n--{boundary}--\r\n".encode()
        chunks = (body[i:i + 16384] for i in range(0, len(body), 16384))
        r = c.post("/search", content=chunks, headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert "content-length" not in r.request.headers
        check_error(r, 413, r"above the upload limit of \d+ bytes")
        small = png_bytes(4, (40, 30))
        assert c.post("/search", data={"text": "x"}, files={"image": ("ok.png", small, "image/png")}).status_code == 200


def test_image_pixel_limit(searcher):
    srv, _ = serve(searcher, max_image_pixels=10_000)
    buf = io.BytesIO()
    Image.new("RGB", (200, 100)).save(buf, "PNG")         # 20000 px, a few hundred bytes
    with srv, httpx.Client(base_url=srv.url, timeout=20) as c:
        check_error(c.post("/search", data={"text": "x"}, files={"image": ("wide.png", buf.getvalue(), "image/png")}),
                    400, r"200x100 pixels, above the limit of 10000")
        check_error(c.post("/search", data={"text": "x"}, files={"image": ("bomb.png", bomb_png(), "image/png")}),
                    400, r"above the limit|too large")
        ok = png_bytes(5, (90, 100))                        # 9000 px
        assert c.post("/search", data={"text": "x"}, files={"image": ("ok.png", ok, "image/png")}).status_code == 200


def test_text_length_limit(searcher):
    srv, _ = serve(searcher, max_text_chars=40)
    with srv, httpx.Client(base_url=srv.url, timeout=20) as c:
        assert c.post("/search", data=search_form(text="x" * 40)).status_code == 200
        check_error(c.post("/search", data=search_form(text="x" * 41)), 422, r"41 characters, above the limit of 40")
        r = c.post("/search", data=search_form(text="make it red " * 87_382))   # 1 MB
        assert r.status_code in (400, 413, 422) and r.headers["content-type"].startswith("application/json")


# ---- time and concurrency ----------------------------------------------------------------------
def test_request_timeout_answers_503_and_the_server_recovers(searcher):
    slow = threading.Event()
    srv, app = serve(searcher, slow=slow, request_timeout_s=0.5, max_concurrent=2)
    with srv, httpx.Client(base_url=srv.url, timeout=20) as c:
        t0 = time.perf_counter()
        r = c.post("/search", data=search_form())
        elapsed = time.perf_counter() - t0
        check_error(r, 503, r"longer than the 0.5 s limit")
        assert r.headers["retry-after"] == "1" and elapsed < 3
        assert c.get("/healthz").status_code == 200          # health checks bypass the guard
        slow.set()                                            # the stuck work finishes; its slot frees
        t_end = time.time() + 10
        while guard_of(app).active and time.time() < t_end:
            time.sleep(0.02)
        assert guard_of(app).active == 0
        assert c.post("/search", data=search_form()).status_code == 200


def test_concurrency_limit_queues_then_answers_429(searcher):
    slow, entered = threading.Event(), threading.Event()
    srv, app = serve(searcher, slow=slow, entered=entered, max_concurrent=1, max_queued=1, request_timeout_s=20)
    results: dict[str, httpx.Response] = {}

    def post(key: str) -> None:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            results[key] = c.post("/search", data=search_form())

    with srv:
        first = threading.Thread(target=post, args=("running",))
        first.start()
        assert entered.wait(20)                               # request 1 holds the only slot
        second = threading.Thread(target=post, args=("queued",))
        second.start()
        t_end = time.time() + 20
        while guard_of(app).waiting < 1:                      # request 2 waits for it
            assert time.time() < t_end
            time.sleep(0.01)
        with httpx.Client(base_url=srv.url, timeout=20) as c:
            third = c.post("/search", data=search_form())     # request 3: no room, answered at once
            check_error(third, 429, r"server busy: 1 requests running and 1 waiting")
            assert third.headers["retry-after"] == "1"
            assert c.get("/healthz").status_code == 200
        slow.set()
        first.join(30)
        second.join(30)
    assert results["running"].status_code == 200 and results["queued"].status_code == 200


def test_queue_wait_counts_against_the_timeout(searcher):
    slow, entered = threading.Event(), threading.Event()
    srv, _ = serve(searcher, slow=slow, entered=entered, max_concurrent=1, max_queued=4, request_timeout_s=0.6)
    with srv:
        holder = threading.Thread(target=lambda: httpx.post(f"{srv.url}/search", data=search_form(), timeout=30))
        holder.start()
        assert entered.wait(20)
        r = httpx.post(f"{srv.url}/search", data=search_form(), timeout=20)
        slow.set()
        holder.join(30)
    check_error(r, 503, r"no free slot within the 0.6 s request timeout|longer than the 0.6 s limit")


# ---- cir serve flags ---------------------------------------------------------------------------
def test_cir_serve_flags_reach_the_app(monkeypatch, searcher, capsys):
    seen = {}
    monkeypatch.setattr(Searcher, "open", classmethod(lambda cls, *a, **k: searcher))
    import composed_retrieval.service.app as app_module
    real_create = app_module.create_app

    def capture(s, limits):
        seen["limits"] = limits
        return real_create(s, limits)
    monkeypatch.setattr(app_module, "create_app", capture)
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: seen.update(host=host, port=port, **kw))
    monkeypatch.delenv("CIR_HEADER_TIMEOUT_S", raising=False)
    assert main(["serve", "--index", "x", "--max-upload-mb", "2", "--max-image-pixels", "5000",
                 "--max-text-chars", "77", "--max-k", "9", "--max-concurrent", "3", "--max-queued", "5",
                 "--request-timeout", "7.5", "--body-timeout", "4", "--header-timeout", "3",
                 "--decode-memory-mb", "64", "--allow-host", "cir.lan", "--port", "8123"]) == 0
    assert seen["limits"] == Limits(max_upload_bytes=2 * 1024 * 1024, max_image_pixels=5000, max_text_chars=77,
                                    max_k=9, max_concurrent=3, max_queued=5, request_timeout_s=7.5,
                                    body_timeout_s=4.0, header_timeout_s=3.0, decode_memory_bytes=64 * 2**20,
                                    allowed_hosts=("127.0.0.1", "cir.lan"))
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8123
    assert issubclass(seen["http"], TimedH11Protocol) and os.environ["CIR_HEADER_TIMEOUT_S"] == "3.0"


@pytest.mark.parametrize("flag,value", [("--max-concurrent", "0"), ("--request-timeout", "0"),
                                        ("--body-timeout", "0"), ("--header-timeout", "-1"),
                                        ("--decode-memory-mb", "0"),
                                        ("--max-queued", "-1"), ("--max-upload-mb", "-2"), ("--port", "70000")])
def test_cir_serve_rejects_bad_limits_in_one_line(capsys, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--index", "nowhere", flag, value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: --") and flag.lstrip("-").split("-")[0] in err
