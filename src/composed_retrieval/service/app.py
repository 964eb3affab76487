"""The HTTP API and web page over one index (FastAPI).

Every user mistake is a 4xx JSON ``{"detail": "<one line>"}``; nothing returns a traceback,
and no detail carries an absolute server path (gallery files are named relative to the gallery).
Gallery files are served only by their indexed name, after checking that the name and its
resolved path stay inside the gallery folder, so '..', absolute paths and symlinks that point
elsewhere cannot read other files.

File names that are not valid UTF-8 (kept by Python as surrogate escapes) are shown with their
bad bytes as ``\\xNN`` escapes: that display name is the name in every JSON answer and URL, and
the service maps it back to the file. The interactive ``/docs`` page is not served: FastAPI loads
Swagger UI from a CDN and no installed package ships its files, so offline it would be blank;
the machine-readable API description stays at ``/openapi.json``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from PIL import Image
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from ..data.images import load_image
from ..errors import CIRError, DataError
from ..index.search import Reference, Searcher, UnknownImage, UnsafeName
from .guard import DecodeBudget, DecodeBusy, GuardStats, HostGuard, RequestGuard
from .metrics import CONTENT_TYPE, Metrics, MetricsMiddleware, metered

#: uploads and gallery references are decoded at no less than this many times the model's input
#: size (short side): JPEG at a reduced DCT scale, others box-reduced right after decoding.
#: Images below it decode exactly as `cir index` decodes them.
REDUCE_MARGIN = 4

STATIC = Path(__file__).parent / "static"


@dataclass
class Limits:
    """What one request may send or ask for."""

    max_upload_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_text_chars: int = 500
    max_k: int = 100
    thumbnail_px: int = 256
    thumbnail_cache: int = 4096          # thumbnails kept in memory (about 10 kB each)
    gallery_page: int = 200              # most names one /gallery request returns
    max_concurrent: int = 8              # searches running at once (service/guard.py)
    max_queued: int = 64                 # searches waiting for a slot; beyond that: 429
    request_timeout_s: float = 30.0      # no answer by then (queueing included): 503
    body_timeout_s: float = 30.0         # a search body not fully arrived by then: 408
    header_timeout_s: float = 10.0       # request headers not arrived by then: 408 (cir serve's uvicorn)
    max_reading: int = 256               # search bodies arriving at once; beyond that: 429
    decode_memory_bytes: int = 512 * 2**20   # pixels all concurrent image decodes may hold
    allowed_hosts: tuple[str, ...] = ()  # Host header names served besides localhost and IPs


class ThumbnailCache:
    """Small JPEGs made on first request and kept (LRU), keyed by file identity so that an
    image changed on disk gets a fresh thumbnail."""

    def __init__(self, size_px: int, max_items: int, max_pixels: int, gate=None) -> None:
        self.size_px, self.max_items, self.max_pixels, self.gate = size_px, max_items, max_pixels, gate
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path) -> bytes:
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        image = load_image(path, self.max_pixels, reduce_to=self.size_px, gate=self.gate)
        image.thumbnail((self.size_px, self.size_px))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=85)
        data = buf.getvalue()
        with self._lock:
            self._items[key] = data
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
        return data


def display_name(name: str) -> str:
    """``name`` as valid Unicode: bytes that were not UTF-8 (surrogate escapes) become ``\\xNN``."""
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


class SafeJSONResponse(JSONResponse):
    """JSON that cannot fail on a stray surrogate (it is written as a ``\\udcNN`` escape)."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")) \
            .encode("utf-8", "backslashreplace")


def _url(prefix: str, name: str) -> str:
    return f"/{prefix}/{quote(display_name(name), safe='/')}"


def _fail(status: int, detail: str) -> HTTPException:
    return HTTPException(status_code=status, detail=" ".join(detail.split()))


def _gallery_error(exc: CIRError) -> HTTPException:
    return _fail(404 if isinstance(exc, UnknownImage) else 400, str(exc))


class _Paths:
    """Turns absolute server paths in error texts into names relative to the gallery (or a
    bare file name), so that an answer never tells a client where files live."""

    def __init__(self, searcher: Searcher) -> None:
        folders = {str(searcher.gallery), str(searcher.gallery_real)}
        self.gallery = sorted((f.rstrip("/") + "/" for f in folders), key=len, reverse=True)
        index_folder = getattr(searcher.index, "folder", None)
        self.others = [str(p) for p in (index_folder, tempfile.gettempdir()) if p]

    def scrub(self, text: str) -> str:
        for prefix in self.gallery:
            text = text.replace(prefix, "")
        for folder in self.others:
            text = text.replace(folder.rstrip("/") + "/", "").replace(folder, os.path.basename(folder))
        return display_name(text)


