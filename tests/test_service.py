"""HTTP API of `cir serve`: every endpoint, and every way a request can be wrong (4xx JSON with a
one-line detail, never a traceback), including attempts to read files outside the gallery."""
from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
from fastapi.testclient import TestClient  # noqa: E402

import composed_retrieval.service.app as app_module  # noqa: E402
from composed_retrieval.index.build import build_index  # noqa: E402
from composed_retrieval.index.search import GalleryIndex, Searcher  # noqa: E402
from composed_retrieval.service.app import Limits, create_app  # noqa: E402
from test_index import make_gallery, saved_model, write_image  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("service")
    gallery = root / "gallery"
    names = make_gallery(gallery, n=10)
    model, method = saved_model(root / "model")
    build_index(root / "idx", gallery, model, method=method, progress=False, num_workers=0, log=lambda s: None)
    (root / "secret.txt").write_text("top secret")
    searcher = Searcher.open(root / "idx")
    return {"root": root, "gallery": gallery, "names": names, "searcher": searcher}


def client_for(built, **limits) -> TestClient:
    s = built["searcher"]
    return TestClient(create_app(Searcher(s.index, s.method, s.gallery), Limits(**limits)))


@pytest.fixture(scope="module")
def client(built):
    return client_for(built, max_text_chars=60, max_upload_bytes=200_000, max_k=20)


def png_bytes(seed: int = 1, size=(48, 40)) -> bytes:
    from test_index import write_image as _w  # same generator as the gallery images
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        return _w(Path(d) / "x.png", seed, size).read_bytes()


def assert_json_error(response, status: int, pattern: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str)
    assert "\n" not in body["detail"] and "Traceback" not in body["detail"]
    assert re.search(pattern, body["detail"]), body["detail"]


# ---- page, health, docs ------------------------------------------------------------------------
def test_page_static_files_health_and_no_offline_blank_docs(client, built):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "Composed image search" in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        r = client.get(asset)
        assert r.status_code == 200 and asset.rsplit("/", 1)[1] in page.text
        assert not re.search(r"https?://", r.text)          # no CDN, nothing external
    assert not re.search(r"(src|href)=\"https?://", page.text)
    health = client.get("/healthz").json()
    assert {k: health[k] for k in ("status", "images", "engine", "method", "dim")} == \
        {"status": "ok", "images": 10, "engine": "flat", "method": "sum", "dim": 32}
    assert health["limits"] == {"max_text_chars": 60, "max_k": 20, "max_upload_bytes": 200_000}
    # Swagger UI would come from a CDN (blank offline) and no installed package ships it: no /docs,
    # no link to it, the API description stays at /openapi.json
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    assert 'href="/docs"' not in page.text and 'href="/openapi.json"' in page.text
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/search", "/healthz", "/gallery", "/images/{name}", "/thumbnails/{name}"} <= set(paths)


def test_gallery_listing_pages(client, built):
    first = client.get("/gallery", params={"limit": 4}).json()
    assert first["total"] == 10 and [it["name"] for it in first["items"]] == built["names"][:4]
    rest = client.get("/gallery", params={"offset": 4, "limit": 100}).json()
    assert [it["name"] for it in rest["items"]] == built["names"][4:]
    assert first["items"][0]["thumbnail_url"] == f"/thumbnails/{built['names'][0]}"
    assert_json_error(client.get("/gallery", params={"offset": -1}), 422, "offset")


# ---- gallery files -----------------------------------------------------------------------------
def test_images_serves_gallery_files(client, built):
    for name in (built["names"][0], "sub/img00.png"):
        r = client.get(f"/images/{name}")
        assert r.status_code == 200 and r.content == (built["gallery"] / name).read_bytes()
        assert r.headers["content-type"] == "image/png"


@pytest.mark.parametrize("endpoint", ["images", "thumbnails"])
@pytest.mark.parametrize("name,status,pattern", [
    ("%2e%2e/secret.txt", 400, "contains '..'"),
    ("sub/%2e%2e/%2e%2e/secret.txt", 400, "contains '..'"),
    ("%2Fetc%2Fpasswd", 400, "absolute path"),
    ("/etc/passwd", 400, "absolute path"),
    ("nope.png", 404, "no image named 'nope.png'"),
    ("secret.txt", 404, "no image named"),
])
def test_gallery_files_refuse_escapes_and_unknown_names(client, endpoint, name, status, pattern):
    r = client.get(f"/{endpoint}/{name}")
    assert_json_error(r, status, pattern)
    assert "top secret" not in r.text


def test_symlink_out_of_the_gallery_is_refused(tmp_path):
    gallery = tmp_path / "gallery"
    names = make_gallery(gallery, n=4)
    model, method = saved_model(tmp_path / "model")
    build_index(tmp_path / "idx", gallery, model, method=method, progress=False, num_workers=0)
    outside = write_image(tmp_path / "private.png", 99)
    (gallery / names[1]).unlink()
    os.symlink(outside, gallery / names[1])               # an indexed name now points outside
    os.symlink(outside, gallery / "link.png")             # a new name, not in the index
    c = TestClient(create_app(Searcher(GalleryIndex.open(tmp_path / "idx"), method, gallery)))
    for endpoint in ("images", "thumbnails"):
        assert_json_error(c.get(f"/{endpoint}/{names[1]}"), 400, "resolves outside the gallery")
        assert_json_error(c.get(f"/{endpoint}/link.png"), 404, "no image named")
    assert_json_error(c.post("/search", data={"name": names[1], "text": "x"}), 400, "resolves outside")
    assert c.get(f"/images/{names[0]}").status_code == 200


