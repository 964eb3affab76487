"""Reading weight files safely, for every backend and the registry.

Checkpoints are read with safetensors or ``torch.load(weights_only=True)`` only, so a weights
file can never run code; OpenAI's TorchScript archives (which ``weights_only`` refuses) go
through ``torch.jit.load``, whose loader only builds TorchScript types, never arbitrary Python
objects, and only their state dict is kept. Its own module so that backends import it (down)
and never the registry (which imports the backends).
"""
from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def is_torchscript_archive(path: str | Path) -> bool:
    """True for a TorchScript zip (it holds ``constants.pkl``, a torch.save zip does not)."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as zf:
            return any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in zf.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` from a .safetensors file, a torch.save file (optionally wrapped
    as ``{"state_dict": ...}`` and/or with DDP's ``module.`` prefix) or a TorchScript archive."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("checkpoint file not found", path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            obj: Any = load_file(str(path), device="cpu")
        elif is_torchscript_archive(path):
            obj = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            with warnings.catch_warnings():  # pickle-protocol warnings would break one-line errors
                warnings.simplefilter("ignore")
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only" not in str(exc):  # a truncated legacy pickle, not a refusal
            raise CheckpointError(f"corrupt or truncated file ({' '.join(str(exc).split())[:200]})", path) from None
        raise CheckpointError("checkpoint refused: it holds Python objects other than tensors "
                              "(nothing was executed); use a safetensors or state-dict file", path) from None
    except Exception as exc:  # truncated zip, bad header, ...
        raise CheckpointError(f"corrupt, truncated or unsupported checkpoint ({_one_line(exc)})", path) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError("expected a non-empty state dict of named tensors", path)
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def load_weights(module: torch.nn.Module, path: str | Path) -> None:
    """Load a state dict file into ``module`` strictly; a mismatch is a one-line CheckpointError."""
    state = read_state_dict(path)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint does not fit this encoder: {_one_line(exc)}", path) from None
