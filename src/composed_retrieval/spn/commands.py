"""`cir spn generate`: SPN positives as extra training files in the dataset's own format.

Train with them by naming the output split: ``cir train ... --set extra_train_splits='["spn"]'``.
Static negatives need no command: add ``"spn_negatives": {"tau": 0.02}`` to a stage whose image
tower is frozen (``--set stages.1.spn_negatives.tau=0.02``); see ``spn/bank.py``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    spn = sub.add_parser("spn", help="SPN: generated positives (static negatives are a training-stage option)")
    spn_sub = spn.add_subparsers(dest="spn_command", metavar="SPN_COMMAND")
    spn_sub.required = True
    p = spn_sub.add_parser(
        "generate", help="write SPN triplets (image pairs + caption templates) as extra training files",
        description="Pair each training image with a partner drawn from a window of its image-similarity "
                    "ranks, caption both, and write '{B} instead of {A}'-style modification texts as a new "
                    "split in the dataset's own format (train with --set extra_train_splits='[\"spn\"]').")
    p.add_argument("--dataset", required=True, choices=["cirr", "fashioniq"])
    p.add_argument("--root", required=True, help="dataset folder (captions/ + image_splits/)")
    p.add_argument("--image-root", default=None, help="image folder when it is not --root")
    p.add_argument("--split", default="train", help="source split (default train)")
    p.add_argument("--out-split", default="spn", help="name of the generated split (default spn)")
    p.add_argument("--categories", default=None, help="FashionIQ categories, comma-separated (default all)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="run or checkpoint folder whose gallery embedding ranks the images (our choice: "
                                     "the features the bank stage scores with)")
    src.add_argument("--encoder", help="tiny | open_clip:<model>: rank with this separate image tower (SPN4CIR ranks "
                                       "with a separate model, UNICOM ViT-L/14)")
    p.add_argument("--encoder-checkpoint", default=None, help="weights for --encoder (default: random, tiny only useful for tests)")
    p.add_argument("--text-encoder", default=None,
                   help="tiny | open_clip:<model> | a run folder: whose tokenizer decides which texts fit (the text "
                        "tower you will train; SPN4CIR checks with its CIR model's clip.tokenize). Default: the "
                        "ranking model's")
    p.add_argument("--captioner", required=True,
                   help="scenes | file:PATH (JSON or TSV name->caption) | model:PATH (local transformers "
                        "image-to-text folder) | python:MODULE:FUNCTION (images -> captions)")
    p.add_argument("--window", default="20,100",
                   help="partner ranks 'lo,hi' among the other images (0 = the nearest neighbour, the image itself "
                        "is never counted), or 'all' (default 20,100; SPN4CIR counts the image itself as rank 0, so "
                        "its CLIP4Cir CIRR window 10000-15000 is 9999,14999 here)")
    p.add_argument("--per-image", type=int, default=1, help="partners per reference image (SPN --k, default 1)")
    p.add_argument("--max-triplets", type=int, default=None, help="keep this many triplets at random (SPN --K)")
    p.add_argument("--templates", default="0,1",
                   help="template indices: 0 '{B} instead of {A}', 1 'Unlike {A}, I want {B}', 2 '{B}' (default 0,1)")
    p.add_argument("--refer-only", action="store_true", help="only images that are references in the source split (SPN --refer)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same bytes)")
    p.add_argument("--cache-dir", default=None, help="feature cache (default ROOT/.feature_cache)")
    p.add_argument("--preprocess", default="targetpad", choices=["targetpad", "squarepad"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_generate)


def _templates(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ConfigError(f"--templates {text!r}: expected comma-separated indices such as 0,1") from None


def _tokenize_longer(encoder: Any, text: str, length: int) -> torch.Tensor | None:
    """``text``'s ids in a context of ``length`` tokens, from the encoder's own tokenizer; None
    when the tokenizer cannot be asked for another length."""
    from ..encoders.tokenizer import HashTokenizer

    tok = getattr(encoder, "tokenizer", None)
    if isinstance(tok, HashTokenizer):
        return HashTokenizer(tok.n_buckets, length)([text])
    try:                                   # open_clip's tokenizers take a context_length
        return tok([text], context_length=length)  # type: ignore[misc]
    except TypeError:
        return None


def fits_context(encoder: Any, text: str) -> bool:
    """Whether ``text`` fits the text tower's context with its begin and end tokens (SPN: the
    text ``clip.tokenize`` accepts, i.e. at most the context length, 77 for CLIP).

    A padded last position (id 0) means it fits with room; a full row is either an exact fit or
    a truncation, which tokenizing in one more position tells apart. A tokenizer that cannot
    be asked for another length keeps the conservative answer (a full row does not fit)."""
    ids = encoder.tokenize([text])
    if int(ids[0, -1]) == 0:
        return True
    longer = _tokenize_longer(encoder, text, ids.shape[1] + 1)
    return longer is not None and int(longer[0, -1]) == 0


def image_encoder(model: str | None, encoder: str | None, encoder_checkpoint: str | None,
                  device: torch.device) -> tuple[Any, Callable[[Any], torch.Tensor], dict[str, Any]]:
    """(encoder pair, features -> gallery-side vectors, what to record in the manifest)."""
    if model:
        from ..train.checkpoint import load_method
        method = load_method(model, device)
        return method.encoder, method.gallery_embedding, {"model": str(Path(model).resolve()), "method": method.name}
    from ..encoders.registry import build_encoder
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)       # a random-weight encoder is the same one for every --seed
        enc = build_encoder(encoder, checkpoint=encoder_checkpoint)
    enc = enc.to(device).eval()
    return enc, lambda f: f.pooled.float(), {"encoder": enc.config}


def cmd_generate(args: argparse.Namespace) -> int:
    from ..cache import FeatureCache
    from ..encoders.base import Features
    from ..train.loop import resolve_device
    from .captioners import build_captioner
    from .generate import SPNOptions, generate, parse_window

    start = time.perf_counter()
    device = resolve_device(args.device)
    opts = SPNOptions(dataset=args.dataset, root=args.root, split=args.split, out_split=args.out_split,
                      window=parse_window(args.window), per_image=args.per_image, max_triplets=args.max_triplets,
                      seed=args.seed, templates=_templates(args.templates), refer_only=args.refer_only,
                      image_root=args.image_root,
                      categories=[c for c in args.categories.split(",") if c] if args.categories else None,
                      captioner=args.captioner)
    opts.check()   # before the (slow) encoder and captioner are built
    captioner = build_captioner(args.captioner, args.root, args.split, str(device))
    encoder, to_vectors, source = image_encoder(args.model, args.encoder, args.encoder_checkpoint, device)
    text_side, text_source = encoder, source
    if args.text_encoder:
        is_run = Path(args.text_encoder).is_dir()
        text_side, _, text_source = image_encoder(args.text_encoder if is_run else None,
                                                  None if is_run else args.text_encoder, None, torch.device("cpu"))
    opts.extra = {"ranked_by": source, "texts_fitted_to": text_source}
    cache = FeatureCache(args.cache_dir or Path(args.root) / ".feature_cache")
    transform = encoder.image_transform(args.preprocess)

    @torch.no_grad()
    def encode(split, names: list[str]) -> torch.Tensor:  # type: ignore[no-untyped-def]
        cached = cache.get_or_build(encoder, f"{split.dataset}/{split.category or ''}/{split.split}/spn-rank",
                                    names, split.image_path, transform, batch_size=args.batch_size,
                                    store_tokens=False, device=device, progress=not args.quiet)
        feats = Features(cached.pooled.float().to(device), cached.tokens.float().to(device))
        return to_vectors(feats).float().cpu()

    manifest = generate(opts, captioner, encode, progress=not args.quiet,
                        fits=lambda text: fits_context(text_side, text))
    print(json.dumps({"out_split": args.out_split, "triplets": manifest["triplets"],
                      "duplicates_removed": len(manifest["duplicates_removed"]),
                      "texts_shortened_to_B": manifest["texts_shortened_to_B"], "files": manifest["files"],
                      "seconds": round(time.perf_counter() - start, 2)}))
    return 0
