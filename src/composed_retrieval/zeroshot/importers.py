"""Released textual-inversion networks -> the phi of our ``textual_inversion`` method.

Checkpoint layouts (read with ``torch.load(weights_only=True)``: tensors only, no code runs):

* SEARLE (``SEARLE_ViT-B32.pt`` etc., hubconf.py): ``{"Phi": state_dict}`` of
  ``Phi(input_dim, hidden_dim, output_dim, dropout)`` = Linear-GELU-Dropout-Linear-GELU-Dropout-
  Linear, keys ``layers.{0,3,6}.{weight,bias}``: exactly our ``Phi``, so the tensors map 1:1.
* LinCIR (validate.py ``--eval_type phi``): the same ``{"Phi": state_dict}`` of the same
  architecture (LinCIR's models.py copies SEARLE's Phi); input = CLIP projection dim, output =
  text width.
* Pic2Word (``state_dict_img2text``, saved from DistributedDataParallel, hence ``module.``):
  ``IM2TEXT(embed_dim, middle_dim, output_dim, n_layer)`` = n_layer x (Linear-Dropout-ReLU)
  then ``fc_out``; a different architecture, so it becomes a :class:`Pic2WordPhi` of that exact
  shape (keys ``layers.{i}.0``, ``fc_out``).

All three feed phi the unnormalised pooled image feature, as our method does; dims are read
from the tensors and checked against the encoder (input = pooled dim, output = word-embedding
width). Dropout is irrelevant at inference (eval mode).
"""
from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..methods.textual_inversion import Phi

LAYOUTS = ("searle", "lincir", "pic2word")


class Pic2WordPhi(nn.Module):
    """Pic2Word's IM2TEXT architecture: n_layer x (Linear, Dropout, ReLU), then ``fc_out``."""

    def __init__(self, dim: int, middle: int, out: int, n_layer: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        blocks, width = [], dim
        for _ in range(n_layer):
            blocks.append(nn.Sequential(nn.Linear(width, middle), nn.Dropout(dropout), nn.ReLU()))
            width = middle
        self.layers = nn.Sequential(*blocks)
        self.fc_out = nn.Linear(middle, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.layers(x))


def _load(path: Path) -> object:
    if not path.is_file():
        raise CheckpointError("inversion network file not found", path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only" in str(exc):
            raise CheckpointError("refused: the file holds Python objects other than tensors "
                                  "(nothing was executed)", path) from None
        raise CheckpointError(f"corrupt or truncated file ({' '.join(str(exc).split())[:200]})", path) from None
    except Exception as exc:
        raise CheckpointError(f"unreadable inversion network ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:200]})", path) from None


def read_inversion(path: str | Path, layout: str = "auto") -> tuple[str, dict[str, torch.Tensor]]:
    """(layout, state dict without wrappers) of a released inversion-network file."""
    path = Path(path)
    if layout not in ("auto", *LAYOUTS):
        raise CheckpointError(f"unknown layout {layout!r}; expected auto or one of {', '.join(LAYOUTS)}", path)
    obj = _load(path)
    if not isinstance(obj, dict):
        raise CheckpointError("expected a dict holding 'Phi' (SEARLE, LinCIR) or 'state_dict_img2text' (Pic2Word)", path)
    if "state_dict_img2text" in obj and layout in ("auto", "pic2word"):
        found, state = "pic2word", obj["state_dict_img2text"]
    elif "Phi" in obj and layout in ("auto", "searle", "lincir"):
        found, state = (layout if layout != "auto" else "searle"), obj["Phi"]
    else:
        want = {"pic2word": "'state_dict_img2text'", "searle": "'Phi'", "lincir": "'Phi'"}.get(layout,
                                                                                            "'Phi' or 'state_dict_img2text'")
        raise CheckpointError(f"no {want} entry (keys: {', '.join(map(str, list(obj)[:6]))})", path)
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("the inversion network entry is not a state dict of tensors", path)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return found, dict(state)


def build_phi(layout: str, state: dict[str, torch.Tensor], path: Path) -> nn.Module:
    """A module of the checkpoint's architecture with its weights loaded strictly."""
    try:
        if layout == "pic2word":
            idx = sorted({int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.0\.weight$", k))})
            first = state["layers.0.0.weight"]
            module: nn.Module = Pic2WordPhi(first.shape[1], first.shape[0], state["fc_out.weight"].shape[0],
                                            n_layer=len(idx))
        else:
            w0, w6 = state["layers.0.weight"], state["layers.6.weight"]
            module = Phi(w0.shape[1], w0.shape[0], w6.shape[0], dropout=0.5)
        module.load_state_dict(state, strict=True)
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"does not fit the {layout} architecture ({' '.join(str(exc).split())[:200]})",
                              path) from None
    return module.eval()


def import_phi(method: nn.Module, path: str | Path, layout: str = "auto") -> str:
    """Replace ``method.phi`` (a textual_inversion method) by the released network; returns
    the layout found. Refuses a network whose dims do not fit the method's encoder."""
    path = Path(path)
    found, state = read_inversion(path, layout)
    phi = build_phi(found, state, path)
    enc = method.encoder
    probe = torch.zeros(1, enc.embed_dim)
    try:
        with torch.no_grad():
            out = phi(probe)
    except RuntimeError:
        first = next(p for p in phi.parameters() if p.dim() == 2)
        raise CheckpointError(f"{found} network takes {first.shape[1]}-d image features, the encoder "
                              f"gives {enc.embed_dim}-d", path) from None
    if out.shape[-1] != enc.text_token_dim:
        raise CheckpointError(f"{found} network gives {out.shape[-1]}-d pseudo-words, the encoder's word "
                              f"embeddings are {enc.text_token_dim}-d", path)
    method.phi = phi.to(next(method.parameters()).device)
    return found
