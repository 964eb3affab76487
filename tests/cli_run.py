"""Run `cir` in-process for a test: (exit code, stdout, stderr), whether it returns or exits."""
from __future__ import annotations

import pytest

from composed_retrieval.cli import main


def run_main(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err
