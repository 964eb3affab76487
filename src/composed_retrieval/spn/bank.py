"""SPN static negatives: a second training stage against a fixed bank of every training image.

SPN (arXiv 2404.11317; public code github.com/BUAADreamer/SPN4CIR, ``clip4cir/models.py`` and
``clip4cir/train.py``) freezes the image tower in stage 2, encodes every unique training image
once (duplicates share one row), keeps the L2-normalised features as a static bank and trains
with ``CE(q @ bank.T / tau, target row)``. Its commands use tau 0.02 (CLIP4Cir, FashionIQ and
CIRR, lr 2e-5, 3 epochs, batch 256), 0.03 (BLIP4CIR FashionIQ, lr 5e-6) / 0.02 (BLIP4CIR CIRR,
lr 6e-6), 0.05 (BLIP-2, lr 1e-5), 0.02/0.01 (TG-CIR) and 0.02 for the zero-shot model (lr
2e-6); only the bank loss is optimised. The default here is CLIP4Cir's 0.02 (also in
``configs/spn_clip4cir.json``, SPN4CIR's CLIP4Cir stage 2); ``configs/demo_combiner.json`` and
``benchmarks/spn_table.py`` use 0.03, BLIP4CIR's FashionIQ value, which their README numbers
were measured with.
``--neg_num k`` instead scores each query against its target plus k other rows drawn at random
without replacement.

Here it is a stage option for every method (the loop calls :func:`spn_stage`)::

    {"name": "combiner", "epochs": 3, "lr": 2e-5, "spn_negatives": {"tau": 0.02, "k": null}}

Options: ``tau`` (> 0, SPN 0.01-0.05), ``k`` (null: the whole bank; n: n sampled negatives),
``method_loss_weight`` (default 0, SPN's setting: add the method's own loss times this weight),
``dedup`` (default true: images with identical file bytes share one bank row, so a duplicate of
the target is never a negative). The bank rows are ``method.gallery_embedding`` of the cached
image features of every image in the training splits (extra splits included), built once per
stage and saved to ``<run>/spn_bank/stage<i>.safetensors`` (+ ``.json``: names, duplicates, key),
and reused when a run resumes. The bank is a buffer of a module with no parameters, held by the
loop and never given to the optimizer. The query is ``method.query_from_batch`` (the method's
inference-time query), and the batch carries ``target_index`` (the targets' bank rows).

A method that trains on image-caption pairs (textual inversion) gets triplets in this stage:
its ``train_split`` plus ``extra_train_splits``; with ``train_split: "spn"`` the triplets are
SPN's generated ones only, which is SPN's zero-shot setting (no human-annotated triplets).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..encoders.base import Features
from ..errors import ConfigError, DataError
from ..fileio import atomic_write, atomic_write_json, read_json

OPTIONS = {"tau": 0.02, "k": None, "method_loss_weight": 0.0, "dedup": True}


class NegativeBank(nn.Module):
    """L2-normalised gallery vectors ``[N, d]`` as a (non-persistent) buffer, and name -> row.

    ``aliases`` maps duplicate image names to the row of the image they duplicate.
    """

    def __init__(self, vectors: torch.Tensor, names: Sequence[str], aliases: dict[str, str] | None = None,
                 normalize: bool = True) -> None:
        super().__init__()
        if vectors.dim() != 2 or vectors.shape[0] != len(names):
            raise ValueError(f"bank of {tuple(vectors.shape)} vectors for {len(names)} names")
        vectors = vectors.detach().float()
        # a saved bank is already normalised: normalising again would change its last bits
        self.register_buffer("vectors", F.normalize(vectors, dim=-1) if normalize else vectors, persistent=False)
        self.names = list(names)
        self.aliases = dict(aliases or {})
        self.row = {n: i for i, n in enumerate(self.names)}
        for dup, kept in self.aliases.items():
            self.row[dup] = self.row[kept]

    def __len__(self) -> int:
        return len(self.names)

    def rows(self, names: Sequence[str]) -> torch.Tensor:
        try:
            idx = [self.row[n] for n in names]
        except KeyError as exc:
            raise DataError(f"target image {exc.args[0]!r} is not in the SPN negative bank "
                            "(the bank holds the training splits' images)") from None
        return torch.tensor(idx, dtype=torch.long, device=self.vectors.device)


def sample_candidates(target_index: torch.Tensor, bank_size: int, k: int,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """``[B, k+1]`` bank rows: column 0 the target, then k distinct other rows (uniform)."""
    k = min(int(k), bank_size - 1)
    b = target_index.shape[0]
    # k distinct values among the bank_size - 1 non-target rows, then skip over the target
    noise = torch.rand(b, bank_size - 1, device=target_index.device, generator=generator)
    neg = noise.topk(k, dim=1).indices
    neg = neg + (neg >= target_index[:, None]).long()
    return torch.cat([target_index[:, None], neg], dim=1)


def bank_loss(query: torch.Tensor, bank: torch.Tensor, target_index: torch.Tensor, tau: float,
              k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """SPN's stage-2 loss: ``CE(q @ bank.T / tau, target)``, or over target + k sampled rows.

    Computed in float32 outside autocast: with tau 0.02 the logits span +-50, where bfloat16
    would round differences between close negatives away.
    """
    with torch.autocast(device_type=query.device.type, enabled=False):
        q = query.float()
        if k is None or k >= bank.shape[0] - 1:
            return F.cross_entropy(q @ bank.t() / tau, target_index)
        cand = sample_candidates(target_index, bank.shape[0], k, generator)
        logits = torch.einsum("bd,bkd->bk", q, bank[cand]) / tau
        return F.cross_entropy(logits, torch.zeros_like(target_index))


def read_options(stage: dict[str, Any]) -> dict[str, Any] | None:
    raw = stage.get("spn_negatives")
    if raw is None or raw is False:
        return None
    if raw is True:
        raw = {}
    where = f"stage {stage.get('name')!r}: spn_negatives"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be an object such as {{\"tau\": 0.02, \"k\": null}}")
    unknown = sorted(set(raw) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown option; expected {', '.join(OPTIONS)}")
    o = {**OPTIONS, **raw}
    if isinstance(o["tau"], bool) or not isinstance(o["tau"], (int, float)) or not o["tau"] > 0:
        raise ConfigError(f"{where}.tau must be a positive number (SPN uses 0.01-0.05), got {o['tau']!r}")
    if o["k"] is not None and (isinstance(o["k"], bool) or not isinstance(o["k"], int) or o["k"] < 1):
        raise ConfigError(f"{where}.k must be a positive integer or null (the whole bank), got {o['k']!r}")
    w = o["method_loss_weight"]
    if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
        raise ConfigError(f"{where}.method_loss_weight must be a number >= 0, got {w!r}")
    if not isinstance(o["dedup"], bool):
        raise ConfigError(f"{where}.dedup must be true or false, got {o['dedup']!r}")
    o["tau"], o["method_loss_weight"] = float(o["tau"]), float(w)
    return o


# ---- building, saving, loading -------------------------------------------------------------------
def _image_tower_hash(method: nn.Module) -> str:
    h = hashlib.sha256()
    for p in method.encoder.image_parameters():
        t = p.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def build_bank(method: Any, splits: Sequence[Any], tables: Sequence[Any], device: torch.device | str = "cpu",
               dedup: bool = True, batch_size: int = 4096) -> NegativeBank:
    """Bank of every unique image of the training splits from their feature tables."""
    from .generate import content_groups

    where: dict[str, tuple[Any, Any]] = {}
    for split, table in zip(splits, tables):
        for n in table.names:
            where.setdefault(n, (split, table))
    names = list(where)
    if not names:
        raise DataError("the SPN negative bank is empty: the training splits have no images")
    canonical = (content_groups(names, lambda n: where[n][0].image_path(n)) if dedup
                 else {n: n for n in names})
    kept = [n for n in names if canonical[n] == n]
    aliases = {n: canonical[n] for n in names if canonical[n] != n}
    was_training = method.training
    method.eval()
    parts = []
    for s in range(0, len(kept), batch_size):
        chunk = kept[s:s + batch_size]
        by_table: dict[int, list[int]] = {}
        for i, n in enumerate(chunk):
            by_table.setdefault(id(where[n][1]), []).append(i)
        out = None
        for rows in by_table.values():
            table = where[chunk[rows[0]]][1]
            f = table.take([chunk[i] for i in rows])
            v = method.gallery_embedding(Features(f.pooled.float(), f.tokens.float(), f.mask).to(device)).float()
            if out is None:
                out = torch.empty(len(chunk), v.shape[1], device=v.device)
            out[torch.tensor(rows, device=v.device)] = v
        parts.append(out)
    method.train(was_training)
    return NegativeBank(torch.cat(parts), kept, aliases).to(device)


def bank_key(method: Any, splits: Sequence[Any], tables: Sequence[Any], dedup: bool) -> str:
    h = hashlib.sha256(_image_tower_hash(method).encode())
    for s, t in zip(splits, tables):
        h.update(f"{s.dataset}|{s.category}|{s.split}|{len(t.names)}\n".encode())
        h.update("\n".join(t.names).encode())
    h.update(f"dedup={dedup}".encode())
    return h.hexdigest()


def save_bank(bank: NegativeBank, path: Path, key: str) -> None:
    """``path`` (.safetensors) then its ``.json`` sidecar, which marks the pair complete."""
    from safetensors.torch import save_file

    meta_path = path.with_suffix(".json")
    meta_path.unlink(missing_ok=True)
    atomic_write(path, lambda p: save_file({"vectors": bank.vectors.detach().cpu().contiguous()}, str(p)))
    atomic_write_json(meta_path, {"key": key, "names": bank.names, "aliases": bank.aliases,
                                  "shape": list(bank.vectors.shape), "file_size": path.stat().st_size},
                      indent=None)


def load_bank(path: Path, key: str) -> NegativeBank | None:
    """The saved bank when it belongs to ``key`` and is intact, else None (it is rebuilt)."""
    from safetensors.torch import load_file

    meta_path = path.with_suffix(".json")
    if not (meta_path.is_file() and path.is_file()):
        return None
    try:
        meta = read_json(meta_path, "SPN bank metadata")
        if meta.get("key") != key or path.stat().st_size != meta.get("file_size"):
            return None
        vectors = load_file(str(path))["vectors"]
        return NegativeBank(vectors, meta["names"], meta.get("aliases"), normalize=False)
    except Exception:   # a damaged bank is derived data: rebuild it
        return None


# ---- the loop's stage hook ---------------------------------------------------------------------
class StaticNegatives:
    """One training step's losses in an SPN negative stage (replaces ``method(batch)``)."""

    def __init__(self, bank: NegativeBank, options: dict[str, Any]) -> None:
        self.bank = bank
        self.options = options

    def __call__(self, method: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        o = self.options
        target_index = self.bank.rows(batch["target_name"])
        batch = {**batch, "target_index": target_index}
        query = method.query_from_batch(batch)
        loss = bank_loss(query, self.bank.vectors, target_index, o["tau"], o["k"])
        out = {"spn_negatives": loss.detach()}
        if o["method_loss_weight"] > 0:
            own = method(batch)
            loss = loss + o["method_loss_weight"] * own["loss"]
            out.update({f"method_{k}": v.detach() for k, v in own.items()})
        out["loss"] = loss
        return out


def spn_stage(trainer: Any, method: Any, stage: dict[str, Any], stage_index: int,
              splits: Sequence[Any], tables: Sequence[Any] | None) -> StaticNegatives | None:
    """The loop's hook: None for an ordinary stage, else the bank step (bank built or loaded)."""
    options = read_options(stage)
    if options is None:
        return None
    if not method.image_tower_frozen or tables is None:
        raise ConfigError(f"stage {stage['name']!r}: spn_negatives needs a frozen image tower "
                          "(set train_image_tower to false in this stage)")
    if not splits:
        raise ConfigError(f"stage {stage['name']!r}: spn_negatives needs training triplets")
    if getattr(getattr(trainer, "dist", None), "active", False):
        raise ConfigError(f"stage {stage['name']!r}: spn_negatives does not run under several processes "
                          "(torchrun) yet; train this stage in one process")
    path = Path(trainer.run_dir) / "spn_bank" / f"stage{stage_index}.safetensors"
    key = bank_key(method, splits, tables, options["dedup"])
    bank = load_bank(path, key)
    if bank is None:
        bank = build_bank(method, splits, tables, trainer.device, options["dedup"])
        save_bank(bank, path, key)
    return StaticNegatives(bank.to(trainer.device), options)


def stage_extras(cfg: dict[str, Any], stage: dict[str, Any] | None) -> list[str]:
    """Generated splits a stage trains on: its own ``extra_train_splits`` when it names them
    (SPN4CIR adds its positives only in the bank stage), else the run's."""
    if stage is not None and "extra_train_splits" in stage:
        return list(stage["extra_train_splits"] or [])
    return list(cfg.get("extra_train_splits") or [])


def training_splits(cfg: dict[str, Any], on_pairs: bool, base: list[Any],
                    load: Callable[[str], list[Any]], stage: dict[str, Any] | None = None) -> list[Any]:
    """The training splits of ``stage``: ``base`` plus its extra splits (generated positives);
    for a pairs method, triplets only when a stage trains against the bank."""
    extras = stage_extras(cfg, stage)
    if on_pairs:
        if not any(read_options(st) for st in cfg["stages"]):
            if extras or any(stage_extras(cfg, st) for st in cfg["stages"]):
                raise ConfigError("extra_train_splits: a method that trains on image-caption pairs uses "
                                  "triplets only in a stage with spn_negatives")
            return []
        base = load(cfg["train_split"])
    for name in extras:
        if name == cfg["train_split"]:
            raise ConfigError(f"extra_train_splits: {name!r} is already the train_split")
        base = base + load(name)
    return base


def describe_bank(bank: NegativeBank) -> str:
    return json.dumps({"rows": len(bank), "dim": int(bank.vectors.shape[1]), "duplicates": len(bank.aliases)})
