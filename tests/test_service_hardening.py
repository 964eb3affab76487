"""The service under an adversarial client (issue 18): slow clients trickling headers or bodies,
saturation reported by /healthz, image decodes bounded in memory under concurrency, gallery file
names that are not UTF-8, Host headers of other names (DNS rebinding) and error details that
would reveal server paths. Real uvicorn on 127.0.0.1 where timing or sockets matter."""
from __future__ import annotations

import io
import os
import re
import socket
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
from fastapi.testclient import TestClient  # noqa: E402

from composed_retrieval.data.images import decode_cost, load_image  # noqa: E402
from composed_retrieval.index.build import build_index  # noqa: E402
from composed_retrieval.index.search import Searcher  # noqa: E402
from composed_retrieval.service.app import Limits, create_app  # noqa: E402
from composed_retrieval.service.guard import DecodeBudget, DecodeBusy, timed_h11  # noqa: E402
from test_index import make_gallery, saved_model, write_image  # noqa: E402
from test_service_limits import Server, check_error  # noqa: E402

NON_UTF8 = b"caf\xe9 \xff.png"            # Latin-1 bytes: not a valid UTF-8 file name
NON_UTF8_SHOWN = "caf\\xe9 \\xff.png"      # how the service names it


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    gallery = root / "gallery"
    names = make_gallery(gallery, n=6)
    odd = Path(os.fsdecode(os.fsencode(str(gallery)) + b"/" + NON_UTF8))
    write_image(odd, 77)
    model, method = saved_model(root / "model")
    build_index(root / "idx", gallery, model, method=method, progress=False, num_workers=0, log=lambda s: None)
    searcher = Searcher.open(root / "idx")
    assert os.fsdecode(NON_UTF8) in searcher.index.names
    return {"root": root, "gallery": gallery, "names": names, "searcher": searcher, "odd": odd}


def fresh(built) -> Searcher:
    s = built["searcher"]
    return Searcher(s.index, s.method, s.gallery)


