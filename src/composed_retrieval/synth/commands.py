"""`cir synth`: generate the synthetic benchmark in CIRR's (or FashionIQ's) on-disk format."""
from __future__ import annotations

import argparse
import json
import os
import time

from ..errors import ConfigError
from .world import SIZES_SPEC
from .writer import FORMATS, write_synth


def _run(args: argparse.Namespace) -> int:
    if args.seed < 0:
        raise ConfigError(f"--seed must be a non-negative integer, got {args.seed}")
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    start = time.perf_counter()
    meta = write_synth(args.out, args.seed, args.size, args.format, args.workers)
    report = {"out": str(args.out), "format": meta["format"], "seed": meta["seed"], "size": meta["size"],
              "images": meta["images"], "triplets": meta["triplets"], "caption_pairs": meta["caption_pairs"],
              "seconds": round(time.perf_counter() - start, 2)}
    print(json.dumps(report))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="generate the synthetic CIR benchmark (CIRR or FashionIQ format)",
                       description="Render a seeded synthetic CIR benchmark: scenes of coloured shapes, "
                                   "edits described in text, CIRR-style img_sets and a held-out split "
                                   "of attribute combinations never seen in training.")
    p.add_argument("--out", required=True, help="output directory (new, empty, or a previous synth output)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    p.add_argument("--size", choices=sorted(SIZES_SPEC), default="small",
                   help="tiny: tests; small: demo/benchmark; medium: about 4x small")
    p.add_argument("--format", choices=FORMATS, default="cirr", help="on-disk dataset format")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="rendering processes (output is identical for any number)")
    p.set_defaults(func=_run)