def test_thumbnails_are_small_jpegs_cached_in_memory(built, monkeypatch):
    c = client_for(built)
    calls = []
    real = app_module.load_image
    monkeypatch.setattr(app_module, "load_image", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    name = built["names"][2]
    first = c.get(f"/thumbnails/{name}")
    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    im = Image.open(io.BytesIO(first.content))
    assert im.format == "JPEG" and max(im.size) <= 256 and im.size == Image.open(built["gallery"] / name).size
    assert c.get(f"/thumbnails/{name}").content == first.content
    assert len(calls) == 1                                   # second request served from memory


# ---- search ------------------------------------------------------------------------------------
def test_search_with_an_upload(client, built):
    data = png_bytes(seed=42)
    r = client.post("/search", data={"text": "make it red", "k": "3"},
                    files={"image": ("ref.png", data, "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["rank"] for x in body["results"]] == [1, 2, 3] and body["reference"] == {"name": None}
    s = built["searcher"]
    from composed_retrieval.index.search import Reference
    expected = s.search(Reference(Image.open(io.BytesIO(data)).convert("RGB")), "make it red", 3)
    assert [x["name"] for x in body["results"]] == [h.name for h in expected]
    for x in body["results"]:
        assert x["thumbnail_url"] == f"/thumbnails/{x['name']}" and x["image_url"] == f"/images/{x['name']}"
        assert client.get(x["thumbnail_url"]).status_code == 200
    scores = [x["score"] for x in body["results"]]
    assert scores == sorted(scores, reverse=True)


def test_search_by_gallery_name_leaves_the_reference_out(client, built):
    name = built["names"][3]
    r = client.post("/search", data={"text": "add a circle", "name": name, "k": "20"})
    assert r.status_code == 200, r.text
    got = [x["name"] for x in r.json()["results"]]
    assert name not in got and sorted(got) == sorted(set(built["names"]) - {name})
    assert r.json()["reference"] == {"name": name}


@pytest.mark.parametrize("data,files,status,pattern", [
    ({"name": "img01.png"}, None, 422, "field 'text' is required"),
    ({"name": "img01.png", "text": "   "}, None, 422, "field 'text' is empty"),
    ({"name": "img01.png", "text": "x" * 61}, None, 422, "61 characters, above the limit of 60"),
    ({"text": "make it red"}, None, 422, "give a reference"),
    ({"text": "red", "name": "img01.png"}, {"image": ("a.png", "PNG", "image/png")}, 422, "not both"),
    ({"text": "red", "name": "img01.png", "k": "0"}, None, 422, "k must be between 1 and 20"),
    ({"text": "red", "name": "img01.png", "k": "many"}, None, 422, "field 'k'"),
    ({"text": "red", "name": "nope.png"}, None, 404, "no image named 'nope.png'"),
    ({"text": "red", "name": "../secret.txt"}, None, 400, "contains '..'"),
    ({"text": "red", "name": "/etc/passwd"}, None, 400, "absolute path"),
    ({"text": "red"}, {"image": ("notes.png", b"this is not an image", "image/png")}, 400,
     "uploaded file 'notes.png': not a readable image"),
    ({"text": "red"}, {"image": ("empty.png", b"", "image/png")}, 400, "uploaded image is empty"),
    ({"text": "red"}, {"image": ("big.png", b"\x89PNG" + b"0" * 200_001, "image/png")}, 413, "above the limit"),
])
def test_search_errors_are_4xx_json(client, data, files, status, pattern):
    if files and files["image"][1] == "PNG":
        files = {"image": ("a.png", png_bytes(), "image/png")}
    assert_json_error(client.post("/search", data=data, files=files), status, pattern)


def test_search_refuses_truncated_and_oversized_images(built):
    c = client_for(built, max_image_pixels=1000)             # the test images are 48x40 = 1920
    whole = png_bytes(seed=3)
    assert_json_error(c.post("/search", data={"text": "red"}, files={"image": ("t.png", whole, "image/png")}),
                      400, "48x40 pixels, above the limit of 1000")
    c = client_for(built)
    assert_json_error(c.post("/search", data={"text": "red"},
                             files={"image": ("t.png", whole[: len(whole) // 2], "image/png")}),
                      400, "uploaded file 't.png': corrupt or truncated")


def test_huge_announced_body_is_refused_before_reading(client):
    r = client.post("/search", content=b"x" * 10, headers={"content-length": str(50 * 1024 * 1024),
                                                           "content-type": "multipart/form-data; boundary=b"})
    assert_json_error(r, 413, "above the upload limit")


def test_unknown_route_is_json_404(client):
    r = client.get("/no/such/page")
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}
    assert json.loads(client.post("/healthz").text)["detail"] == "Method Not Allowed"
