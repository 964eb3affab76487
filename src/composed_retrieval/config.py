"""Run configuration: a JSON file, overridden from the command line, saved with the run."""
from __future__ import annotations

import copy
import json
import math
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
    "val_file": None,             # user data: a separate validation JSONL (default: the training file)
    "val_fraction": None,         # user data: validate on this held-out fraction of the training file
    "log_every": 20,
    "checkpoint_every_s": 60,     # best/ + last/ at most this often (0: every epoch) and at the end
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
    if isinstance(cfg.get("categories"), str):   # "dress,shirt" on the command line
        cfg["categories"] = [c for c in cfg["categories"].split(",") if c]
    try:
        validate_config(cfg)
    except ConfigError as exc:
        if not path or exc.path is not None:
            raise
        raise ConfigError(f"{exc}{' (after --set overrides)' if overrides else ''}", path) from None
    return cfg


def validate_config(cfg: dict[str, Any]) -> None:
    """The one place a run configuration is checked: every field's type and range, every
    number finite, before anything is built or loaded (``FIELDS`` lists the rules)."""
    unknown = sorted(set(cfg) - set(DEFAULTS) - {"spn", "notes"})
    if unknown:
        raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
    _check_finite(cfg, "")
    if not isinstance(cfg["stages"], list) or not cfg["stages"]:
        raise ConfigError("config field 'stages' must be a non-empty list of {name, epochs, lr}, "
                          f"found {_show(cfg['stages'])}")
    for key, rule in FIELDS.items():
        _check_field(f"'{key}'", cfg.get(key), rule)
    for i, st in enumerate(cfg["stages"]):
        if not isinstance(st, dict) or not isinstance(st.get("name"), str) or not st["name"]:
            raise ConfigError(f"config field stages[{i}] must be an object with a 'name', found {_show(st)}")
        for key, rule in STAGE_FIELDS.items():
            if key in st:
                _check_field(f"stages[{i}].{key}", st[key], rule)
        from .train.optim import check_stage_options
        check_stage_options(st, f"stages[{i}]")
    if cfg["dataset"] != "user":
        for key in ("val_file", "val_fraction"):
            if cfg.get(key) is not None:
                raise ConfigError(f"config field '{key}' applies only to --dataset user, not {cfg['dataset']}")
    if cfg.get("val_file") is not None and cfg.get("val_fraction") is not None:
        raise ConfigError("config fields 'val_file' and 'val_fraction' exclude each other: "
                          "validate on a separate file or on a held-out fraction of the training file")
    check_device(cfg["device"])


