"""The search page in a real browser: headless Chromium (Debian's package) driven by Playwright
against a real uvicorn server. Skipped where Playwright or /usr/bin/chromium is missing.

Set CIR_SCREENSHOT_DIR to keep the screenshots (to look at the page after a change).
"""
from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason=f"{CHROMIUM} is missing (apt-get install chromium)")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

import uvicorn  # noqa: E402

from composed_retrieval.index.build import build_index  # noqa: E402
from composed_retrieval.index.search import Searcher  # noqa: E402
from composed_retrieval.service.app import create_app  # noqa: E402
from test_index import make_gallery, saved_model, write_image  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    gallery = root / "gallery"
    names = make_gallery(gallery, n=16)
    model, method = saved_model(root / "model")
    build_index(root / "idx", gallery, model, method=method, progress=False, num_workers=0, log=lambda s: None)
    app = create_app(Searcher.open(root / "idx"))
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}/", "names": names, "root": root}
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        pg = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        pg.on("pageerror", lambda exc: errors.append(str(exc)))
        pg.errors = errors
        yield pg
        browser.close()


def _shot(pg, tmp_path: Path, name: str) -> None:
    folder = Path(os.environ.get("CIR_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(folder / name), full_page=True)


def test_upload_search_then_refine_by_clicking_a_result(server, page, tmp_path):
    expect = sync_api.expect
    page.goto(server["url"])
    expect(page.locator("#gallery .card")).to_have_count(16)
    expect(page.locator("#status")).to_contain_text("16 images")
    expect(page.locator("#more")).to_be_hidden()              # every gallery image is shown
    expect(page.locator("#results-section")).to_be_hidden()   # nothing searched yet

    ref = write_image(tmp_path / "my photo.png", 4242)
    page.set_input_files("#file", str(ref))
    expect(page.locator("#ref-label")).to_have_text("Uploaded: my photo.png")
    expect(page.locator("#ref-img")).to_be_visible()

    page.fill("#text", "make the square red")
    page.click("#search-btn")
    cards = page.locator("#results .card")
    expect(cards).to_have_count(10)
    expect(page.locator("#results-title")).to_have_text("Results for “make the square red”")
    first = cards.first.get_attribute("data-name")
    assert first in server["names"]
    page.wait_for_function("Array.from(document.querySelectorAll('#results img')).every(i => i.complete && i.naturalWidth > 0)")
    scores = [float(s) for s in page.locator("#results .score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True)
    _shot(page, tmp_path, "search.png")

    cards.first.click()                                  # the result becomes the new reference
    expect(page.locator("#ref-label")).to_have_text(f"Gallery: {first}")
    assert f"/thumbnails/{first}" in page.locator("#ref-img").get_attribute("src")
    page.fill("#text", "add a circle")
    page.click("#search-btn")
    expect(page.locator("#results-title")).to_have_text("Results for “add a circle”")
    expect(page.locator("#history li")).to_have_count(2)
    assert first not in page.locator("#results .card").evaluate_all("els => els.map(e => e.dataset.name)")
    _shot(page, tmp_path, "refined.png")
    assert page.errors == []


def test_gallery_pick_and_error_message(server, page):
    expect = sync_api.expect
    page.goto(server["url"])
    expect(page.locator("#status")).to_contain_text("16 images")    # limits read from /healthz
    page.locator("#gallery .card").nth(2).click()
    expect(page.locator("#ref-label")).to_have_text(f"Gallery: {server['names'][2]}")
    page.fill("#text", "")
    page.click("#search-btn")
    expect(page.locator("#error")).to_have_text("Describe what should change.")
    page.evaluate("document.getElementById('text').removeAttribute('maxlength')")
    page.fill("#text", "x" * 600)                         # over the server's 500-character limit
    page.click("#search-btn")
    expect(page.locator("#error")).to_contain_text("above the limit of 500")
    assert page.errors == []


def _search(page, text: str) -> None:
    page.fill("#text", text)
    page.click("#search-btn")
    sync_api.expect(page.locator("#results-title")).to_have_text(f"Results for “{text}”")


def _visible_broken_images(page) -> int:
    return page.evaluate("Array.from(document.images).filter(i => i.offsetParent !== null && "
                         "i.getAttribute('src') && i.complete && i.naturalWidth === 0).length")


def test_result_opens_full_size_without_replacing_the_reference(server, page, tmp_path):
    expect = sync_api.expect
    page.goto(server["url"])
    page.locator("#gallery .card").nth(1).click()
    _search(page, "add a circle")
    first = page.locator("#results .card").first
    name = first.get_attribute("data-name")
    first.locator(".full").click()
    expect(page.locator("#viewer")).to_be_visible()
    expect(page.locator("#viewer-name")).to_have_text(name)
    page.wait_for_function("document.getElementById('viewer-img').complete && "
                           "document.getElementById('viewer-img').naturalWidth > 0")
    assert page.evaluate("document.getElementById('viewer-img').naturalWidth") == 48   # the file, not a thumbnail
    assert page.locator("#viewer-open").get_attribute("href") == f"/images/{name}"
    _shot(page, tmp_path, "viewer.png")
    page.click("#viewer-close")
    expect(page.locator("#viewer")).to_be_hidden()
    expect(page.locator("#ref-label")).to_have_text(f"Gallery: {server['names'][1]}")   # unchanged
    assert page.errors == []


def test_steps_go_back_undo_and_reset(server, page, tmp_path):
    expect = sync_api.expect
    page.goto(server["url"])
    names = server["names"]
    page.locator("#gallery .card").nth(4).click()
    _search(page, "add a circle")
    second_ref = page.locator("#results .card").first.get_attribute("data-name")
    page.locator("#results .card").first.click()
    _search(page, "make it red")
    steps = page.locator("#history .step")
    expect(steps).to_have_count(2)
    expect(page.locator("#history li.current .step")).to_have_text(f"{second_ref} → “make it red”")
    _shot(page, tmp_path, "steps.png")

    steps.nth(0).click()                                  # back to step 1: its reference, text, results
    expect(page.locator("#ref-label")).to_have_text(f"Gallery: {names[4]}")
    expect(page.locator("#results-title")).to_have_text("Results for “add a circle”")
    assert page.input_value("#text") == "add a circle"
    expect(page.locator("#history li.current .step")).to_have_text(f"{names[4]} → “add a circle”")
    steps.nth(1).click()
    expect(page.locator("#ref-label")).to_have_text(f"Gallery: {second_ref}")

    page.click("#undo")                                   # undo step 2
    expect(steps).to_have_count(1)
    expect(page.locator("#results-title")).to_have_text("Results for “add a circle”")
    expect(page.locator("#ref-label")).to_have_text(f"Gallery: {names[4]}")
    page.click("#undo")                                   # undo step 1: its reference stays, no results
    expect(page.locator("#steps")).to_be_hidden()
    expect(page.locator("#results-section")).to_be_hidden()
    expect(page.locator("#ref-label")).to_have_text(f"Gallery: {names[4]}")

    _search(page, "add a circle")
    page.click("#reset")
    expect(page.locator("#steps")).to_be_hidden()
    expect(page.locator("#results-section")).to_be_hidden()
    expect(page.locator("#ref-label")).to_have_text("No reference yet")
    expect(page.locator("#ref-img")).to_be_hidden()
    assert page.input_value("#text") == ""
    assert page.errors == []


def test_bad_upload_shows_no_broken_image_and_a_failed_search_clears_results(server, page, tmp_path):
    expect = sync_api.expect
    page.goto(server["url"])
    page.locator("#gallery .card").nth(0).click()
    _search(page, "add a circle")
    expect(page.locator("#results .card")).to_have_count(10)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a PNG at all")
    page.set_input_files("#file", str(bad))
    expect(page.locator("#no-preview")).to_be_visible()
    expect(page.locator("#ref-img")).to_be_hidden()
    expect(page.locator("#ref-label")).to_have_text("Uploaded: broken.png (no preview)")
    assert _visible_broken_images(page) == 0
    page.fill("#text", "make it red")
    page.click("#search-btn")
    expect(page.locator("#error")).to_contain_text("uploaded file 'broken.png': not a readable image")
    expect(page.locator("#results-section")).to_be_hidden()          # the old results are gone
    expect(page.locator("#results .card")).to_have_count(0)
    assert _visible_broken_images(page) == 0
    _shot(page, tmp_path, "bad_upload.png")
    assert page.errors == []


def test_text_cut_at_the_limit_is_announced(server, page):
    expect = sync_api.expect
    page.goto(server["url"])
    expect(page.locator("#status")).to_contain_text("16 images")
    page.locator("#text").click()
    page.keyboard.insert_text("y" * 600)                 # like a paste: the field keeps 500
    assert len(page.input_value("#text")) == 500
    expect(page.locator("#text-note")).to_have_text("Text cut at 500 characters, the server's limit.")
    page.fill("#text", "short")
    expect(page.locator("#text-note")).to_be_hidden()
    assert page.errors == []
