"""`cir`: one command line for data, training, evaluation, search and serving.

Each sub-command lives next to the code it drives, in a ``commands.py`` module that defines
``register(subparsers)``; this file only collects them and turns user errors into one line.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
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
        if getattr(args, "device", None) is not None:   # every command: a GPU that is not there
            from .config import check_device
            check_device(args.device, "--device")
        result = args.func(args)
    except CIRError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:   # the one place OS errors (disk full, permissions, a file as --out) become one line
        print(f"error: {os_error_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except RecursionError:
        print("error: input nested too deeply to process", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    return int(result or 0)


def os_error_line(exc: OSError) -> str:
    """``<path>: <reason>`` for an OSError, with a hint for the common ones."""
    reason = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
    hint = {errno.ENOSPC: " (the disk is full; free space and rerun the same command to resume)",
            errno.EDQUOT: " (disk quota exceeded)",
            errno.EACCES: " (permission denied)" if "ermission" not in reason else "",
            errno.EROFS: " (read-only file system)" if "ead-only" not in reason else "",
            errno.EEXIST: " (a file is in the way of a folder the command needs)",
            errno.ENOTDIR: " (a file is in the way of a folder the command needs)"}.get(exc.errno or 0, "")
    names = [os.fsdecode(n) for n in (exc.filename, exc.filename2) if n is not None]
    text = f"{' -> '.join(names)}: {reason}{hint}" if names else f"{reason}{hint}"
    return " ".join(text.split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
