"""Run configuration: a JSON file, overridden from the command line, saved with the run."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .fileio import read_json

DEFAULTS: dict[str, Any] = {
    "method": "combiner",
    "method_config": {},
    "encoder": "tiny",
    "encoder_config": {},
    "encoder_checkpoint": None,   # weights of the towers (open_clip file, or a run to start from)
    "init_from": None,            # a run or checkpoint folder whose weights initialise this run
    "dataset": "cirr",
    "root": None,
    "image_root": None,
    "categories": None,           # FashionIQ categories (default: all three)
    "train_split": "train",
    "extra_train_splits": [],     # more training files in the dataset's format (SPN positives)
    "val_split": "val",
    "extra_eval_splits": [],      # e.g. ["heldout"] on the synthetic benchmark
    "caption_policy": "random",   # FashionIQ training captions
    "preprocess": "targetpad",
    "stages": [{"name": "main", "epochs": 5, "lr": 1e-4}],
    "batch_size": 64,
    "weight_decay": 0.01,
    "grad_clip": 1.0,
    "seed": 0,
    "amp": True,                  # only on CUDA
    "device": "auto",
    "num_workers": 0,
    "eval_batch_size": 256,
    "cache_dir": None,            # feature cache for frozen towers (default: <run>/../.cache)
    "preload_pixels_max_mb": 2048,
    "max_steps_per_epoch": None,  # for smoke tests
    "pairs": None,                # zero-shot methods: image-caption TSV/CSV (data/pairs.py)
    "log_every": 20,
}


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; lists and scalars in ``override`` replace those in ``base``."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_value(text: str) -> Any:
    """CLI override values: JSON when it parses (numbers, bools, lists, null), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(cfg: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``key=value`` and dotted ``a.b=value`` (``stages.0.epochs=3`` indexes lists)."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        parts = key.split(".")
        node: Any = cfg
        for p in parts[:-1]:
            if isinstance(node, list):
                try:
                    node = node[int(p)]
                except (ValueError, IndexError):
                    raise ConfigError(f"override {key!r}: {p!r} is not an index of a list of {len(node)}") from None
            else:
                node = node.setdefault(p, {})
        last = parts[-1]
        if isinstance(node, list):
            try:
                node[int(last)] = parse_value(value)
            except (ValueError, IndexError):
                raise ConfigError(f"override {key!r}: {last!r} is not an index of a list of {len(node)}") from None
        else:
            node[last] = parse_value(value)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                explicit: dict[str, Any] | None = None) -> dict[str, Any]:
    """Defaults < config file < explicit CLI flags < ``--set`` overrides."""
    cfg = copy.deepcopy(DEFAULTS)
    if path:
        file_cfg = read_json(path, "config file")
        if not isinstance(file_cfg, dict):
            raise ConfigError("config file must hold a JSON object", path)
        cfg = merge(cfg, file_cfg)
    if explicit:
        cfg = merge(cfg, {k: v for k, v in explicit.items() if v is not None})
    cfg = apply_overrides(cfg, overrides or [])
    try:
        validate_config(cfg)
    except ConfigError as exc:
        if not path or exc.path is not None:
            raise
        raise ConfigError(f"{exc}{' (after --set overrides)' if overrides else ''}", path) from None
    return cfg


def validate_config(cfg: dict[str, Any]) -> None:
    unknown = sorted(set(cfg) - set(DEFAULTS) - {"spn", "notes"})
    if unknown:
        raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
    if not isinstance(cfg["stages"], list) or not cfg["stages"]:
        raise ConfigError("config field 'stages' must be a non-empty list of {name, epochs, lr}")
    for i, st in enumerate(cfg["stages"]):
        if not isinstance(st, dict) or "name" not in st:
            raise ConfigError(f"config field stages[{i}] must be an object with a 'name'")
        for key in ("epochs",):
            if not isinstance(st.get(key, 1), int) or st.get(key, 1) < 0:
                raise ConfigError(f"config field stages[{i}].{key} must be a non-negative integer")
    if not isinstance(cfg["batch_size"], int) or cfg["batch_size"] < 1:
        raise ConfigError("config field 'batch_size' must be a positive integer")
    _check_types(cfg)


# field -> (accepted types, smallest value for numbers, what the message asks for)
_NUM = (int, float)
_FIELD_TYPES: dict[str, tuple[tuple[type, ...], float | None, str]] = {
    "method": ((str,), None, "a string"), "encoder": ((str,), None, "a string"),
    "dataset": ((str,), None, "a string"), "preprocess": ((str,), None, "a string"),
    "train_split": ((str,), None, "a string"), "val_split": ((str,), None, "a string"),
    "caption_policy": ((str,), None, "a string"), "device": ((str,), None, "a string"),
    "root": ((str, type(None)), None, "a path string"), "image_root": ((str, type(None)), None, "a path string"),
    "encoder_checkpoint": ((str, type(None)), None, "a path string"),
    "init_from": ((str, type(None)), None, "a path string"), "cache_dir": ((str, type(None)), None, "a path string"),
    "method_config": ((dict,), None, "an object"), "encoder_config": ((dict,), None, "an object"),
    "extra_train_splits": ((list,), None, "a list of split names"),
    "extra_eval_splits": ((list,), None, "a list of split names"),
    "categories": ((list, str, type(None)), None, "a list of category names"),
    "seed": ((int,), 0, "a non-negative integer"), "amp": ((bool,), None, "true or false"),
    "num_workers": ((int,), 0, "a non-negative integer"), "eval_batch_size": ((int,), 1, "a positive integer"),
    "log_every": ((int,), 1, "a positive integer"),
    "max_steps_per_epoch": ((int, type(None)), 1, "a positive integer or null"),
    "weight_decay": (_NUM, 0, "a non-negative number"), "grad_clip": (_NUM + (type(None),), 0, "a non-negative number or null"),
    "preload_pixels_max_mb": (_NUM, 0, "a non-negative number"),
}


def _check_types(cfg: dict[str, Any]) -> None:
    """Wrong-typed fields fail here, with their name, instead of deep inside training."""
    for key, (kinds, low, wanted) in _FIELD_TYPES.items():
        value = cfg.get(key)
        bad = not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
        if not bad and low is not None and isinstance(value, _NUM) and not isinstance(value, bool):
            bad = value < low
        if not bad and isinstance(value, list):
            bad = not all(isinstance(v, str) for v in value)
        if bad:
            raise ConfigError(f"config field '{key}' must be {wanted}, found {json.dumps(value, default=str)[:80]}")
    from .train.optim import check_stage_options

    for i, st in enumerate(cfg["stages"]):
        if "extra_train_splits" in st and not (isinstance(st["extra_train_splits"], list)
                                               and all(isinstance(v, str) for v in st["extra_train_splits"])):
            raise ConfigError(f"config field stages[{i}].extra_train_splits must be a list of split names, "
                              f"found {json.dumps(st['extra_train_splits'], default=str)[:80]}")
        check_stage_options(st, f"stages[{i}]")
        for key in ("lr", "weight_decay"):
            if key in st and (not isinstance(st[key], _NUM) or isinstance(st[key], bool) or st[key] < 0):
                raise ConfigError(f"config field stages[{i}].{key} must be a non-negative number, "
                                  f"found {json.dumps(st[key], default=str)[:80]}")