def big_png(size: tuple[int, int]) -> bytes:
    """A large image that compresses to little (a few flat rectangles)."""
    im = Image.new("RGB", size, (230, 230, 230))
    im.paste((200, 30, 30), (size[0] // 5, size[1] // 5, size[0] // 2, size[1] // 2))
    im.paste((30, 30, 200), (size[0] // 2, size[1] // 2, 4 * size[0] // 5, 4 * size[1] // 5))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


# ---- slow clients ------------------------------------------------------------------------------
class Trickler(threading.Thread):
    """A raw socket that sends ``head`` then one byte per ``gap`` s of ``tail`` until answered."""

    def __init__(self, port: int, head: bytes, tail: bytes, gap: float = 0.1, limit_s: float = 15) -> None:
        super().__init__(daemon=True)
        self.port, self.head, self.tail, self.gap, self.limit_s = port, head, tail, gap, limit_s
        self.answer = b""
        self.answered_after: float | None = None

    def run(self) -> None:
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", self.port), timeout=self.limit_s) as sock:
            sock.sendall(self.head)
            sock.settimeout(self.gap)
            for i in range(len(self.tail)):                   # bounded: one byte each, then stop
                if time.monotonic() - t0 > self.limit_s:
                    return
                try:
                    sock.sendall(self.tail[i:i + 1])
                    data = sock.recv(4096)
                except socket.timeout:
                    continue
                except OSError:                               # closed by the server
                    break
                if data:
                    self.answer = data
                    break
                break                                         # EOF
            sock.settimeout(2)
            for _ in range(16):                               # the rest of the answer, until EOF
                try:
                    data = sock.recv(4096)
                except OSError:
                    break
                if not data:
                    break
                self.answer += data
        self.answered_after = time.monotonic() - t0


def test_slow_clients_cannot_starve_the_page_thumbnails_or_a_search(built):
    app = create_app(fresh(built), Limits(max_concurrent=1, max_queued=0, body_timeout_s=2.5))
    srv = Server(app, http=timed_h11(2.5))
    body_head = (b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                 b"Content-Length: 5000\r\n\r\n")
    with srv:
        port = int(srv.url.rsplit(":", 1)[1])
        bodies = [Trickler(port, body_head, b"-" * 5000) for _ in range(6)]
        headers = [Trickler(port, b"GET / HTTP/1.1\r\nHo", b"st: 127.0.0.1\r\nX-Slow: " + b"a" * 500) for _ in range(2)]
        for t in bodies + headers:
            t.start()
        time.sleep(0.4)
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            health = c.get("/healthz").json()
            assert health["search"]["reading"] == 6 and health["search"]["running"] == 0
            assert health["status"] == "ok"                  # bodies still arriving hold no slot
            for path in ("/", "/static/app.js", "/gallery", f"/thumbnails/{built['names'][1]}",
                         f"/images/{built['names'][1]}"):
                t0 = time.monotonic()
                assert c.get(path).status_code == 200, path
                assert time.monotonic() - t0 < 2.0, path
            t0 = time.monotonic()
            r = c.post("/search", data={"text": "add a red square", "name": built["names"][2], "k": "3"})
            assert r.status_code == 200, r.text           # the one search slot was free all along
            assert time.monotonic() - t0 < 2.0
            assert all(t.answered_after is None for t in bodies + headers)   # still trickling
        for t in bodies + headers:
            t.join(20)
        for t in bodies:
            assert t.answer.startswith(b"HTTP/1.1 408"), t.answer[:200]
            assert b"request body not received within 2.5 s" in t.answer
        for t in headers:
            assert t.answer.startswith(b"HTTP/1.1 408"), t.answer[:200]
            assert b"request headers not received within 2.5 s" in t.answer
        assert all(t.answered_after < 8 for t in bodies + headers)
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            assert c.get("/healthz").json()["search"]["slow_bodies"] == 6


def test_bodies_arriving_at_once_are_capped(built):
    app = create_app(fresh(built), Limits(max_reading=2, body_timeout_s=1.5))
    head = (b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 5000\r\n\r\n")
    with Server(app) as srv:
        port = int(srv.url.rsplit(":", 1)[1])
        slow = [Trickler(port, head, b"-" * 5000) for _ in range(2)]
        for t in slow:
            t.start()
        t_end = time.time() + 10
        while httpx.get(f"{srv.url}/healthz").json()["search"]["reading"] < 2:
            assert time.time() < t_end
            time.sleep(0.02)
        check_error(httpx.post(f"{srv.url}/search", data={"text": "x", "name": built["names"][0]}),
                    429, r"2 request bodies arriving \(limit 2\)")
        assert httpx.get(f"{srv.url}/").status_code == 200
        for t in slow:
            t.join(10)
            assert t.answer.startswith(b"HTTP/1.1 408")
        assert httpx.post(f"{srv.url}/search", data={"text": "x", "name": built["names"][0]}).status_code == 200


def test_healthz_reports_saturation_while_the_page_still_answers(built):
    s = fresh(built)
    gate, entered = threading.Event(), threading.Event()
    real = s.search

    def slow(*a, **k):
        entered.set()
        gate.wait(20)
        return real(*a, **k)
    s.search = slow  # type: ignore[method-assign]
    app = create_app(s, Limits(max_concurrent=1, max_queued=1, request_timeout_s=20))
    form = {"text": "add a red square", "name": built["names"][0], "k": "2"}
    answers: list[int] = []
    with Server(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        threads = [threading.Thread(target=lambda: answers.append(httpx.post(f"{srv.url}/search", data=form,
                                                                                 timeout=30).status_code))
                   for _ in range(2)]
        threads[0].start()
        assert entered.wait(20)
        threads[1].start()
        t_end = time.time() + 20
        while c.get("/healthz").json()["search"]["waiting"] < 1:
            assert time.time() < t_end
            time.sleep(0.02)
        health = c.get("/healthz").json()
        assert health["status"] == "saturated"
        assert {k: health["search"][k] for k in ("running", "waiting", "max_concurrent", "max_queued")} == \
            {"running": 1, "waiting": 1, "max_concurrent": 1, "max_queued": 1}
        check_error(c.post("/search", data=form), 429, "server busy")
        assert c.get("/").status_code == 200 and c.get(f"/thumbnails/{built['names'][3]}").status_code == 200
        assert c.get("/healthz").json()["search"]["refused_busy"] == 1
        gate.set()
        for t in threads:
            t.join(30)
        assert answers == [200, 200]
        assert c.get("/healthz").json()["status"] == "ok"


# ---- decode memory -----------------------------------------------------------------------------
def test_load_image_reduces_big_images_to_what_the_consumer_needs(tmp_path):
    png = tmp_path / "big.png"
    png.write_bytes(big_png((3000, 2000)))
    full = load_image(png)
    small = load_image(png, reduce_to=256)
    assert full.size == (3000, 2000) and small.size == (429, 286)   # reduce(7), rounded up: short side >= 256
    jpg = tmp_path / "big.jpg"
    full.save(jpg, quality=90)
    assert load_image(jpg, reduce_to=256).size == (750, 500)    # JPEG decoded at 1/4 (1/8: 250 < 256)
    tiny = write_image(tmp_path / "tiny.png", 3)                               # below it: decoded as ever
    assert load_image(tiny, reduce_to=256).tobytes() == load_image(tiny).tobytes()
    pal = tmp_path / "pal.png"
    full.convert("P").save(pal)                                               # palette: converted first
    assert load_image(pal, reduce_to=256).getpixel((100, 100)) == \
        pytest.approx(full.reduce(7).getpixel((100, 100)), abs=8)


def test_decode_budget_holds_under_concurrency():
    budget = DecodeBudget(100, timeout_s=5)
    seen: list[int] = []

    def work(cost: int) -> None:
        with budget.hold(cost):
            seen.append(budget.used)
            time.sleep(0.05)
    threads = [threading.Thread(target=work, args=(40,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(seen) == 8 and max(seen) <= 80 and budget.peak == 80 and budget.used == 0
    with budget.hold(150):                               # larger than the budget: runs alone
        assert budget.used == 150
    quick = DecodeBudget(100, timeout_s=0.1)
    with quick.hold(90):
        with pytest.raises(DecodeBusy, match="busy decoding"):     # waited past the timeout
            with quick.hold(20):
                pass
    capped = DecodeBudget(100, timeout_s=5, max_waiting=1)
    released = threading.Event()

    def waiter() -> None:
        with capped.hold(50):
            released.set()
    with capped.hold(90):
        t = threading.Thread(target=waiter)
        t.start()
        t_end = time.time() + 5
        while capped.waiting < 1:
            assert time.time() < t_end
            time.sleep(0.01)
        t0 = time.monotonic()
        with pytest.raises(DecodeBusy):                             # a second waiter is refused at once
            with capped.hold(50):
                pass
        assert time.monotonic() - t0 < 1 and not released.is_set()
    t.join(5)
    assert released.is_set() and capped.used == 0


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "TIFF"])
def test_pixels_are_decoded_only_inside_the_decode_gate(tmp_path, monkeypatch, fmt):
    """Reading the orientation must not decode: PNG's getexif loads the whole image, which ran
    outside the budget (8 uploads of a 6300x6300 PNG peaked at +1.2 GiB on a 512 MiB budget)."""
    from PIL import ImageFile
    path, plain = tmp_path / f"im.{fmt.lower()}", tmp_path / f"plain.{fmt.lower()}"
    exif = Image.Exif()
    exif[0x0112] = 6                                                   # rotated 90 degrees
    Image.new("RGB", (64, 48), (200, 30, 30)).save(path, fmt, exif=exif.tobytes())
    Image.new("RGB", (64, 48), (200, 30, 30)).save(plain, fmt)          # no EXIF at all (PNG: getexif loads)
    inside = {"gate": False, "loads_outside": 0}
    real_load = ImageFile.ImageFile.load

    def load(self):
        if getattr(self, "_im", None) is None and not inside["gate"]:
            inside["loads_outside"] += 1
        return real_load(self)
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)

    from contextlib import contextmanager

    @contextmanager
    def gate(cost):
        inside["gate"] = True
        try:
            yield
        finally:
            inside["gate"] = False
    image = load_image(path, reduce_to=8, gate=gate)
    width, height = load_image(plain, reduce_to=8, gate=gate).size
    assert width > height >= 8                                          # reduced, not turned
    assert inside["loads_outside"] == 0
    assert image.size[0] < image.size[1]                                # turned upright, once


def test_freed_decode_buffers_leave_the_service_process(tmp_path):
    """Peak resident memory of 8 threads decoding big PNGs on a budget of 2 decodes stays near
    2 decodes once ``return_big_frees_to_the_os`` runs (with glibc's defaults each thread keeps
    the last image it decoded); a fresh process, so earlier tests' memory does not count."""
    import subprocess
    import sys
    png = tmp_path / "big.png"
    png.write_bytes(big_png((3000, 3000)))
    script = f"""
import threading
from PIL import Image
from composed_retrieval.data.images import decode_cost, load_image
from composed_retrieval.service.guard import DecodeBudget, return_big_frees_to_the_os
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
assert return_big_frees_to_the_os()
path = {str(png)!r}
load_image(path, reduce_to=64)                         # warm: imports and first allocations
with Image.open(path) as im:
    one = decode_cost(im)
budget = DecodeBudget(2 * one, timeout_s=60)
start = status("VmRSS")
def work():
    for _ in range(3):
        load_image(path, reduce_to=64, gate=budget.hold)
threads = [threading.Thread(target=work) for _ in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
print(start, status("VmHWM"), budget.peak, 4 * 3000 * 3000)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src")))
    assert out.returncode == 0, out.stderr[-2000:]
    start, peak, held, pillow_image = (int(v) for v in out.stdout.split())
    assert held <= 2 * decode_cost(Image.new("RGB", (3000, 3000)))
    assert peak - start <= 2 * pillow_image + 48 * 2**20, (peak - start) / 2**20   # two decodes, not eight


def test_concurrent_big_uploads_stay_within_the_decode_budget(built):
    data = big_png((2500, 2500))
    assert len(data) < 200_000
    with Image.open(io.BytesIO(data)) as im:
        one = decode_cost(im)
    s = fresh(built)
    sizes: list[tuple[int, int]] = []
    real = s.search
    s.search = lambda ref, *a, **k: sizes.append(ref.image.size) or real(ref, *a, **k)  # type: ignore
    budget_bytes = int(2.5 * one)
    app = create_app(s, Limits(decode_memory_bytes=budget_bytes, max_image_pixels=7_000_000))
    codes: list[int] = []
    busy: list[int] = []
    with Server(app) as srv:
        def upload() -> None:
            for _ in range(40):                              # a client that honours Retry-After (bounded)
                r = httpx.post(f"{srv.url}/search", data={"text": "make it red", "k": "2"},
                               files={"image": ("big.png", data, "image/png")}, timeout=60)
                if r.status_code != 503:
                    break
                check_error(r, 503, "busy decoding other images")
                assert r.headers["retry-after"] == "1"
                busy.append(1)
                time.sleep(0.1)
            codes.append(r.status_code)
        threads = [threading.Thread(target=upload) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    budget = app.state.decode_budget
    assert codes == [200] * 8
    assert one <= budget.peak <= budget_bytes and budget.used == 0
    image_size = s.method.encoder.image_size
    assert sizes and all(4 * image_size <= min(sz) < 8 * image_size for sz in sizes)   # reduced on decode


# ---- names, hosts, paths -----------------------------------------------------------------------
def test_non_utf8_gallery_names_are_listed_served_and_searchable(built):
    c = TestClient(create_app(fresh(built)))
    listing = c.get("/gallery", params={"limit": 100})
    assert listing.status_code == 200, listing.text
    item = next(it for it in listing.json()["items"] if it["name"] == NON_UTF8_SHOWN)
    assert item["image_url"] == "/images/caf%5Cxe9%20%5Cxff.png"
    image = c.get(item["image_url"])
    assert image.status_code == 200 and image.content == built["odd"].read_bytes()
    assert c.get(item["thumbnail_url"]).headers["content-type"] == "image/jpeg"
    by_name = c.post("/search", data={"text": "add a circle", "name": NON_UTF8_SHOWN, "k": "20"})
    assert by_name.status_code == 200, by_name.text
    assert by_name.json()["reference"]["name"] == NON_UTF8_SHOWN
    assert NON_UTF8_SHOWN not in [h["name"] for h in by_name.json()["results"]]   # itself left out
    upload = c.post("/search", data={"text": "add a circle", "k": "20"},
                    files={"image": ("q.png", Path(built["gallery"] / built["names"][0]).read_bytes(), "image/png")})
    assert upload.status_code == 200 and NON_UTF8_SHOWN in [h["name"] for h in upload.json()["results"]]


@pytest.mark.parametrize("host,ok", [
    ("localhost:8000", True), ("127.0.0.1:8000", True), ("[::1]:8000", True), ("10.1.2.3", True),
    ("app.localhost", True), ("cir.lan:8000", True), ("CIR.LAN", True),
    ("evil.example", False), ("evil.example:8000", False), ("localhost.evil.example", False),
])
def test_host_header_allow_list(built, host, ok):
    c = TestClient(create_app(fresh(built), Limits(allowed_hosts=("cir.lan",))), base_url="http://localhost")
    r = c.get("/healthz", headers={"host": host})
    if ok:
        assert r.status_code == 200, r.text
    else:
        check_error(r, 400, r"host '.*' is not served here; start `cir serve` with --allow-host")
        assert c.get("/", headers={"host": host}).status_code == 400


def test_allow_any_host(built):
    c = TestClient(create_app(fresh(built), Limits(allowed_hosts=("*",))))
    assert c.get("/healthz", headers={"host": "anything.example"}).status_code == 200


def test_error_details_name_files_relative_to_the_gallery(tmp_path):
    gallery = tmp_path / "private-location" / "gallery"
    names = make_gallery(gallery, n=4)
    model, method = saved_model(tmp_path / "model")
    build_index(tmp_path / "idx", gallery, model, method=method, progress=False, num_workers=0, log=lambda s: None)
    broken = names[0]                                        # "img01.png"; "sub/img00.png" below
    (gallery / broken).write_bytes(b"no longer an image")
    (gallery / "sub/img00.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    c = TestClient(create_app(Searcher.open(tmp_path / "idx")))
    for name in (broken, "sub/img00.png"):
        for r in (c.get(f"/thumbnails/{name}"), c.post("/search", data={"text": "x", "name": name})):
            check_error(r, 422, rf"gallery image '{re.escape(name)}' is not readable")
            assert "private-location" not in r.text and str(tmp_path) not in r.text
    r = c.post("/search", data={"text": "x"},
               files={"image": ("/home/someone/secret/holiday.png", b"junk", "image/png")})
    check_error(r, 400, r"uploaded file 'holiday.png': not a readable image")
    assert "/home" not in r.text and "/tmp" not in r.text
