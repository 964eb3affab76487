"""Load limits for the HTTP service: slow clients, search concurrency, queueing, request time,
body size, decode memory and the Host header.

``RequestGuard`` is a plain ASGI middleware (outside FastAPI's own error handling, so its
answers cannot be turned into 500s). Only the ``limited`` routes (searches) take a slot: at
most ``max_concurrent`` run, ``max_queued`` more wait, any further one is answered 429 at once.
The page, static files, thumbnails, gallery listing and health check never wait behind
searches, so slow or numerous searches cannot starve them.

A search's body is read in full *before* it may queue for a slot, within ``body_timeout_s``;
a client that trickles its body is answered 408 and never holds a slot. Headers have their own
deadline in :class:`TimedH11Protocol` (uvicorn's keep-alive timer restarts on every byte, so
alone it never ends a trickle). A body that grows past ``max_body_bytes`` is cut off with 413
even without a Content-Length (chunked uploads). A request with no answer ``timeout_s`` after it
queued is answered 503.

A timed-out request's work is cancelled; work already running in a worker thread cannot be
interrupted, so its slot stays taken until that thread finishes. That keeps the number of busy
threads (and the memory they hold) bounded by ``max_concurrent`` however slow requests get.
"""
from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import json
import os
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, Iterator

from uvicorn.protocols.http.h11_impl import H11Protocol

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
DEFAULT_HEADER_TIMEOUT_S = 10.0
_SPOOL_BYTES = 256 * 1024   # a buffered body above this goes to a temporary file, not memory


async def send_json(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": " ".join(detail.split())}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


@dataclass
class GuardStats:
    """What the guard is doing now and has refused so far (``/healthz`` reports it)."""

    max_concurrent: int
    max_queued: int
    running: int = 0        # searches holding a slot (their work may outlive a timeout)
    waiting: int = 0        # searches queued for a slot
    reading: int = 0        # searches whose body is still arriving (they hold no slot)
    refused_busy: int = 0   # 429s
    timed_out: int = 0      # 503s (no slot in time, or no answer in time)
    slow_bodies: int = 0    # 408s

    @property
    def saturated(self) -> bool:
        """Every slot is taken: a new search has to wait (or is refused when the queue is full)."""
        return self.running >= self.max_concurrent

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("running", "waiting", "reading", "max_concurrent", "max_queued",
                                              "refused_busy", "timed_out", "slow_bodies")}


