"""`cir`: one command line for data, training, evaluation, search and serving.

Each sub-command lives next to the code it drives, in a ``commands.py`` module that defines
``register(subparsers)``; this file only collects them and turns user errors into one line.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import CIRError

# modules that define register(subparsers); order = order in --help
COMMAND_MODULES = (
    "composed_retrieval.synth.commands",        # cir synth
    "composed_retrieval.evaluation.commands",   # cir score, cir validate-submission
    "composed_retrieval.train.commands",        # cir train, eval, predict, demo
    "composed_retrieval.zeroshot.commands",     # cir pretrain, zeroshot-eval
    "composed_retrieval.index.commands",        # cir index, search
    "composed_retrieval.service.commands",      # cir serve
    "composed_retrieval.spn.commands",          # cir spn generate
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cir", description="Composed image retrieval toolkit.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except CIRError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
