"""`cir serve --workers N`: several uvicorn worker processes over one memory-mapped index.

The parent checks the index once (manifest, engine file hash, that the collection exists) and
starts N workers (uvicorn's own process manager); each worker opens the same index folder
memory-mapped without re-hashing it, so the vectors and the engine's codes sit once in the page
cache however many workers read them. Only the model is loaded per worker. Prometheus metrics
use the multi-process mode (a fresh directory in ``PROMETHEUS_MULTIPROC_DIR``), so any worker's
``/metrics`` reports the whole server. Qdrant's embedded local mode serves one process; with a
Qdrant server every worker opens its own client.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from typing import Any, Callable

from ..errors import ConfigError

ENV = "CIR_SERVE_ARGS"


def serve_workers(args: argparse.Namespace, check: Callable[[], Any], factory: str, **uvicorn_options: Any) -> int:
    """Check the index once (``check``), then serve it with ``args.workers`` processes, each
    building its app with ``factory`` ("module:function", reading the arguments from $ENV)."""
    import uvicorn
    index = check()
    if index.meta.get("backend") == "qdrant" and not str(index.meta.get("qdrant")).startswith(("http://", "https://")):
        raise ConfigError("a Qdrant local-mode folder serves one process: use --workers 1, or a "
                          "Qdrant server (--qdrant http://...) for several workers")
    metrics_dir = tempfile.mkdtemp(prefix="cir-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    os.environ[ENV] = json.dumps({k: v for k, v in vars(args).items() if k != "func"})
    print(f"serving {len(index)} images with {args.workers} worker processes at "
          f"http://{args.host}:{args.port}/ (API description at /openapi.json, metrics at /metrics); Ctrl-C stops")
    try:
        uvicorn.run(factory, factory=True, host=args.host,
                    port=args.port, workers=args.workers, log_level="info", **uvicorn_options)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0
