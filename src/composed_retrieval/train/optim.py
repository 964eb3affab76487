"""The optimizer of a training stage: AdamW with optional per-module learning-rate multipliers
and a per-epoch cosine schedule, so paper recipes such as CaLa's (twice the lr for TAC and HCA,
cosine decay of the text encoder's lr only) are configs, not code.

Stage keys:

* ``"lr_mult": {"tac": 2.0, "hca": 2.0}``: parameters whose name in
  ``method.named_parameters()`` is the key or starts with ``key + "."`` get ``lr * mult``;
  every other trainable parameter forms group 0 with the stage's ``lr``.
* ``"schedule": {"name": "cosine", "max_epochs": 15, "min_lr": 0.0, "groups": "base"}``: before
  epoch ``e`` of the stage, ``lr_e = (lr0 - min_lr) * (1 + cos(pi * e / max_epochs)) / 2 + min_lr``
  (BLIP/CaLa ``cosine_lr_schedule``); ``groups`` "base" changes group 0 only (CaLa's
  ``onlyGroup0=True``), "all" scales every group the same way. ``{"name": "constant"}`` is the
  default.
* ``"eps": 1e-7``: AdamW's epsilon (default 1e-8, torch's); CLIP4Cir's stage 1 uses 1e-7.
  Adam without weight decay (CLIP4Cir's Combiner stage) is AdamW with ``"weight_decay": 0``.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError


def check_stage_options(stage: dict[str, Any], where: str) -> None:
    """Shape checks of ``lr_mult``/``schedule`` (one-line errors naming the field)."""
    mult = stage.get("lr_mult")
    if mult is not None:
        if not isinstance(mult, dict) or not all(isinstance(k, str) and isinstance(v, (int, float))
                                                  and not isinstance(v, bool) and v > 0 for k, v in mult.items()):
            raise ConfigError(f"config field {where}.lr_mult must map module names to positive numbers, "
                              f"e.g. {{\"tac\": 2.0}}")
    eps = stage.get("eps", 1e-8)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
        raise ConfigError(f"config field {where}.eps must be a number in (0, 1), got {eps!r}")
    sched = stage.get("schedule")
    if sched is not None:
        if not isinstance(sched, dict) or sched.get("name") not in ("constant", "cosine"):
            raise ConfigError(f"config field {where}.schedule must be {{\"name\": \"constant\"}} or "
                              f"{{\"name\": \"cosine\", \"max_epochs\": N, \"min_lr\": x, \"groups\": \"base\"|\"all\"}}")
        if sched["name"] == "cosine":
            m = sched.get("max_epochs", stage.get("epochs", 1))
            if not isinstance(m, int) or isinstance(m, bool) or m < 1:
                raise ConfigError(f"config field {where}.schedule.max_epochs must be a positive integer")
            low = sched.get("min_lr", 0.0)
            if not isinstance(low, (int, float)) or isinstance(low, bool) or low < 0:
                raise ConfigError(f"config field {where}.schedule.min_lr must be a non-negative number")
            if sched.get("groups", "base") not in ("base", "all"):
                raise ConfigError(f"config field {where}.schedule.groups must be 'base' or 'all'")


def build_optimizer(method: nn.Module, params: list[nn.Parameter], stage: dict[str, Any],
                    weight_decay: float) -> torch.optim.AdamW:
    lr = float(stage.get("lr", 1e-4))
    mult: dict[str, float] = {k: float(v) for k, v in (stage.get("lr_mult") or {}).items()}
    names = {id(p): n for n, p in method.named_parameters()}
    groups: dict[str, list[nn.Parameter]] = {"": []}
    used = set()
    for p in params:
        name = names.get(id(p), "")
        key = next((k for k in mult if name == k or name.startswith(k + ".")), "")
        groups.setdefault(key, []).append(p)
        used.add(key)
    unmatched = sorted(set(mult) - used)
    if unmatched:
        raise ConfigError(f"stage {stage.get('name')!r}: lr_mult names {unmatched[0]!r}, but no trainable "
                          f"parameter of {getattr(method, 'name', 'the method')} is under that name")
    param_groups = [{"params": ps, "lr": lr * mult.get(key, 1.0), "initial_lr": lr * mult.get(key, 1.0),
                     "module": key or "base"} for key, ps in groups.items() if ps]
    return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay, eps=float(stage.get("eps", 1e-8)))


def set_epoch_lr(optimizer: torch.optim.Optimizer, stage: dict[str, Any], epoch_in_stage: int) -> float:
    """Set this epoch's learning rates; returns group 0's (logged with the epoch)."""
    sched = stage.get("schedule") or {"name": "constant"}
    for group in optimizer.param_groups:
        lr0 = group.setdefault("initial_lr", group["lr"])   # a state saved before groups had one
        group.setdefault("module", "base")
        if sched["name"] == "cosine" and (sched.get("groups", "base") == "all" or group["module"] == "base"):
            max_epochs = int(sched.get("max_epochs", stage.get("epochs", 1)))
            low = float(sched.get("min_lr", 0.0))
            group["lr"] = (lr0 - low) * 0.5 * (1.0 + math.cos(math.pi * epoch_in_stage / max_epochs)) + low
        else:
            group["lr"] = lr0
    return float(optimizer.param_groups[0]["lr"])
