"""Shared fixtures: one tiny synthetic benchmark per test session (generated, never shipped)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def synth_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic benchmark at size tiny, seed 0, in CIRR format."""
    from composed_retrieval.synth.writer import write_synth

    out = tmp_path_factory.mktemp("synth") / "tiny"
    write_synth(out, seed=0, size="tiny", workers=1)
    return out
