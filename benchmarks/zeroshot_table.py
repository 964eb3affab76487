"""Zero-shot table on the synthetic benchmark: no triplet is used for training anywhere.

For each seed: pre-train the tiny towers on the benchmark's image-caption pairs (`cir pretrain`),
then evaluate (CIRR protocol, val and heldout) image-only / text-only / sum on those towers,
and textual inversion trained on the same pairs: plain phi, masked phi with noun masking only,
CAM masking only, and noun + CAM in both directions: the complementary one (the default,
``cam_region="unrelated"``: the image keeps the noun's region and loses the rest, the caption
keeps its context and loses the noun) at tau 0.2 / 0.3 / 0.4, and the old one
(``cam_region="noun"``: the noun leaves both the caption and the image) at tau 0.3; each with
both fills of the masked pixels (``batch``: the same pixels of another image of the batch, the
default; ``mean``: the mean colour). Prints a markdown table of mean +- std over seeds of R@1,
R@5, R@10 and Rsubset@1, and every masked row minus plain phi, paired by seed.

Metrics are the last epoch's (no selection on val). Budgets are flags; the defaults are what
the reported table used. Usage:

    python benchmarks/zeroshot_table.py --work runs/zs --seeds 0 1 2 --parallel 2

Resumable: each seed keeps its finished rows in WORK/results_seed{S}.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _orphans import die_with_parent  # noqa: E402

_NOUN = {"cam_region": "noun"}   # the noun's CAM region masked (the old direction)
_UNREL = {"cam_region": "unrelated"}   # the part unrelated to the noun masked (complementary; the default)


def _masked(noun: bool, tau: float, fill: str, region: dict[str, str]) -> tuple[str, dict[str, Any]]:
    where = "unrelated part masked (complementary)" if region is _UNREL else "noun region masked (old direction)"
    fill_text = "mean fill" if fill == "mean" else "fill from another image"
    label = f"phi masked: {'noun + CAM' if noun else 'CAM only'} (tau {tau}), {where}, {fill_text}"
    return label, {"noun_mask": noun, "cam_mask": True, "tau": tau, "cam_fill": fill, **region}


ROWS: list[tuple[str, dict[str, Any] | str]] = [
    ("image only", "image_only"),
    ("text only", "text_only"),
    ("image + text sum", "sum"),
    ("phi plain (Pic2Word-style)", {}),
    ("phi masked: noun only", {"noun_mask": True}),
    *[_masked(False, 0.3, fill, _UNREL) for fill in ("batch", "mean")],
    *[_masked(True, tau, fill, _UNREL) for fill in ("batch", "mean") for tau in (0.2, 0.3, 0.4)],
    *[_masked(True, 0.3, fill, _NOUN) for fill in ("batch", "mean")],
]
METRICS = (("recall@1", "R@1"), ("recall@5", "R@5"), ("recall@10", "R@10"), ("recall_subset@1", "Rs@1"))


def ensure_synth(root: Path, seed: int) -> None:
    if (root / "synth.json").is_file():
        return
    subprocess.run([sys.executable, "-m", "composed_retrieval", "synth", "--out", str(root), "--size", "small",
                    "--seed", str(seed)], check=True)


def run_phi(root: Path, ckpt: str, out: Path, seed: int, extra: dict[str, Any], args: argparse.Namespace) -> dict:
    from composed_retrieval.config import load_config
    from composed_retrieval.train.loop import Trainer

    cfg = load_config(None, explicit={
        "method": "textual_inversion", "encoder": "tiny", "encoder_checkpoint": ckpt, "dataset": "cirr",
        "root": str(root), "seed": seed, "device": "cpu", "batch_size": args.batch_size,
        "extra_eval_splits": ["heldout"], "cache_dir": str(out.parent / f".feature_cache_seed{seed}"),
        "max_steps_per_epoch": args.max_steps,   # pairs: ROOT/pairs/train.tsv
        "method_config": {"nouns": "synthetic", **extra},
        "stages": [{"name": "main", "epochs": args.phi_epochs, "lr": args.lr}]})
    Trainer(cfg, out, resume=False, progress=False).run()
    last = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()][-1]
    return {"val": last["val"], "heldout": last["heldout"], "train": {k: last[k] for k in last
                                                                      if k in ("plain", "masked", "loss", "masked_used")}}


def run_baseline(root: Path, ckpt: str, name: str, cache: Path) -> dict:
    from composed_retrieval.encoders.registry import build_encoder
    from composed_retrieval.methods.registry import build_method
    from composed_retrieval.zeroshot.commands import evaluate_zeroshot

    method = build_method(name, build_encoder("tiny", checkpoint=ckpt))
    return {split: evaluate_zeroshot(method, "cirr", str(root), split, device="cpu", cache_dir=str(cache))
            for split in ("val", "heldout")}


def table(results: dict[str, list[dict]]) -> str:
    head = "| method | " + " | ".join(f"val {m}" for _, m in METRICS) + " | " + \
           " | ".join(f"heldout {m}" for _, m in METRICS) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(METRICS))]
    for label, _ in ROWS:
        runs = results.get(label) or []
        if not runs:
            continue
        cells = []
        for split in ("val", "heldout"):
            for key, _ in METRICS:
                vals = [r[split][key] for r in runs]
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                cells.append(f"{statistics.mean(vals):.1f} ± {sd:.1f}")
        lines.append(f"| {label} (n={len(runs)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_seed(seed: int, args: argparse.Namespace, root: Path, threads: int) -> dict[str, list[dict]]:
    """Pre-train one seed's towers, then every row on them; resumable (results_seed{S}.json)."""
    import torch

    torch.set_num_threads(threads)
    from composed_retrieval.train.pretrain import pretrain_tiny

    work = Path(args.work)
    results_path = work / f"results_seed{seed}.json"
    results: dict[str, list[dict]] = json.loads(results_path.read_text()) if results_path.is_file() else {}
    pre = work / f"pretrain_seed{seed}"
    ckpt = pre / "encoder.safetensors"
    if not ckpt.is_file():
        t0 = time.time()
        info = pretrain_tiny(root / "pairs" / "train.tsv", pre, epochs=args.pretrain_epochs, seed=seed,
                             val_pairs=root / "pairs" / "val.tsv", image_root=root, progress=False)
        print(f"pretrain seed {seed}: {info['history'][-1]} caption->image R@1 {info.get('val_caption_to_image_r1')} "
              f"({time.time() - t0:.0f}s)", flush=True)
    for label, spec in ROWS:
        if args.only is not None and label not in args.only:
            continue
        if results.get(label):
            continue
        t0 = time.time()
        if isinstance(spec, str):
            res = run_baseline(root, str(ckpt), spec, work / f".feature_cache_seed{seed}")
        else:
            res = run_phi(root, str(ckpt), work / "runs" / f"{label.replace(' ', '_')}_seed{seed}", seed, spec, args)
        res["seed"] = seed
        res["seconds"] = round(time.time() - t0, 1)
        results[label] = [res]
        results_path.write_text(json.dumps(results, indent=1))
        print(f"seed {seed} {label}: val R@1 {res['val']['recall@1']:.1f} R@5 {res['val']['recall@5']:.1f} "
              f"Rs@1 {res['val']['recall_subset@1']:.1f} | heldout R@1 {res['heldout']['recall@1']:.1f} "
              f"({res['seconds']:.0f}s)", flush=True)
    return results


