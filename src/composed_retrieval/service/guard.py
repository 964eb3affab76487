"""Load limits for the HTTP service: concurrency, queueing, request time and body size.

A plain ASGI middleware (outside FastAPI's own error handling, so its answers cannot be turned
into 500s): at most ``max_concurrent`` requests run, ``max_queued`` more wait for a slot, and
any further one is answered 429 at once. A request that has no answer ``timeout_s`` after it
arrived (queueing included) is answered 503. A body that grows past ``max_body_bytes`` is cut
off with 413 even when the client announced no Content-Length (chunked uploads).

A timed-out request's work is cancelled; work already running in a worker thread cannot be
interrupted, so its slot stays taken until that thread finishes. That keeps the number of busy
threads (and the memory they hold) bounded by ``max_concurrent`` however slow requests get.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, Callable

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class _BodyTooLarge(Exception):
    pass


async def send_json(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": " ".join(detail.split())}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """ASGI middleware enforcing the limits above; ``exempt`` paths (health checks) bypass it."""

    def __init__(self, app: Any, max_concurrent: int, max_queued: int, timeout_s: float,
                 max_body_bytes: int, exempt: tuple[str, ...] = ("/healthz",)) -> None:
        self.app = app
        self.max_concurrent, self.max_queued = max_concurrent, max_queued
        self.timeout_s, self.max_body_bytes, self.exempt = timeout_s, max_body_bytes, exempt
        self.active = 0       # requests holding a slot (their work may outlive a timeout)
        self.waiting = 0      # requests queued for a slot
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.exempt:
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        if self._slots is None or self._loop is not loop:  # one per event loop (test clients make several)
            self._slots, self._loop = asyncio.Semaphore(self.max_concurrent), loop
        slots = self._slots
        if self.active + self.waiting >= self.max_concurrent + self.max_queued:
            await send_json(send, 429, f"server busy: {self.active} requests running and {self.waiting} "
                                       f"waiting (limits {self.max_concurrent} and {self.max_queued}); "
                                       "retry shortly", {"Retry-After": "1"})
            return
        deadline = loop.time() + self.timeout_s
        self.waiting += 1
        try:
            await asyncio.wait_for(slots.acquire(), self.timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            await send_json(send, 503, f"server busy: no free slot within the {self.timeout_s:g} s "
                                       "request timeout; retry shortly", {"Retry-After": "1"})
            return
        finally:
            self.waiting -= 1
        self.active += 1
        await self._run(scope, receive, send, deadline, slots)

    async def _run(self, scope: Scope, receive: Receive, send: Send, deadline: float,
                   slots: asyncio.Semaphore) -> None:
        state = {"received": 0, "too_large": False, "started": False, "closed": False}

        async def guarded_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_body_bytes:
                    state["too_large"] = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            if state["closed"] or state["too_large"]:
                return  # the client has (or will get) the guard's own answer
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        task = asyncio.ensure_future(self.app(scope, guarded_receive, guarded_send))
        task.add_done_callback(lambda t: self._release(t, slots))
        remaining = max(0.0, deadline - asyncio.get_running_loop().time())
        done, _ = await asyncio.wait({task}, timeout=remaining)
        if task in done:
            exc = None if task.cancelled() else task.exception()
            if state["too_large"]:
                if not state["started"]:
                    await send_json(send, 413, f"request body is above the upload limit of "
                                               f"{self.max_body_bytes} bytes")
                return
            if exc is not None:
                raise exc
            return
        state["closed"] = True
        task.cancel()
        if not state["started"]:
            await send_json(send, 503, f"request took longer than the {self.timeout_s:g} s limit",
                            {"Retry-After": "1"})

    def _release(self, task: "asyncio.Future[Any]", slots: asyncio.Semaphore) -> None:
        self.active -= 1
        slots.release()
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log it as never retrieved
