"""`cir pretrain` (tiny towers on image-caption pairs) and `cir zeroshot-eval`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="CLIP-style pre-training of the tiny towers on image-caption pairs")
    p.add_argument("--root", help="synthetic benchmark folder (uses pairs/train.tsv and pairs/val.tsv)")
    p.add_argument("--pairs", help="pair file (TSV/CSV: image, caption) instead of --root")
    p.add_argument("--val-pairs", help="pair file for the caption->image sanity recall")
    p.add_argument("--image-root", help="folder relative image paths start from (default: the file's folder)")
    p.add_argument("--out", required=True, help="folder for encoder.safetensors + pretrain.json")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-pairs", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("zeroshot-eval", help="zero-shot metrics (CIRR, FashionIQ both caption orders, CIRCO)")
    from ..train.models import add_model_options
    add_model_options(p, required=False, method_default=None,
                      run_help="a trained textual_inversion run or checkpoint folder")
    p.add_argument("--phi", help="a released inversion network (SEARLE / LinCIR 'Phi', Pic2Word "
                                 "'state_dict_img2text') used as textual_inversion's phi on --encoder")
    p.add_argument("--phi-layout", default="auto", choices=["auto", "searle", "lincir", "pic2word"])
    p.add_argument("--dataset", required=True, choices=["cirr", "fashioniq", "circo"])
    p.add_argument("--root", required=True)
    p.add_argument("--image-root")
    p.add_argument("--split", default="val")
    p.add_argument("--single-order", action="store_true", help="FashionIQ: only 'c1 and c2' (default: both orders)")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_zeroshot_eval)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from ..train.pretrain import pretrain_tiny

    if bool(args.root) == bool(args.pairs):
        raise ConfigError("give exactly one of --root (synthetic benchmark) or --pairs (a pair file)")
    if args.root:
        root = Path(args.root)
        pairs, image_root = root / "pairs" / "train.tsv", args.image_root or root
        val = args.val_pairs or (root / "pairs" / "val.tsv" if (root / "pairs" / "val.tsv").is_file() else None)
    else:
        pairs, image_root, val = Path(args.pairs), args.image_root, args.val_pairs
    result = pretrain_tiny(pairs, args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                           seed=args.seed, val_pairs=val, image_root=image_root, max_pairs=args.max_pairs,
                           progress=not args.quiet)
    keys = ("checkpoint", "n_pairs", "seconds", "history", "val_caption_to_image_r1")
    print(json.dumps({k: result[k] for k in keys if k in result}))
    return 0


def evaluate_zeroshot(method: Any, dataset: str, root: str, split: str, image_root: str | None = None,
                      device: str = "auto", both_orders: bool = True, progress: bool = False,
                      cache_dir: str | None = None) -> dict[str, float]:
    """Load a split, encode its images with the method's (frozen) image tower, score it."""
    from ..config import DEFAULTS, merge
    from ..train.loop import Trainer, load_data
    from .evaluate import zeroshot_evaluate

    cfg = merge(DEFAULTS, {"dataset": dataset, "root": root, "image_root": image_root, "device": device})
    import contextlib
    import tempfile

    # the feature cache lives beside the trainer's run folder: a temporary one (removed at the
    # end, also on an error) unless given, as api.evaluate does
    with (contextlib.nullcontext(cache_dir) if cache_dir else
          tempfile.TemporaryDirectory(prefix="cir-zeroshot-", ignore_cleanup_errors=True)) as base:
        trainer = Trainer(cfg, Path(base) / "eval", progress=progress)
        method = method.to(trainer.device)
        splits = load_data(cfg, split, training=False)
        if not splits[0].has_targets:
            raise ConfigError(f"split {split!r} has no targets; zero-shot evaluation needs a validation split")
        tables = trainer.image_table(method, splits, f"zeroshot-{split}")
        return zeroshot_evaluate(method, splits, tables, cfg["eval_batch_size"], trainer.device, both_orders)


def cmd_zeroshot_eval(args: argparse.Namespace) -> int:
    from ..evaluation.runner import describe_gallery
    from ..train.models import describe_model, model_from_args

    if args.phi:
        method = _imported_phi_method(args)
    else:
        if not args.run and not args.encoder:
            if not args.method:
                raise ConfigError("give --run (a trained textual_inversion run), --encoder SPEC --method M, "
                                  "or --encoder SPEC --phi FILE")
            args.encoder = "tiny"   # the built-in towers (e.g. with --encoder-checkpoint from cir pretrain)
        method = model_from_args(args)
    metrics = evaluate_zeroshot(method, args.dataset, args.root, args.split, args.image_root, args.device,
                                not args.single_order, progress=not args.quiet)
    from ..config import DEFAULTS, merge
    from ..train.loop import load_data
    splits = load_data(merge(DEFAULTS, {"dataset": args.dataset, "root": args.root, "image_root": args.image_root}),
                       args.split, training=False)
    print(json.dumps({**metrics, "model": describe_model(method), "gallery": describe_gallery(splits)}, indent=2))
    return 0


def _imported_phi_method(args: argparse.Namespace) -> Any:
    """textual_inversion on the --encoder spec, its phi taken from a released checkpoint."""
    from ..encoders.registry import build_encoder
    from ..methods.registry import build_method
    from ..train.models import ModelSpec, _method_config
    from .importers import import_phi

    if args.run or not args.encoder:
        raise ConfigError("--phi goes with --encoder SPEC (the CLIP the network was trained for), not --run")
    if args.method not in (None, "textual_inversion"):
        raise ConfigError("--phi makes the method textual_inversion; drop --method")
    spec = ModelSpec(encoder=args.encoder, encoder_checkpoint=args.encoder_checkpoint,
                     random_weights=bool(args.random_weights))
    kwargs = {"random_weights": True} if spec.random_weights else {}
    encoder = build_encoder(spec.encoder, checkpoint=spec.encoder_checkpoint, **kwargs)
    method = build_method("textual_inversion", encoder, _method_config(args)).eval()
    layout = import_phi(method, args.phi, args.phi_layout)
    spec_json = {k: v for k, v in spec.to_json().items() if k != "method"}
    method.source = {"spec": spec_json, "phi": {"file": str(Path(args.phi).resolve()), "layout": layout}}
    return method