def paired_lines(results: dict[str, list[dict]], base: str = "phi plain (Pic2Word-style)") -> list[str]:
    """Each masked row minus plain phi, seed by seed (the same towers): val and held-out R@1."""
    lines = ["| row minus plain phi | val R@1 by seed | held-out R@1 by seed |", "|---|---|---|"]
    plain = {r["seed"]: r for r in results.get(base, [])}
    for label, runs in results.items():
        if not label.startswith("phi masked"):
            continue
        cells = []
        for split in ("val", "heldout"):
            d = [r[split]["recall@1"] - plain[r["seed"]][split]["recall@1"] for r in runs if r["seed"] in plain]
            cells.append(" / ".join(f"{x:+.1f}" for x in d) + (f" (mean {statistics.mean(d):+.1f})" if d else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/zs_bench")
    ap.add_argument("--data", default=None, help="an existing synthetic benchmark folder (default: WORK/synth_small_seedN)")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic benchmark (cir synth --seed)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (towers and phi)")
    ap.add_argument("--parallel", type=int, default=1, help="seeds at once (processes; torch threads split between them)")
    ap.add_argument("--pretrain-epochs", type=int, default=4)
    ap.add_argument("--phi-epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=60, help="phi steps per epoch")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-4, help="phi learning rate (SEARLE: 1e-4)")
    ap.add_argument("--only", nargs="*", default=None, help="row labels to run (default: all)")
    args = ap.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    root = Path(args.data) if args.data else work / f"synth_small_seed{args.data_seed}"
    t_start = time.time()
    ensure_synth(root, args.data_seed)
    threads = max(1, (os.cpu_count() or 1) // max(1, args.parallel))
    per_seed: list[dict[str, list[dict]]] = []
    if args.parallel > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(args.parallel, mp_context=mp.get_context("spawn"), initializer=die_with_parent) as pool:
            per_seed = list(pool.map(run_seed, args.seeds, [args] * len(args.seeds), [root] * len(args.seeds),
                                     [threads] * len(args.seeds)))
    else:
        per_seed = [run_seed(s, args, root, threads) for s in args.seeds]
    results: dict[str, list[dict]] = {}
    for one in per_seed:
        for label, runs in one.items():
            results.setdefault(label, []).extend(runs)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    text = "\n".join([table(results), ""] + paired_lines(results))
    print()
    print(text)
    (work / "table.md").write_text(text + "\n")
    print(f"\ntotal {time.time() - t_start:.0f}s for this invocation")


if __name__ == "__main__":
    main()