def check_device(name: Any, where: str = "config field 'device'") -> None:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, and a GPU that is really there."""
    import re

    if not isinstance(name, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", name):
        raise ConfigError(f"{where} must be auto, cpu, cuda, cuda:N or mps, found {_show(name)}")
    if name.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise ConfigError(f"{where} is {name!r}, but no CUDA GPU is available here "
                              f"(torch.cuda.is_available() is False); use --device cpu or auto")
        if ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
            raise ConfigError(f"{where} is {name!r}, but this machine has {torch.cuda.device_count()} "
                              f"CUDA device(s) (numbered from 0)")
    if name == "mps":
        import torch
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"{where} is 'mps', but Apple's MPS backend is not available here")


class Rule:
    """What one field accepts: a kind ('str', 'path', 'int', 'num', 'bool', 'names', 'dict'),
    whether null is allowed, the smallest value (``low``; ``above`` makes it exclusive), an
    upper bound, or the allowed names."""

    def __init__(self, kind: str, null: bool = False, low: float | None = None, above: bool = False,
                 high: float | None = None, choices: tuple[str, str] | None = None, exists: bool = False) -> None:
        self.kind, self.null, self.low, self.above, self.high = kind, null, low, above, high
        self._choices, self.exists = choices, exists

    @property
    def choices(self) -> tuple[str, ...] | None:
        """Allowed names, read from the module that defines them ((module, attribute))."""
        if self._choices is None:
            return None
        import importlib
        module, attr = self._choices
        return tuple(getattr(importlib.import_module(f"composed_retrieval.{module}"), attr))

    def wanted(self) -> str:
        text = {"str": "a string", "path": "a path string", "bool": "true or false",
                "file_spec": "a path string or an object with a 'file' path",
                "names": "a list of names", "dict": "an object"}.get(self.kind, "")
        if self.kind in ("int", "num"):
            text = "an integer" if self.kind == "int" else "a finite number"
            if self.low is not None:
                text += f" {'>' if self.above else '>='} {self.low:g}"
            if self.high is not None:
                text += f" and < {self.high:g}" if self.above else f" and <= {self.high:g}"
        if self.choices:
            text = "one of " + ", ".join(self.choices)
        return text + (" or null" if self.null else "")


def _show(value: Any) -> str:
    return json.dumps(value, default=str)[:80]


def _check_field(name: str, value: Any, rule: Rule) -> None:
    """One field against its rule; a boolean is never an integer and a string never a boolean."""
    if value is None and rule.null:
        return
    kind = rule.kind
    ok = {"str": isinstance(value, str) and bool(value), "path": isinstance(value, str) and bool(value),
          "bool": isinstance(value, bool), "dict": isinstance(value, dict),
          "int": isinstance(value, int) and not isinstance(value, bool),
          "num": isinstance(value, (int, float)) and not isinstance(value, bool),
          "names": isinstance(value, list) and all(isinstance(v, str) and v for v in value),
          # a file, or an object naming it ({file, image_root, ...}: data/pairs.py checks its keys)
          "file_spec": (isinstance(value, str) and bool(value)) or
                       (isinstance(value, dict) and isinstance(value.get("file"), str) and bool(value["file"]))}[kind]
    if ok and kind in ("int", "num"):
        ok = math.isfinite(value)
        if ok and rule.low is not None:
            ok = value > rule.low if rule.above else value >= rule.low
        if ok and rule.high is not None:
            ok = value < rule.high if rule.above else value <= rule.high
    choices = rule.choices if ok else None
    if choices:
        ok = all(v in choices for v in (value if isinstance(value, list) else [value]))
    if not ok:
        raise ConfigError(f"config field {name} must be {rule.wanted()}, found {_show(value)}")
    path = value.get("file") if isinstance(value, dict) else value
    if rule.exists and not Path(path).exists():
        raise ConfigError(f"config field {name}: {path} not found")


def _check_finite(node: Any, where: str) -> None:
    """NaN and infinity anywhere (method and encoder options included) are refused by name."""
    if isinstance(node, float) and not math.isfinite(node):
        shown = where if where.startswith("stages[") else f"'{where}'"
        raise ConfigError(f"config field {shown} must be a finite number, found {node}")
    if isinstance(node, dict):
        for k, v in node.items():
            _check_finite(v, f"{where}.{k}" if where else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _check_finite(v, f"{where}[{i}]" if where else f"[{i}]")


#: top-level fields: every key of DEFAULTS has a rule (tests/test_hardening.py checks that)
FIELDS: dict[str, Rule] = {
    "method": Rule("str"), "encoder": Rule("str"),
    "method_config": Rule("dict"), "encoder_config": Rule("dict"),
    "encoder_checkpoint": Rule("path", null=True),
    "init_from": Rule("path", null=True, exists=True),
    "dataset": Rule("str", choices=("data.registry", "DATASETS")),
    "root": Rule("path", null=True, exists=True), "image_root": Rule("path", null=True, exists=True),
    "categories": Rule("names", null=True, choices=("data.fashioniq", "FASHIONIQ_CATEGORIES")),
    "train_split": Rule("str"), "val_split": Rule("str"),
    "val_file": Rule("path", null=True, exists=True),
    "val_fraction": Rule("num", null=True, low=0, above=True, high=1),
    "extra_train_splits": Rule("names"), "extra_eval_splits": Rule("names"),
    "caption_policy": Rule("str", choices=("data.fashioniq", "CAPTION_POLICIES")),
    "preprocess": Rule("str", choices=("data.preprocess", "PREPROCESS_KINDS")),
    "stages": Rule("names"),   # checked element by element (STAGE_FIELDS); rule unused
    "batch_size": Rule("int", low=1), "weight_decay": Rule("num", low=0),
    "grad_clip": Rule("num", null=True, low=0), "seed": Rule("int", low=0),
    "amp": Rule("bool"), "device": Rule("str"), "num_workers": Rule("int", low=0),
    "eval_batch_size": Rule("int", low=1), "cache_dir": Rule("path", null=True),
    "preload_pixels_max_mb": Rule("num", low=0), "max_steps_per_epoch": Rule("int", null=True, low=1),
    "pairs": Rule("file_spec", null=True, exists=True), "log_every": Rule("int", low=1),
    "checkpoint_every_s": Rule("num", low=0),
}
del FIELDS["stages"]
#: fields of one stage (lr_mult and schedule: train.optim.check_stage_options)
STAGE_FIELDS: dict[str, Rule] = {
    "name": Rule("str"), "epochs": Rule("int", low=0), "lr": Rule("num", low=0),
    "weight_decay": Rule("num", low=0), "train_image_tower": Rule("bool"), "train_text_tower": Rule("bool"),
    "extra_train_splits": Rule("names"),
}
