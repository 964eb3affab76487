"""`cir serve`: the HTTP API and web page over one index, in one command."""
from __future__ import annotations

import argparse
import os

from ..errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve an index over HTTP with a search web page",
                       description="Start a web server: the search page at /, the JSON API at "
                                   "/search, its description at /openapi.json.")
    p.add_argument("--index", required=True, help="index folder made by `cir index`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    from ..train.models import add_model_options
    add_model_options(p, run_flag="--model", required=False,
                      run_help="use this run folder instead of the model stored in the index")
    p.add_argument("--gallery", help="gallery folder, if it moved since the index was built")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload (default 10 MB)")
    p.add_argument("--max-image-pixels", type=int, default=40_000_000,
                   help="largest accepted image, width x height (default 40 million)")
    p.add_argument("--max-text-chars", type=int, default=500, help="longest accepted modification text")
    p.add_argument("--max-k", type=int, default=100, help="most results one request may ask for")
    p.add_argument("--max-concurrent", type=int, default=8, help="requests handled at once (default 8)")
    p.add_argument("--max-queued", type=int, default=64,
                   help="requests waiting for a free slot; more are answered 429 (default 64)")
    p.add_argument("--request-timeout", type=float, default=30.0,
                   help="seconds before an unanswered request gets 503, queueing included (default 30)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a search's body may take to arrive before 408 (default 30)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a request's headers may take to arrive before 408 (default 10)")
    p.add_argument("--decode-memory-mb", type=float, default=512.0,
                   help="memory all concurrent image decodes may hold; more wait (default 512)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests whose Host header is NAME (repeatable; '*' for any). "
                        "localhost, IP addresses and --host are always allowed; other names are "
                        "refused against DNS rebinding")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes sharing one memory-mapped index (default 1)")
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from .guard import TimedH11Protocol
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be between 1 and 65535, got {args.port}")
    if args.max_queued < 0:
        raise ConfigError(f"--max-queued must be 0 or more, got {args.max_queued}")
    for name in ("max_upload_mb", "max_image_pixels", "max_text_chars", "max_k", "max_concurrent",
                 "request_timeout", "body_timeout", "header_timeout", "decode_memory_mb"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    os.environ["CIR_HEADER_TIMEOUT_S"] = str(args.header_timeout)   # reaches spawned workers too
    if args.workers > 1:
        from ..index.search import open_index
        from .workers import serve_workers
        return serve_workers(args, lambda: open_index(args.index, verify=True),
                             "composed_retrieval.service.commands:app_from_env", http=TimedH11Protocol)
    import uvicorn
    app, searcher = build_app(args)
    print(f"serving {len(searcher.index)} images from {searcher.gallery} at http://{args.host}:{args.port}/ "
          f"(API description at /openapi.json); Ctrl-C stops")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", http=TimedH11Protocol)
    return 0


def build_app(args: argparse.Namespace, verify: bool = True):
    """The app and searcher for ``cir serve``'s arguments (each worker of --workers builds its own)."""
    from .app import Limits, create_app
    from .guard import return_big_frees_to_the_os
    from ..index.search import Searcher
    return_big_frees_to_the_os()     # each worker process: decode buffers do not stay resident
    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
                    max_image_pixels=args.max_image_pixels, max_text_chars=args.max_text_chars,
                    max_k=args.max_k, max_concurrent=args.max_concurrent, max_queued=args.max_queued,
                    request_timeout_s=args.request_timeout, body_timeout_s=args.body_timeout,
                    header_timeout_s=args.header_timeout,
                    decode_memory_bytes=int(args.decode_memory_mb * 2**20),
                    allowed_hosts=tuple(dict.fromkeys([args.host, *args.allow_host])))
    from ..index.commands import model_source
    searcher = Searcher.open(args.index, model=model_source(args), gallery=args.gallery, device=args.device,
                             max_pixels=limits.max_image_pixels, verify=verify)
    return create_app(searcher, limits), searcher


def app_from_env():
    """uvicorn factory, run in each worker of --workers: the app for the parent's arguments."""
    import json
    import os
    from .workers import ENV
    return build_app(argparse.Namespace(**json.loads(os.environ[ENV])), verify=False)[0]
