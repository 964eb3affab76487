"""SPN on the synthetic benchmark: does scaling positives and negatives help each method?

For Combiner, DRA and CaLa on the tiny encoder, four variants under the same budget (the same
stages, epochs and optimizer steps per epoch), over several seeds. Every run has SPN's two
stages: stage 1 is the method's own training on the real triplets for ``--epochs1`` epochs
(the towers train; ``--freeze-image1`` keeps the image tower frozen), stage 2 freezes the image
tower and trains the text tower and the method for ``--epochs2`` epochs (as SPN4CIR's second
stage does; ``--frozen-text`` freezes the text tower too). Combiner: ``finetune`` +
``combiner``; DRA: ``warmup`` + ``main``; CaLa: ``main`` + ``main``.

* ``base``: stage 2 trains with the method's own loss on the real triplets;
* ``pos``: + generated positives (``cir spn generate`` with the benchmark's scene captions,
  partners from the rank window ``--window`` of the ``--init-from`` run's image tower, kept at
  SPN4CIR's share of 0.6 generated per real triplet) in stage 2 (``--positives-in all``: in
  both stages);
* ``neg``: stage 2 trains against the static bank of every training image
  (``spn_negatives: {tau, k}``) instead of the method's own loss;
* ``both``: the two together (SPN4CIR's recipe: positives and the bank in the second stage).

Every epoch is capped at the base's steps per epoch (``max_steps_per_epoch``), so the extra
triplets of ``pos`` change what a step sees, not how many steps there are. Each run keeps its
best stage-2 epoch by the validation headline; the table reports that epoch's val and heldout
CIRR-style R@1, R@5 and Rsubset@1 (mean +- std over seeds); ``--pick last`` reports the last
epoch instead. Runs are resumable: a finished run folder is read back, not trained again.

With ``--init-from-runs DIR`` (the README's tables) SPN's stage 1 is each method's own finished
run of ``benchmarks/supervised_table.py`` (``DIR/METHOD-seedS``, the same seed), and only
stage 2 trains here. Two blocks: SPN4CIR's stage-2 recipe (``--combiner-stage2 sum``: the
Combiner row trains CLIP4Cir's raw element-wise sum as SPN4CIR's CLIP4Cir code does; tau 0.02;
partners from SPN4CIR's far rank window scaled to this training set) and the project's variant
(the Combiner kept, tau 0.03, the 5 nearest neighbours). Positives are captioned by
``--captioner`` (default ``scenes:short``); the summary reports the share of generated texts
that fall back to "{B}".

    python benchmarks/spn_table.py --size tiny --seeds 0 --epochs1 1 --epochs2 1      # smoke test
    python benchmarks/spn_table.py --data runs/tables/synth-small --init-from-runs runs/supervised_table \
        --cache-dir runs/supervised_table/.feature_cache --rank-model runs/zs/pretrain_seed0/encoder.safetensors \
        --combiner-stage2 sum --tau 0.02 --window 7200,10800 --epochs2 2 --lr2 2e-4 --out runs/spn_faithful --parallel 2
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _orphans import die_with_parent  # noqa: E402

METHODS = ("combiner", "dra", "cala")
VARIANTS = ("base", "pos", "neg", "both")
STAGE_NAMES = {"combiner": ("finetune", "combiner"), "dra": ("warmup", "main"), "cala": ("main", "main")}
METRICS = ("recall@1", "recall@5", "recall_subset@1")


def _data(out: Path, size: str, data_seed: int) -> Path:
    from composed_retrieval.synth.writer import write_synth

    root = out / "data" / f"{size}-seed{data_seed}"
    if not (root / "synth.json").is_file():
        write_synth(root, seed=data_seed, size=size, workers=min(4, os.cpu_count() or 1))
    return root


def _positives(root: Path, seed: int, window: str, device: str, rank_model: str | None, count: int,
               captioner: str, cache_dir: str | None = None) -> str:
    """The generated split for one seed (kept when it is already there with the same settings)."""
    from composed_retrieval.cli import main

    if rank_model and rank_model.endswith(".safetensors"):   # tower weights (e.g. `cir pretrain`'s)
        ranker = ["--encoder", "tiny", "--encoder-checkpoint", str(Path(rank_model).resolve())]
    else:
        ranker = ["--model", str(Path(rank_model).resolve())] if rank_model else ["--encoder", "tiny"]
    tag = hashlib.sha1(" ".join(ranker + [captioner, window]).encode()).hexdigest()[:8]
    split = f"spn{seed}-{tag}"   # one split per seed, ranker, captioner and window
    manifest = root / f"spn.{split}.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        if (m.get("status") == "complete" and m["options"].get("max_triplets") == count
                and "texts_shortened_to_B" in m):
            return split
    main(["spn", "generate", "--dataset", "cirr", "--root", str(root), *ranker,
          "--captioner", captioner, "--window", window, "--out-split", split, "--seed", str(seed),
          "--max-triplets", str(count), "--device", device, "--quiet",
          *(["--cache-dir", str(Path(cache_dir).resolve())] if cache_dir else [])])
    return split


def _config(method: str, variant: str, seed: int, root: Path, args: argparse.Namespace, steps: int,
            spn_split: str) -> dict[str, Any]:
    import importlib.resources as res

    from composed_retrieval.config import load_config

    family = "claims" if args.init_from_runs else "synth"
    base = json.loads(res.files("composed_retrieval").joinpath("configs", f"{family}_{method}.json").read_text())
    base.pop("notes", None)
    s1, s2 = STAGE_NAMES[method]
    stage2: dict[str, Any] = {"name": s2, "epochs": args.epochs2, "lr": args.lr2,
                              "train_image_tower": False, "train_text_tower": args.text_tower}
    if variant in ("neg", "both"):
        stage2["spn_negatives"] = {"tau": args.tau, "k": args.k}
    stage1: dict[str, Any] = {"name": s1, "epochs": args.epochs1, "lr": args.lr1,
                              "train_image_tower": not args.freeze_image1, "train_text_tower": True}
    positives = [spn_split] if variant in ("pos", "both") else []
    if args.positives_in == "stage2":     # SPN4CIR: stage 1 is the method's own run on the real triplets
        stage1["extra_train_splits"], stage2["extra_train_splits"] = [], positives
    stages = [stage1, stage2]
    if args.init_from_runs:
        # stage 1 is the method's own finished run (benchmarks/supervised_table.py): only SPN's
        # second stage trains here, from that run's best weights
        stages = [stage2]
        if method == "combiner" and args.combiner_stage2 == "sum":
            # SPN4CIR's CLIP4Cir stage 2: the element-wise sum on raw features, no Combiner
            base.update({"method": "sum", "method_config": {"fusion": "raw"}})
            stage2["name"] = "main"
    base.update({
        "root": str(root), "seed": seed, "device": args.device, "batch_size": args.batch_size,
        "max_steps_per_epoch": steps, "extra_eval_splits": ["heldout"],
        "cache_dir": str(Path(args.cache_dir).resolve() if args.cache_dir else args.out / ".feature_cache"),
        "extra_train_splits": positives if args.positives_in == "all" else [],
        "stages": stages,
    })
    init = Path(args.init_from_runs) / f"{method}-seed{seed}" if args.init_from_runs else args.init_from
    if init:
        from composed_retrieval.train.checkpoint import read_checkpoint_meta, resolve_checkpoint

        meta = read_checkpoint_meta(resolve_checkpoint(init))
        base["init_from"] = str(Path(init).resolve())
        base["encoder_config"] = meta["encoder_config"].get("kwargs") or {}
        base.pop("encoder_checkpoint", None)
    return load_config(None, [], base)


def _run(cfg: dict[str, Any], run_dir: str, threads: int) -> dict[str, Any]:
    """One training run in a worker process; a finished run is read back."""
    import torch

    torch.set_num_threads(max(1, threads))
    from composed_retrieval.train.loop import Trainer

    def with_last(result: dict[str, Any]) -> dict[str, Any]:
        rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if l.strip()]
        return result | {"last": {"val": rows[-1]["val"], "heldout": rows[-1]["heldout"]}}

    done = Path(run_dir) / "results.json"
    if done.is_file():
        saved = json.loads(done.read_text())
        if saved.get("config") == json.loads(json.dumps(cfg)):
            return with_last(saved) | {"seconds": 0.0, "reused": True}
    t = time.perf_counter()
    result = Trainer(cfg, run_dir, resume=True, progress=False).run()
    return with_last(result) | {"seconds": round(time.perf_counter() - t, 1)}


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def table(results: dict[tuple[str, str, int], dict[str, Any]], methods: list[str], variants: list[str],
          pick: str = "best") -> str:
    head = ["method", "variant"] + [f"{s} {m.replace('recall_subset', 'Rs').replace('recall', 'R')}"
                                    for s in ("val", "heldout") for m in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        for variant in variants:
            rows = [r if pick == "best" else r["last"] for (m, v, _), r in sorted(results.items())
                    if m == method and v == variant]
            if not rows:
                continue
            cells = [_fmt([r[s][m] for r in rows]) for s in ("val", "heldout") for m in METRICS]
            lines.append(f"| {method} | {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(results: dict[tuple[str, str, int], dict[str, Any]], methods: list[str], variants: list[str]) -> str:
    """Each variant minus base, seed by seed (same stage-1 run, same seed): val and held-out R@1."""
    lines = ["| method | variant minus base | val R@1 by seed | held-out R@1 by seed |", "|---|---|---|---|"]
    for method in methods:
        for variant in variants:
            if variant == "base":
                continue
            cells = []
            for split in ("val", "heldout"):
                d = [results[(method, variant, s)][split]["recall@1"] - results[(method, "base", s)][split]["recall@1"]
                     for (m, v, s) in sorted(results) if m == method and v == variant and (method, "base", s) in results]
                cells.append(" / ".join(f"{x:+.1f}" for x in d) + (f" (mean {statistics.mean(d):+.1f})" if d else ""))
            lines.append(f"| {method} | +{variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/spn_table"))
    ap.add_argument("--size", default="small", choices=["tiny", "small", "medium"])
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--epochs1", type=int, default=8, help="stage 1 epochs (towers train)")
    ap.add_argument("--init-from", default=None,
                    help="start from this run's weights (e.g. a shared backbone; with --epochs1 0 only stage 2 trains)")
    ap.add_argument("--init-from-runs", default=None,
                    help="folder of benchmarks/supervised_table.py runs: each method and seed starts from its own "
                         "finished run (METHOD-seedS) as SPN's stage 1, and only stage 2 trains here")
    ap.add_argument("--combiner-stage2", default="combiner", choices=["combiner", "sum"],
                    help="with --init-from-runs: the Combiner row's stage-2 query (sum: SPN4CIR's CLIP4Cir recipe, "
                         "the element-wise sum on raw features with the text tower trained)")
    ap.add_argument("--captioner", default="scenes:short",
                    help="captioner of the positives (default scenes:short: colour and shape per object, like "
                         "SPN's 8-word captions; scenes: the full scene captions, which mostly fall back to {B})")
    ap.add_argument("--epochs2", type=int, default=4, help="stage 2 epochs (frozen image tower)")
    ap.add_argument("--lr1", type=float, default=1e-3)
    ap.add_argument("--lr2", type=float, default=2e-4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--tau", type=float, default=0.03,
                    help="bank temperature (default 0.03, SPN4CIR's BLIP4CIR FashionIQ value, which the README's "
                         "table used; SPN4CIR's CLIP4Cir recipe uses 0.02)")
    ap.add_argument("--k", type=int, default=None, help="sampled negatives (default: the whole bank)")
    ap.add_argument("--window", default="7200,10800",
                    help="partner rank window for the positives (default: SPN4CIR's CIRR window 10000-15000 of "
                         "16,939 images, scaled to the 12,243 small training images)")
    ap.add_argument("--positives-per-real", type=float, default=0.6,
                    help="generated triplets per real training triplet (default 0.6: SPN4CIR's one per CIRR "
                         "training image, 16,939 images for 28,225 triplets)")
    ap.add_argument("--cache-dir", default=None,
                    help="feature cache (default OUT/.feature_cache; the supervised table's, to reuse its image features)")
    ap.add_argument("--data", default=None, help="an existing synthetic benchmark folder (default: OUT/data/SIZE-seedN)")
    ap.add_argument("--rank-model", default=None,
                    help="run whose image tower ranks the partners, or tiny-tower weights (.safetensors, e.g. "
                         "`cir pretrain`'s: a separate image model, as SPN4CIR ranks with UNICOM; default: --init-from; "
                         "else a random tiny tower)")
    ap.add_argument("--freeze-image1", action="store_true",
                    help="stage 1 keeps the image tower frozen too (cached features: fast on a CPU)")
    ap.add_argument("--positives-in", default="stage2", choices=["stage2", "all"],
                    help="stages that train on the generated positives (default stage2: SPN4CIR adds them "
                         "to the second stage, after the method's own first stage on the real triplets)")
    ap.add_argument("--frozen-text", dest="text_tower", action="store_false",
                    help="stage 2 trains only the method (default: the text tower too, as SPN4CIR's stage 2)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--parallel", type=int, default=1, help="training processes at once")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process (default: cores / parallel)")
    ap.add_argument("--pick", default="best", choices=["best", "last"],
                    help="report the best epoch by val headline (default) or the last epoch")
    args = ap.parse_args()
    args.out = args.out.resolve()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    bad = sorted(set(methods) - set(METHODS)) + sorted(set(variants) - set(VARIANTS))
    if bad:
        print(f"error: unknown method or variant {bad[0]!r}", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    root = Path(args.data).resolve() if args.data else _data(args.out, args.size, args.data_seed)
    n_train = len(json.loads((root / "captions" / "cap.rc2.train.json").read_text()))
    steps = math.ceil(n_train / args.batch_size)
    rank_model = args.rank_model or args.init_from
    n_positives = max(1, round(args.positives_per_real * n_train))
    spn_split = {s: _positives(root, s, args.window, args.device, rank_model, n_positives, args.captioner,
                                args.cache_dir)
                 for s in seeds if {"pos", "both"} & set(variants)}
    fallback = {}
    for s, split in spn_split.items():
        m = json.loads((root / f"spn.{split}.json").read_text())
        n_texts = m["total_triplets"] * len(m["options"].get("templates") or [0, 1])
        fallback[s] = (m["texts_shortened_to_B"], n_texts)
    prep = time.perf_counter() - t0

    jobs = {(m, v, s): _config(m, v, s, root, args, steps, spn_split.get(s, ""))
            for s in seeds for m in methods for v in variants}   # seed by seed: a cut-off run leaves whole seeds
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.parallel))
    results: dict[tuple[str, str, int], dict[str, Any]] = {}
    import multiprocessing as mp
    with ProcessPoolExecutor(max_workers=max(1, args.parallel), mp_context=mp.get_context("spawn"),
                             initializer=die_with_parent) as pool:
        futures = {pool.submit(_run, cfg, str(args.out / "runs" / f"{m}-{v}-seed{s}"), threads): (m, v, s)
                   for (m, v, s), cfg in jobs.items()}
        for fut in as_completed(futures):
            key = futures[fut]
            results[key] = fut.result()
            r = results[key]
            print(json.dumps({"run": "-".join(map(str, key)), "val_R@1": round(r["val"]["recall@1"], 1),
                              "heldout_R@1": round(r["heldout"]["recall@1"], 1), "seconds": r["seconds"]}), flush=True)

    text = table(results, methods, variants, args.pick)
    if "base" in variants and len(variants) > 1:
        text += "\n\n" + paired(results, methods, variants)
    run_seconds = [r["seconds"] for r in results.values() if not r.get("reused")]
    stage1 = ("stage 1 = the finished runs of --init-from-runs" if args.init_from_runs else
              f"stage 1 {args.epochs1} epochs (lr {args.lr1}), stage 1 image tower "
              f"{'frozen' if args.freeze_image1 else 'trains'}")
    summary = (f"SPN on the synthetic benchmark ({args.size}, data seed {args.data_seed}), tiny encoder, seeds "
               f"{seeds}; {stage1}; stage 2 {args.epochs2} epochs (lr {args.lr2}), "
               f"{steps} steps per epoch of batch {args.batch_size}; stage 2 text tower "
               f"{'trains' if args.text_tower else 'frozen'}; "
               f"{n_positives} positives in {args.positives_in}; negatives tau {args.tau}, k {args.k}; "
               f"positives window {args.window} ranked by {rank_model or 'a random tiny tower'}. "
               f"{'Best epoch by val headline' if args.pick == 'best' else 'Last epoch'}; mean ± std over seeds.")
    if fallback:
        summary += (" Generated texts that fall back to \"{B}\" (too long for the text tower), captioner "
                    f"{args.captioner}: " + ", ".join(f"seed {s} {a} of {b} ({100 * a / max(b, 1):.1f} %)"
                                                      for s, (a, b) in sorted(fallback.items())) + ".")
    if args.init_from_runs:
        summary += (f" Stage 1: the finished runs of {args.init_from_runs} (METHOD-seedS); Combiner stage 2: "
                    f"{args.combiner_stage2}.")
    cost = (f"data + positives {prep:.0f} s; {len(run_seconds)} runs trained, "
            f"{(statistics.mean(run_seconds) if run_seconds else 0):.0f} s per run on average "
            f"({args.device}, {args.parallel} at once); total {time.perf_counter() - t0:.0f} s")
    print("\n" + summary + "\n\n" + text + "\n\n" + cost)
    (args.out / "table.md").write_text(summary + "\n\n" + text + "\n\n" + cost + "\n")
    (args.out / "results.json").write_text(json.dumps(
        {"-".join(map(str, k)): {s: v[s] for s in ("val", "heldout", "best_epoch", "last", "seconds")} for k, v in results.items()},
        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