class RequestGuard:
    """ASGI middleware enforcing the limits above on the ``limited`` paths (``exempt`` ones never)."""

    def __init__(self, app: Any, max_concurrent: int, max_queued: int, timeout_s: float,
                 max_body_bytes: int, body_timeout_s: float = 30.0, max_reading: int = 256,
                 limited: tuple[str, ...] = ("/search",), stats: GuardStats | None = None,
                 exempt: tuple[str, ...] = ("/healthz",)) -> None:
        self.app = app
        self.max_concurrent, self.max_queued = max_concurrent, max_queued
        self.timeout_s, self.max_body_bytes = timeout_s, max_body_bytes
        self.limited = tuple(p for p in limited if p not in exempt)
        self.body_timeout_s, self.max_reading = body_timeout_s, max_reading
        self.stats = stats or GuardStats(max_concurrent, max_queued)
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def active(self) -> int:
        return self.stats.running

    @property
    def waiting(self) -> int:
        """Searches queued for a slot (a property, so that a subclass can mirror it elsewhere)."""
        return self.stats.waiting

    @waiting.setter
    def waiting(self, value: int) -> None:
        self.stats.waiting = value

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") not in self.limited:
            await self.app(scope, receive, send)
            return
        st = self.stats
        length = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), b"")
        if length.isdigit() and int(length) > self.max_body_bytes:   # announced: refused before reading
            await send_json(send, 413, f"request body of {int(length)} bytes is above the upload limit of "
                                       f"{self.max_body_bytes} bytes", {"Connection": "close"})
            return
        if st.reading >= self.max_reading:
            st.refused_busy += 1
            await send_json(send, 429, f"server busy: {st.reading} request bodies arriving (limit "
                                       f"{self.max_reading}); retry shortly", {"Retry-After": "1"})
            return
        st.reading += 1
        try:
            body = await self._read_body(receive, send)
        finally:
            st.reading -= 1
        if body is None:
            return
        try:
            await self._queue_and_run(scope, body, send)
        finally:
            body.close()

    async def _read_body(self, receive: Receive, send: Send) -> "tempfile.SpooledTemporaryFile | None":
        """The whole body, spooled; None when the guard already answered (408, 413, client gone)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s
        spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES)
        size = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except (asyncio.TimeoutError, TimeoutError):
                spool.close()
                self.stats.slow_bodies += 1
                await send_json(send, 408, f"request body not received within {self.body_timeout_s:g} s "
                                           f"({size} bytes arrived); send it faster or retry",
                                {"Connection": "close"})
                return None
            if message["type"] == "http.disconnect":
                spool.close()
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                spool.close()
                await send_json(send, 413, f"request body is above the upload limit of {self.max_body_bytes} bytes",
                                {"Connection": "close"})
                return None
            spool.write(chunk)
            if not message.get("more_body", False):
                spool.seek(0)
                return spool

    async def _queue_and_run(self, scope: Scope, body: Any, send: Send) -> None:
        loop = asyncio.get_running_loop()
        if self._slots is None or self._loop is not loop:  # one per event loop (test clients make several)
            self._slots, self._loop = asyncio.Semaphore(self.max_concurrent), loop
        slots, st = self._slots, self.stats
        if st.running + self.waiting >= self.max_concurrent + self.max_queued:
            st.refused_busy += 1
            await send_json(send, 429, f"server busy: {st.running} requests running and {self.waiting} "
                                       f"waiting (limits {self.max_concurrent} and {self.max_queued}); "
                                       "retry shortly", {"Retry-After": "1"})
            return
        deadline = loop.time() + self.timeout_s
        self.waiting += 1
        try:
            await asyncio.wait_for(slots.acquire(), self.timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            st.timed_out += 1
            await send_json(send, 503, f"server busy: no free slot within the {self.timeout_s:g} s "
                                       "request timeout; retry shortly", {"Retry-After": "1"})
            return
        finally:
            self.waiting -= 1
        st.running += 1
        await self._run(scope, body, send, deadline, slots)

    async def _run(self, scope: Scope, body: Any, send: Send, deadline: float, slots: asyncio.Semaphore) -> None:
        state = {"started": False, "closed": False, "done": False}
        total = _size(body)

        async def replay() -> Message:
            if state["done"]:
                await asyncio.Event().wait()  # like a client that stays connected: wait for cancellation
            chunk = body.read(64 * 1024)
            more = body.tell() < total
            state["done"] = not more
            return {"type": "http.request", "body": chunk, "more_body": more}

        async def guarded_send(message: Message) -> None:
            if state["closed"]:
                return  # the client has the guard's own answer
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        task = asyncio.ensure_future(self.app(scope, replay, guarded_send))
        task.add_done_callback(lambda t: self._release(t, slots))
        remaining = max(0.0, deadline - asyncio.get_running_loop().time())
        done, _ = await asyncio.wait({task}, timeout=remaining)
        if task in done:
            exc = None if task.cancelled() else task.exception()
            if exc is not None:
                raise exc
            return
        state["closed"] = True
        task.cancel()
        self.stats.timed_out += 1
        if not state["started"]:
            await send_json(send, 503, f"request took longer than the {self.timeout_s:g} s limit",
                            {"Retry-After": "1"})

    def _release(self, task: "asyncio.Future[Any]", slots: asyncio.Semaphore) -> None:
        self.stats.running -= 1
        slots.release()
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log it as never retrieved


def _size(f: Any) -> int:
    pos = f.tell()
    f.seek(0, 2)
    end = f.tell()
    f.seek(pos)
    return end


# ---- Host header ---------------------------------------------------------------------------------
def _host_of(header: str) -> str:
    """The host part of a Host header, lower-case, without port or IPv6 brackets."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class HostGuard:
    """Refuses requests whose Host header names a host this server was not told it is.

    DNS rebinding makes a browser send a page's requests to 127.0.0.1 under the attacker's domain
    name; the Host header then carries that name. Allowed: localhost (and ``*.localhost``), IP
    literals (a rebinding attack always goes through a name), the ``allowed`` names (``cir serve``
    adds its bind host) and the server's own address as the transport reports it (an IP under
    uvicorn; the name of an in-process test client); ``*`` allows every host.
    """

    def __init__(self, app: Any, allowed: Iterable[str] = ()) -> None:
        self.app = app
        self.allowed = {_host_of(a) for a in (*LOCAL_HOSTS, *allowed) if a}
        self.any = "*" in self.allowed

    def allows(self, header: str, server: str | None = None) -> bool:
        host = _host_of(header)
        return (self.any or not host or host in self.allowed or _is_ip(host) or host.endswith(".localhost")
                or (server is not None and host == str(server).lower()))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and not self.any:
            header = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"host"), "")
            server = (scope.get("server") or (None,))[0]
            if not self.allows(header, server):
                await send_json(send, 400, f"host {_host_of(header)[:100]!r} is not served here; start "
                                           f"`cir serve` with --allow-host {_host_of(header)[:100] or 'NAME'} "
                                           "to serve it under that name")
                return
        await self.app(scope, receive, send)


