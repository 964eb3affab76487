"""One way to get a model for every command: a trained run folder OR an encoder spec.

A spec is an encoder (``hf_clip:DIR``, ``open_clip:ViT-L-14`` + a weights file,
``open_clip:DIR``, ``tiny``) plus a training-free method (``image_only``, ``text_only``,
``sum``), so a pretrained model is evaluated, indexed and served without faking a training
run. ``load_model`` is the single loader that ``cir eval / predict / index / search / serve /
zeroshot-eval`` and the Python API share; ``describe_model`` is what every results JSON and
index manifest records about the model that was actually used.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

import torch

from ..errors import ConfigError
from ..methods.base import CIRMethod

#: methods that need no training beyond the encoder: usable straight from a spec
TRAINING_FREE = ("image_only", "text_only", "sum")


@dataclass
class ModelSpec:
    """An encoder plus a training-free method; JSON-able (index manifests store it)."""

    encoder: str
    method: str = "sum"
    encoder_checkpoint: str | None = None
    random_weights: bool = False
    method_config: dict[str, Any] = field(default_factory=dict)
    encoder_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.encoder, str) or not self.encoder:
            raise ConfigError("model spec: 'encoder' must be a non-empty string, e.g. hf_clip:DIR")
        if self.method not in TRAINING_FREE:
            raise ConfigError(f"model spec: method {self.method!r} has trained parts; train it with "
                              f"`cir train` and pass the run folder (training-free: {', '.join(TRAINING_FREE)})")
        for name in ("method_config", "encoder_config"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"model spec: {name!r} must be an object")
        if self.encoder_checkpoint is not None:
            self.encoder_checkpoint = str(Path(self.encoder_checkpoint).resolve())
        self.encoder = _absolute_folder(self.encoder)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ModelSpec":
        if not isinstance(data, dict):
            raise ConfigError("model spec must be an object")
        known = {"encoder", "method", "encoder_checkpoint", "random_weights", "method_config", "encoder_config"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"model spec: unknown field(s) {', '.join(unknown)}")
        return cls(**data)


ModelSource = Union[str, Path, ModelSpec]


def _absolute_folder(encoder: str) -> str:
    """``hf_clip:rel/dir`` -> ``hf_clip:/abs/dir`` so a stored spec works from any directory."""
    for prefix in ("hf_clip:", "open_clip:"):
        if encoder.startswith(prefix):
            rest = encoder[len(prefix):]
            if prefix == "hf_clip:" or Path(rest).is_dir():
                return prefix + str(Path(rest).resolve())
    return encoder


def parse_source(source: ModelSource | dict[str, Any]) -> Path | ModelSpec:
    """A run/checkpoint folder path, a ModelSpec, a spec dict, or an encoder string
    (``"hf_clip:DIR"``: that encoder with the ``sum`` method)."""
    if isinstance(source, ModelSpec):
        return source
    if isinstance(source, dict):
        return ModelSpec.from_json(source)
    text = str(source)
    if isinstance(source, str) and ":" in text.split("/", 1)[0] and not Path(text).exists():
        return ModelSpec(encoder=text)
    if isinstance(source, str) and text == "tiny":
        return ModelSpec(encoder="tiny")
    return Path(source)


def load_model(source: ModelSource | dict[str, Any], device: str | torch.device = "cpu") -> CIRMethod:
    """The method to run, in eval mode on ``device``: a trained run/checkpoint folder, or a spec."""
    from ..encoders.registry import build_encoder
    from ..methods.registry import build_method
    from .checkpoint import load_method

    parsed = parse_source(source)
    if isinstance(parsed, Path):
        method = load_method(parsed, device=device)
        method.source = {"run": str(parsed.resolve())}
        return method
    if parsed.encoder == "tiny" and parsed.encoder_checkpoint is None and not parsed.random_weights:
        raise ConfigError("encoder tiny without --encoder-checkpoint (e.g. RUN/encoder.safetensors from "
                          "`cir pretrain`) is an untrained random model; ask for that with --random-weights")
    kwargs = dict(parsed.encoder_config)
    if parsed.random_weights:
        kwargs["random_weights"] = True
    encoder = build_encoder(parsed.encoder, checkpoint=parsed.encoder_checkpoint, **kwargs)
    method = build_method(parsed.method, encoder, parsed.method_config)
    method.source = {"spec": parsed.to_json()}
    return method.to(device).eval()


def describe_model(method: CIRMethod) -> dict[str, Any]:
    """What a results JSON / index manifest records: where the model came from, the method and
    its config, and the encoder (name, options, weights file)."""
    from .loop import method_options

    return {
        **(getattr(method, "source", None) or {}),
        "method": method.name,
        "method_config": dict(method.config or {}),
        "method_options": method_options(method),     # defaults included, e.g. the sum's fusion
        "encoder": dict(method.encoder.config),
    }


def evaluate_loaded(method: CIRMethod, splits: list[Any], trainer: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    """Metrics of ``method`` on loaded splits plus the model and gallery they were measured on:
    the one evaluation body of ``cir eval`` and the Python API."""
    from ..evaluation.runner import describe_gallery, evaluate_method

    if not splits[0].has_targets:
        raise ConfigError(f"split {splits[0].split!r} has no targets; use `cir predict` for test splits")
    tables = trainer.image_table(method, splits, splits[0].split)
    metrics = evaluate_method(method, splits, tables, cfg["eval_batch_size"], trainer.device)
    return {**metrics, "model": describe_model(method), "gallery": describe_gallery(splits)}


# ---- command-line options -------------------------------------------------------------------
def add_model_options(p: argparse.ArgumentParser, run_flag: str = "--run", required: bool = True,
                      run_help: str = "run folder or checkpoint folder", method_default: str | None = "sum") -> None:
    """``RUN_FLAG FOLDER`` or ``--encoder SPEC [--encoder-checkpoint F] --method M [--random-weights]``."""
    g = p.add_argument_group("model (a trained run, or a pretrained encoder with a training-free method)")
    g.add_argument(run_flag, dest="run", help=run_help)
    g.add_argument("--encoder", help="instead of a run: hf_clip:DIR | open_clip:MODEL (with --encoder-checkpoint) "
                                     "| open_clip:DIR | tiny")
    g.add_argument("--encoder-checkpoint", help="local weights file for --encoder open_clip:MODEL")
    g.add_argument("--method", default=None,
                   help=f"training-free method with --encoder: {', '.join(TRAINING_FREE)} "
                        f"(default {method_default}); with a run: evaluate this method on the run's towers")
    g.add_argument("--method-config", default=None, metavar="JSON",
                   help='method options as a JSON object, e.g. \'{"logit_scale": 100}\'')
    g.add_argument("--random-weights", action="store_true",
                   help="allow an encoder without weights (random, seed 0): for tests only")
    p.set_defaults(_model_required=required, _run_flag=run_flag, _method_default=method_default)


def _method_config(args: argparse.Namespace) -> dict[str, Any]:
    text = getattr(args, "method_config", None)
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--method-config is not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(value, dict):
        raise ConfigError("--method-config must be a JSON object")
    return value


def source_from_args(args: argparse.Namespace) -> Path | ModelSpec | None:
    """The model the options name: a run folder, a spec, or None (optional and not given)."""
    flag = getattr(args, "_run_flag", "--run")
    if args.run and args.encoder:
        raise ConfigError(f"give either {flag} (a trained run) or --encoder (a pretrained encoder), not both")
    if args.run:
        if args.encoder_checkpoint or args.random_weights:
            raise ConfigError(f"--encoder-checkpoint / --random-weights go with --encoder, not {flag}")
        if args.method_config and not args.method:
            raise ConfigError("--method-config needs --method (a run brings its own method and options)")
        return Path(args.run)
    if not args.encoder:
        if args.encoder_checkpoint or args.random_weights or args.method_config:
            raise ConfigError("--encoder-checkpoint / --random-weights / --method-config need --encoder")
        if getattr(args, "_model_required", True):
            raise ConfigError(f"give {flag} FOLDER (a trained run) or --encoder SPEC --method "
                              f"{{{','.join(TRAINING_FREE)}}} (a pretrained model)")
        return None
    method = args.method or getattr(args, "_method_default", None) or "sum"
    return ModelSpec(encoder=args.encoder, method=method, encoder_checkpoint=args.encoder_checkpoint,
                     random_weights=bool(args.random_weights), method_config=_method_config(args))


def model_from_args(args: argparse.Namespace, device: str | torch.device = "cpu") -> CIRMethod | None:
    """Load what the options name; with a run, ``--method`` swaps in a training-free method on
    the run's towers."""
    from ..methods.registry import build_method

    source = source_from_args(args)
    if source is None:
        return None
    method = load_model(source, device)
    if isinstance(source, Path) and getattr(args, "method", None):
        run_source = method.source
        method = build_method(args.method, method.encoder, _method_config(args)).to(device).eval()
        method.source = run_source
    return method