def create_app(searcher: Searcher, limits: Limits | None = None) -> FastAPI:
    """The service for one loaded :class:`Searcher` (``cir serve`` builds it from an index)."""
    limits = limits or Limits()
    searcher.max_pixels = limits.max_image_pixels
    # a quarter of the search slots may wait for decode memory; the rest stay for other searches
    budget = DecodeBudget(limits.decode_memory_bytes, timeout_s=limits.request_timeout_s,
                          max_waiting=max(1, limits.max_concurrent // 4))
    thumbs = ThumbnailCache(limits.thumbnail_px, limits.thumbnail_cache, limits.max_image_pixels, budget.hold)
    reduce_to = REDUCE_MARGIN * int(getattr(searcher.method.encoder, "image_size", 0) or 0) or None
    paths = _Paths(searcher)
    # display name -> index name, for the names that are not valid UTF-8 (and clash with no real name)
    real_names = set(searcher.index.names)
    aliases = {display_name(n): n for n in searcher.index.names if display_name(n) != n}
    aliases = {d: n for d, n in aliases.items() if d not in real_names}
    stats = GuardStats(limits.max_concurrent, limits.max_queued)
    app = FastAPI(title="composed-retrieval search", docs_url=None, redoc_url=None,
                  default_response_class=SafeJSONResponse,
                  description="Search a gallery with a reference image and a modification text.")
    app.state.guard_stats, app.state.decode_budget = stats, budget
    metrics = Metrics()
    app.add_middleware(metered(RequestGuard, metrics), max_concurrent=limits.max_concurrent, max_queued=limits.max_queued,
                       timeout_s=limits.request_timeout_s, max_body_bytes=limits.max_upload_bytes + 64 * 1024,
                       body_timeout_s=limits.body_timeout_s, max_reading=limits.max_reading, stats=stats)
    app.add_middleware(HostGuard, allowed=limits.allowed_hosts)
    app.add_middleware(MetricsMiddleware, metrics=metrics)   # outermost: sees the guards' answers too

    def gallery_file(name: str) -> Path:
        return searcher.gallery_file(aliases.get(name, name))

    def decode(path: Path) -> "Image.Image":
        try:
            return load_image(path, searcher.max_pixels, reduce_to=reduce_to, gate=budget.hold)
        except DecodeBusy as exc:
            raise HTTPException(status_code=503, detail=str(exc), headers={"Retry-After": "1"}) from None

    # ---- errors: one line of JSON, never a traceback -----------------------------------
    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return SafeJSONResponse({"detail": paths.scrub(str(exc.detail))}, status_code=exc.status_code,
                                headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path")]
            field = ".".join(loc) or "request"
            parts.append(f"field '{field}' is required" if err.get("type") == "missing"
                         else f"field '{field}': {err.get('msg', 'invalid')}")
        return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, status_code=422)

    @app.exception_handler(CIRError)
    async def _cir(request: Request, exc: CIRError) -> JSONResponse:
        return SafeJSONResponse({"detail": paths.scrub(str(exc))}, status_code=400)

    @app.exception_handler(DecodeBusy)
    async def _decode_busy(request: Request, exc: DecodeBusy) -> JSONResponse:
        return SafeJSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return SafeJSONResponse({"detail": f"internal error ({type(exc).__name__})"}, status_code=500)

    @app.middleware("http")
    async def _upload_size(request: Request, call_next):
        """Refuse an oversized body before it is read, when the client announces its size."""
        length = request.headers.get("content-length")
        if request.method == "POST" and length and length.isdigit() \
                and int(length) > limits.max_upload_bytes + 64 * 1024:
            return JSONResponse({"detail": f"request body of {int(length)} bytes is above the upload "
                                           f"limit of {limits.max_upload_bytes} bytes"}, status_code=413)
        return await call_next(request)

    # ---- pages and files ---------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/healthz", summary="Liveness, load and index facts")
    def healthz() -> dict:
        """``status`` is "saturated" while every search slot is taken (new searches queue, or get
        429 once ``search.waiting`` reaches ``search.max_queued``), else "ok"."""
        meta = searcher.index.meta
        return {"status": "saturated" if stats.saturated else "ok", "images": len(searcher.index),
                "engine": meta.get("kind"), "method": meta.get("method"), "dim": searcher.index.dim,
                "search": stats.as_dict(),
                "decode": {"held_bytes": budget.used, "budget_bytes": budget.max_bytes, "waiting": budget.waiting},
                "limits": {"max_text_chars": limits.max_text_chars, "max_k": limits.max_k,
                           "max_upload_bytes": limits.max_upload_bytes}}

    @app.get("/metrics", summary="Prometheus metrics (requests, latency, in flight, queued)")
    def metrics_page() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/gallery", summary="Names of gallery images, a page at a time")
    def gallery(offset: int = Query(0, ge=0), limit: int = Query(60, ge=1)) -> dict:
        limit = min(limit, limits.gallery_page)
        names = searcher.index.names[offset:offset + limit]
        return {"total": len(searcher.index), "offset": offset,
                "items": [{"name": display_name(n), "thumbnail_url": _url("thumbnails", n),
                           "image_url": _url("images", n)} for n in names]}

    @app.get("/images/{name:path}", summary="A gallery image file")
    def image(name: str) -> FileResponse:
        try:
            path = gallery_file(name)
        except (UnsafeName, UnknownImage) as exc:
            raise _gallery_error(exc) from None
        return FileResponse(path)

    @app.get("/thumbnails/{name:path}", summary="A small JPEG of a gallery image")
    def thumbnail(name: str) -> Response:
        try:
            path = gallery_file(name)
        except (UnsafeName, UnknownImage) as exc:
            raise _gallery_error(exc) from None
        try:
            data = thumbs.get(path)
        except DataError as exc:
            raise _fail(422, f"gallery image {name!r} is not readable: {_reason(exc)}") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    # ---- search ------------------------------------------------------------------------
    @app.post("/search", summary="Search with a reference (upload or gallery name) and a text")
    def search(text: str = Form(..., description="modification text"),
               k: int = Form(10, description="number of results"),
               name: str | None = Form(None, description="reference: a gallery image name"),
               image: UploadFile | None = File(None, description="reference: an image file")) -> dict:
        if not text.strip():
            raise _fail(422, "field 'text' is empty")
        if len(text) > limits.max_text_chars:
            raise _fail(422, f"text is {len(text)} characters, above the limit of {limits.max_text_chars}")
        if not 1 <= k <= limits.max_k:
            raise _fail(422, f"k must be between 1 and {limits.max_k}, got {k}")
        has_upload = image is not None and (image.filename or image.size)
        if has_upload and name:
            raise _fail(422, "give either an uploaded 'image' or a gallery 'name', not both")
        if not has_upload and not name:
            raise _fail(422, "give a reference: an uploaded 'image' file or a gallery image 'name'")
        if has_upload:
            ref = _read_upload(image, limits, decode)
        else:
            try:
                real = aliases.get(name, name)
                ref = Reference(decode(searcher.gallery_file(real)), real, None)
            except (UnsafeName, UnknownImage) as exc:
                raise _gallery_error(exc) from None
            except DataError as exc:
                raise _fail(422, f"gallery image {name!r} is not readable: {_reason(exc)}") from None
        hits = searcher.search(ref, text, k)
        return {"text": text, "reference": {"name": display_name(ref.name) if ref.name is not None else None},
                "results": [{**h.as_dict(), "name": display_name(h.name), "thumbnail_url": _url("thumbnails", h.name),
                             "image_url": _url("images", h.name)} for h in hits]}

    return app


def _reason(exc: DataError) -> str:
    """A DataError's message without the path it names (the caller names the file)."""
    message = str(exc)
    if exc.path and message.startswith(exc.path):
        message = message[len(exc.path):].lstrip(": ")
    return message


def _read_upload(upload: UploadFile, limits: Limits, decode) -> Reference:
    data = upload.file.read(limits.max_upload_bytes + 1)
    if len(data) > limits.max_upload_bytes:
        raise _fail(413, f"uploaded image is above the limit of {limits.max_upload_bytes} bytes")
    if not data:
        raise _fail(400, "uploaded image is empty")
    # load_image holds the decoding rules (formats, modes, pixel limit, one-line errors)
    with tempfile.NamedTemporaryFile(suffix=".upload") as tmp:
        tmp.write(data)
        tmp.flush()
        try:
            image = decode(Path(tmp.name))
        except DataError as exc:
            label = os.path.basename(upload.filename or "") or "upload"
            raise _fail(400, f"uploaded file {label!r}: {_reason(exc)}") from None
    return Reference(image, None, hashlib.sha256(data).hexdigest())
