"""`cir train`, `cir eval`, `cir predict`, `cir demo`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a method (config file + CLI overrides)")
    _add_run_options(p)
    p.add_argument("--out", required=True, help="run folder (config.json, metrics.jsonl, curves.png, best/, last/)")
    p.add_argument("--no-resume", action="store_true", help="start over even if the run folder has a checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="validation metrics of a trained run, or of a pretrained model, as JSON",
                       description="Metrics in percent, plus the model and the gallery they were measured on. "
                                   "Without a run: cir eval --encoder hf_clip:DIR --method sum --dataset cirr --root DATA")
    from .models import add_model_options
    add_model_options(p)
    p.add_argument("--split", default=None, help="split to evaluate (default: the run's val split, else val)")
    _add_data_options(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="CIRR test1 / CIRCO test submission files, validated before writing")
    add_model_options(p)
    p.add_argument("--split", default=None, help="default: test1 (cirr), test (circo)")
    _add_data_options(p)
    p.add_argument("--out", required=True, help="folder for the submission files")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("demo", help="synthetic benchmark -> train -> evaluate -> HTML report (what `make demo` runs)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--method", default="combiner")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default="small", choices=["tiny", "small", "medium"])
    p.add_argument("--config", default=None, help="override the built-in demo config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default=None, choices=["cirr", "fashioniq", "circo", "user"],
                   help="default: the run's dataset, else cirr")
    p.add_argument("--root", default=None, help="dataset folder (default: the run's)")
    p.add_argument("--image-root", default=None)
    p.add_argument("--cache-dir", default=None,
                   help="feature cache folder (default: beside the run; a temporary one for --encoder)")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="JSON config file (see configs/)")
    p.add_argument("--method", help="method name (combiner, sum, image_only, text_only, dra, cala, ...)")
    p.add_argument("--dataset", choices=["cirr", "fashioniq", "circo", "user"])
    p.add_argument("--root", help="dataset folder (captions/ + image_splits/, or annotations/)")
    p.add_argument("--image-root", help="image folder when it is not --root")
    p.add_argument("--val-file", help="--dataset user: a separate validation JSONL (default: the training file)")
    p.add_argument("--val-fraction", type=float,
                   help="--dataset user: validate on this held-out fraction of --root's queries, e.g. 0.2")
    p.add_argument("--encoder", help="tiny | open_clip:<model> (e.g. open_clip:RN50x4)")
    p.add_argument("--encoder-checkpoint", help="local weights file for the encoder")
    p.add_argument("--init-from", help="run or checkpoint folder to initialise the weights from")
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:1")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set stages.0.epochs=3 --set method_config.w_tac=0.3")
    p.add_argument("--quiet", action="store_true")


def _explicit(args: argparse.Namespace) -> dict[str, Any]:
    return {"method": args.method, "dataset": args.dataset, "root": args.root, "image_root": args.image_root,
            "encoder": args.encoder, "encoder_checkpoint": args.encoder_checkpoint, "init_from": args.init_from,
            "seed": args.seed, "batch_size": args.batch_size, "device": args.device,
            "val_file": args.val_file, "val_fraction": args.val_fraction}


def cmd_train(args: argparse.Namespace) -> int:
    from ..config import load_config
    from .loop import Trainer

    from . import distributed

    cfg = load_config(args.config, args.set, _explicit(args))
    try:
        result = Trainer(cfg, args.out, resume=not args.no_resume, progress=not args.quiet).run()
        if distributed.is_main_process():  # under torchrun only rank 0 holds the results
            print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=2))
    finally:
        distributed.shutdown()
    return 0


def _run_config(run: str) -> tuple[Path, dict[str, Any]]:
    """The checkpoint folder and the training config saved with the run."""
    from ..fileio import read_json
    from .checkpoint import resolve_checkpoint

    folder = resolve_checkpoint(run)
    for cand in (folder / "config.json", folder.parent / "config.json"):
        if cand.is_file():
            return folder, read_json(cand, "run config")
    return folder, {}


class _EvalSetup:
    """The model, splits and trainer of `cir eval` / `cir predict`; a temporary feature cache
    (a spec has no run folder to keep one beside) is removed by ``close``."""

    def __init__(self, args: argparse.Namespace, default_split: str) -> None:
        import tempfile

        from ..config import DEFAULTS, merge
        from .loop import Trainer, load_data, resolve_device
        from .models import model_from_args, source_from_args

        source = source_from_args(args)
        self.tmp: str | None = None
        if isinstance(source, Path):
            folder, run_cfg = _run_config(str(source))
            run_dir = folder.parent if folder.name in ("best", "last") else folder
        else:
            run_cfg = {}
            if not args.root:
                raise ConfigError("--root (the dataset folder) is needed with --encoder")
            self.tmp = tempfile.mkdtemp(prefix="cir-eval-")
            run_dir = Path(self.tmp) / "eval"
        cfg = merge(DEFAULTS, run_cfg)
        for key in ("dataset", "root", "image_root", "cache_dir"):
            if getattr(args, key, None):
                cfg[key] = getattr(args, key)
        cfg["device"] = args.device
        self.split = args.split or (default_split if default_split != "val" else cfg["val_split"])
        try:    # a bad model or dataset must not leave the temporary cache behind
            self.method = model_from_args(args, resolve_device(args.device))
            self.splits = load_data(cfg, self.split, training=False)
            self.trainer = Trainer(cfg, run_dir, progress=not args.quiet)
        except BaseException:
            self.close()
            raise
        self.cfg = cfg

    def close(self) -> None:
        if self.tmp is not None:
            import shutil
            shutil.rmtree(self.tmp, ignore_errors=True)


def cmd_eval(args: argparse.Namespace) -> int:
    from .models import evaluate_loaded

    setup = _EvalSetup(args, "val")
    try:
        result = evaluate_loaded(setup.method, setup.splits, setup.trainer, setup.cfg)
    finally:
        setup.close()
    print(json.dumps(result, indent=2))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from ..evaluation import submission
    from ..evaluation.protocols import rank_split
    from ..evaluation.runner import describe_gallery, split_vectors
    from .models import describe_model

    dataset = args.dataset or (_run_config(args.run)[1].get("dataset") if args.run else "cirr")
    default = {"cirr": "test1", "circo": "test"}.get(dataset or "")
    if default is None:
        raise ConfigError(f"`cir predict` writes CIRR test1 or CIRCO test submissions, not {dataset!r}")
    setup = _EvalSetup(args, default)
    try:
        method, trainer, cfg = setup.method, setup.trainer, setup.cfg
        split = setup.splits[0]
        table = trainer.image_table(method, [split], split.split)[0]
        q, g = split_vectors(method, split, table, cfg["eval_batch_size"], trainer.device)
    finally:
        setup.close()
    rankings = rank_split(split, q, g, k=50)
    out = Path(args.out)
    if dataset == "cirr":
        paths = submission.write_cirr_submission(out, split, rankings)
    else:
        paths = submission.write_circo_submission(out / f"circo_{split.split}.json", split, rankings)
    print(json.dumps({"written": [str(p) for p in (paths if isinstance(paths, (list, tuple)) else [paths])],
                      "model": describe_model(method), "gallery": describe_gallery([split])}))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(Path(args.out), method=args.method, seed=args.seed, size=args.size,
                      config=args.config, overrides=args.set, progress=not args.quiet)
    print(json.dumps(result, indent=2))
    return 0
