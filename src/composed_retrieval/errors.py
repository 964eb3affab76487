"""User-facing errors: one line that names the file or field and what was expected."""
from __future__ import annotations

from pathlib import Path


class CIRError(Exception):
    """An error caused by the user's input; the CLI prints it as one line and exits with code 2."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = str(path) if path is not None else None
        text = f"{self.path}: {message}" if self.path else message
        super().__init__(" ".join(text.split()))  # always one line


class DataError(CIRError):
    """Malformed or missing dataset files, images or entries."""


class ConfigError(CIRError):
    """Unknown names, bad option values or inconsistent configuration."""


class CheckpointError(CIRError):
    """Missing, truncated or tampered checkpoints and caches."""
