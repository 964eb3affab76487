"""Prometheus metrics of the HTTP service: requests, latency, requests in flight and queued.

``GET /metrics`` answers in Prometheus' text format. With several worker processes
(``cir serve --workers N``) each worker writes its values to files under
``PROMETHEUS_MULTIPROC_DIR`` (set by the parent before the workers start) and any worker's
``/metrics`` reports the sum over all of them (prometheus-client's multi-process mode), so one
scrape sees the whole server.
"""
from __future__ import annotations

import os
import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

#: path prefixes reported as themselves; anything else is "other" (bounded label values)
ROUTES = ("/search", "/images", "/thumbnails", "/gallery", "/healthz", "/metrics", "/static", "/docs",
          "/openapi.json")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def route_label(path: str) -> str:
    if path == "/":
        return "/"
    for route in ROUTES:
        if path == route or path.startswith(route + "/"):
            return route
    return "other"


class Metrics:
    """The service's metrics, in a registry of their own (several apps in one process, as in
    the tests, do not collide)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("cir_http_requests", "HTTP requests answered", ("method", "route", "status"),
                                registry=self.registry)
        self.latency = Histogram("cir_http_request_seconds", "Time from arrival to answer, queueing included",
                                 ("route",), buckets=LATENCY_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("cir_http_requests_in_flight", "Requests arrived and not yet answered",
                               registry=self.registry, multiprocess_mode="livesum")
        self.queued = Gauge("cir_http_requests_queued", "Requests waiting for a free slot (queue length)",
                            registry=self.registry, multiprocess_mode="livesum")

    def render(self) -> bytes:
        if multiprocess_dir():
            from prometheus_client import multiprocess
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Outermost ASGI middleware: counts and times every HTTP request, the load guard's own
    429/503/413 answers included."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.in_flight.dec()
            route = route_label(scope.get("path", ""))
            self.metrics.requests.labels(scope.get("method", ""), route, str(status["code"])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


def metered(guard_class: type, metrics: Metrics) -> type:
    """``guard_class`` (service/guard.py's RequestGuard) whose queue length is a gauge: its
    ``waiting`` counter, made a property that mirrors every change into ``metrics.queued``."""

    base = getattr(guard_class, "waiting", None)
    inherited = base if isinstance(base, property) else None

    class MeteredGuard(guard_class):  # type: ignore[misc, valid-type]
        @property
        def waiting(self) -> int:
            return inherited.fget(self) if inherited else self.__dict__.get("_waiting", 0)

        @waiting.setter
        def waiting(self, value: int) -> None:
            if inherited:
                inherited.fset(self, value)
            else:
                self.__dict__["_waiting"] = value
            metrics.queued.set(value)

    return MeteredGuard