# ---- decode memory -------------------------------------------------------------------------------
class DecodeBudget:
    """Bytes that concurrent image decodes may hold at once (threads wait for room).

    One decode larger than the whole budget runs alone rather than never. At most
    ``max_waiting`` decodes wait for room (a waiting upload holds a search slot, so unbounded
    waiting would let big uploads take every slot from small searches); one more, or one still
    waiting after ``timeout_s``, raises :class:`DecodeBusy` (the service answers 503).
    """

    def __init__(self, max_bytes: int, timeout_s: float = 30.0, max_waiting: int | None = None) -> None:
        self.max_bytes, self.timeout_s, self.max_waiting = max_bytes, timeout_s, max_waiting
        self.used = 0
        self.peak = 0
        self.waiting = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, cost: int) -> Iterator[None]:
        def fits() -> bool:
            return self.used == 0 or self.used + cost <= self.max_bytes

        busy = f"server busy decoding other images (budget {self.max_bytes // 2**20} MiB); retry shortly"
        with self._cond:
            if not fits():
                if self.max_waiting is not None and self.waiting >= self.max_waiting:
                    raise DecodeBusy(busy)
                self.waiting += 1
                try:
                    ok = self._cond.wait_for(fits, self.timeout_s)
                finally:
                    self.waiting -= 1
                if not ok:
                    raise DecodeBusy(busy)
            self.used += cost
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._cond:
                self.used -= cost
                self._cond.notify_all()


class DecodeBusy(Exception):
    pass


def return_big_frees_to_the_os(threshold: int = 1 << 20) -> bool:
    """Have glibc serve allocations of ``threshold`` bytes or more with mmap, so a freed decode
    buffer leaves the process at once; False where the C library is not glibc.

    The decode budget bounds the pixels held at once, not what stays resident: with glibc's
    defaults (an mmap threshold that rises to 32 MiB after the first large free, one heap arena
    per thread) each worker thread keeps the ~150 MiB of the last 40 Mpx image it decoded.
    Measured, 8 threads on a budget of 2 decodes of a 6300x6300 PNG: resident peak +600 MiB with
    the defaults, +305 MiB (the two decodes) with this.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_MMAP_THRESHOLD = -3
    return bool(mallopt(M_MMAP_THRESHOLD, int(threshold)))


# ---- header deadline -----------------------------------------------------------------------------
class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for a request's headers (``header_timeout_s``).

    Armed when a connection opens and when the first byte of a next request arrives, disarmed
    once the headers are parsed; a client that has not sent them in time gets 408 and is closed.
    The deadline is the class attribute, else ``$CIR_HEADER_TIMEOUT_S`` (which reaches uvicorn's
    spawned workers too), else 10 s; :func:`timed_h11` makes a subclass with its own.
    """

    header_timeout_s: float | None = None

    @property
    def _header_deadline(self) -> float:
        if self.header_timeout_s is not None:
            return self.header_timeout_s
        return float(os.environ.get("CIR_HEADER_TIMEOUT_S") or DEFAULT_HEADER_TIMEOUT_S)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self._header_deadline, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def data_received(self, data: bytes) -> None:
        if self._between_requests():
            self._arm_header_timer()
        super().data_received(data)
        if not self._between_requests():
            self._disarm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _header_timeout(self) -> None:
        self._header_timer = None
        if not self._between_requests() or self.transport.is_closing():
            return
        body = json.dumps({"detail": f"request headers not received within {self._header_deadline:g} s"}).encode()
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                             b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        self.transport.close()


def timed_h11(header_timeout_s: float) -> type[TimedH11Protocol]:
    """A :class:`TimedH11Protocol` subclass for ``uvicorn.run(http=...)``."""
    return type("TimedH11Protocol", (TimedH11Protocol,), {"header_timeout_s": float(header_timeout_s)})
