"""`cir score` and `cir validate-submission`: score or check prediction files without images.

CIRR scoring needs both files: Recall_subset is read from the recall_subset file, as the CIRR
server does -- the top-50 list alone cannot give a subset ranking (subset members often rank
below 50).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..data.base import CIRSplit
from ..errors import ConfigError, DataError
from .protocols import Rankings, fashioniq_summary, metrics_from_rankings
from .submission import (Predictions, problems_error, read_predictions, validate_circo_submission,
                         validate_cirr_submission, validate_fashioniq_predictions)

SCORE_KEYS = {
    "cirr": ["recall@1", "recall@5", "recall@10", "recall@50",
             "recall_subset@1", "recall_subset@2", "recall_subset@3", "avg"],
    "fashioniq": [f"{c}_recall@{k}" for c in ("dress", "shirt", "toptee") for k in (10, 50)]
                 + ["avg_recall@10", "avg_recall@50", "avg"],
    "circo": ["map@5", "map@10", "map@25", "map@50"],
}


def _load(dataset: str, root: str, split: str, shared_concept: bool = False) -> list[CIRSplit]:
    from ..data.registry import load_splits
    options = {"use_shared_concept": True} if dataset == "circo" and shared_concept else {}
    return load_splits(dataset, root, split, check_images=False, **options)


def _rankings_for(split: CIRSplit, preds: Predictions) -> Rankings:
    rk = preds.to_rankings()
    if split.dataset != "fashioniq":
        return rk
    ids = {str(q["query_id"]) for q in split.queries}
    keep = [i for i, q in enumerate(rk.query_ids) if q in ids]
    return Rankings([rk.query_ids[i] for i in keep], [rk.names[i] for i in keep], None)


def score_predictions(dataset: str, splits: list[CIRSplit], preds: Predictions) -> dict[str, float]:
    """Validate prediction files against the splits, then compute the metrics (percent)."""
    if dataset == "cirr":
        if preds.subset is None:
            raise ConfigError("CIRR scoring needs the recall_subset file too (--subset-predictions); "
                              "the top-50 list cannot give the subset ranking")
        problems = validate_cirr_submission(splits[0], preds.raw, preds.raw_subset)
    elif dataset == "circo":
        problems = validate_circo_submission(splits[0], preds.raw)
    else:
        problems = validate_fashioniq_predictions(splits, preds.raw)
    if problems:
        raise problems_error(problems, f"{dataset} predictions", preds.path)
    if dataset == "fashioniq":
        per_cat = {sp.category: metrics_from_rankings(sp, _rankings_for(sp, preds)) for sp in splits}
        out = fashioniq_summary(per_cat)
    else:
        out = metrics_from_rankings(splits[0], preds.to_rankings())
    return {k: out[k] for k in SCORE_KEYS[dataset]}


def _score(args: argparse.Namespace) -> int:
    if args.circo_shared_concept and args.dataset != "circo":
        raise ConfigError("--circo-shared-concept applies only to --dataset circo")
    if args.subset_predictions is not None and args.dataset != "cirr":
        raise ConfigError("--subset-predictions applies only to --dataset cirr")
    preds = read_predictions(args.dataset, args.predictions, args.subset_predictions)
    splits = _load(args.dataset, args.root, args.split, args.circo_shared_concept)
    metrics = score_predictions(args.dataset, splits, preds)
    print(json.dumps(metrics))
    return 0


def _validate(args: argparse.Namespace) -> int:
    files = [Path(f) for f in args.files]
    splits = _load(args.dataset, args.root, args.split)
    split = splits[0]
    if args.dataset == "cirr":
        if len(files) != 2:
            raise ConfigError(f"CIRR needs two files (recall and recall_subset), got {len(files)}")
        preds = read_predictions("cirr", files[0], files[1])
        if preds.subset is None:   # read_predictions already insists on a recall file
            raise DataError("no CIRR file with \"metric\": \"recall_subset\" was given")
        problems = validate_cirr_submission(split, preds.raw, preds.raw_subset)
    else:
        if len(files) != 1:
            raise ConfigError(f"CIRCO needs one file, got {len(files)}")
        preds = read_predictions("circo", files[0])
        problems = validate_circo_submission(split, preds.raw)
    for p in problems:
        print(p)
    if problems:
        print(f"INVALID: {len(problems)} problem(s) in {', '.join(map(str, files))}")
        return 2
    print(f"OK: {', '.join(map(str, files))} valid for {args.dataset} {args.split} ({len(split.queries)} queries)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score prediction files against a split's annotations (no images needed)",
                       description="Print one JSON object of metrics in percent.")
    p.add_argument("--dataset", required=True, choices=["cirr", "fashioniq", "circo"])
    p.add_argument("--root", required=True, help="dataset folder: captions/ + image_splits/ (CIRR, FashionIQ) "
                                                  "or annotations/ (CIRCO)")
    p.add_argument("--split", default="val")
    p.add_argument("--predictions", required=True, help="CIRR recall file, FashionIQ or CIRCO prediction file")
    p.add_argument("--subset-predictions", default=None, help="CIRR recall_subset file (required for cirr)")
    p.add_argument("--circo-shared-concept", action="store_true",
                   help="load CIRCO queries with the shared concept (recorded only; scores do not depend on it)")
    p.set_defaults(func=_score)

    v = sub.add_parser("validate-submission", help="check CIRR/CIRCO submission files; every problem, one per line",
                       description="Exit 0 when valid, 2 otherwise.")
    v.add_argument("--dataset", required=True, choices=["cirr", "circo"])
    v.add_argument("--root", required=True)
    v.add_argument("--split", default=None,
                   help="default: test1 (cirr) / test (circo), or val when the file's query ids are val's")
    v.add_argument("files", nargs="+", help="cirr: the recall and recall_subset files (any order); circo: one file")
    v.set_defaults(func=_validate_with_default_split)


def _validate_with_default_split(args: argparse.Namespace) -> int:
    """Without --split: the test split (what servers take), or the split the file's ids belong to."""
    if args.split is None:
        args.split = _guess_split(args.dataset, args.root, args.files)
    return _validate(args)


def _guess_split(dataset: str, root: str, files: list[str]) -> str:
    candidates = ["test1", "val"] if dataset == "cirr" else ["test", "val"]
    ann = (lambda s: Path(root) / "captions" / f"cap.rc2.{s}.json") if dataset == "cirr" \
        else (lambda s: Path(root) / "annotations" / f"{s}.json")
    present = [s for s in candidates if ann(s).is_file()]
    if len(present) < 2:
        return present[0] if present else candidates[0]   # a missing file is reported by the loader
    try:
        keys = set(json.loads(Path(files[0]).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return candidates[0]   # unreadable file: reported properly by read_predictions
    overlap = {}
    for s in present:
        ids = {str(q["query_id"]) for q in _load(dataset, root, s)[0].queries}
        overlap[s] = len(ids & keys)
    return max(present, key=lambda s: overlap[s])   # ties keep the test split (listed first)
