"""Run named training experiments over seeds (in parallel processes) and print a results table.

Shared by the benchmark tables in this folder: every number in the README's tables comes from
one of these scripts, run as the README says. Each experiment is a config (a file under
src/composed_retrieval/configs/ or a dict) plus overrides; every run writes its own run folder
(metrics.jsonl, results.json) under --out, so a table can be re-printed without retraining.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _orphans import die_with_parent  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

COLUMNS = ("recall@1", "recall@5", "recall@10", "recall_subset@1")


def common_args(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", default="runs/tables/synth-small", help="synthetic benchmark folder (generated if missing)")
    p.add_argument("--size", default="small")
    p.add_argument("--out", default="runs/tables")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--parallel", type=int, default=1, help="runs at once (processes)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run")
    p.add_argument("--only", default=None, help="comma-separated experiment names")
    p.add_argument("--set", action="append", default=[], help="override applied to every run")
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    p.add_argument("--collect", action="store_true", help="only tabulate finished runs (results.json), train nothing")
    p.add_argument("--smoke", action="store_true", help="1 epoch per stage, 2 steps: checks that every run works")
    return p


def ensure_data(path: Path, size: str) -> None:
    if (path / "synth.json").is_file():
        return
    from composed_retrieval.synth.writer import write_synth
    write_synth(path, seed=0, size=size, workers=min(8, os.cpu_count() or 1))


def _run_one(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    from composed_retrieval.config import load_config
    from composed_retrieval.train.loop import Trainer

    run = Path(job["run"])
    if (run / "results.json").is_file():
        return json.loads((run / "results.json").read_text())
    cfg = load_config(job["config"], job["overrides"], job["explicit"])
    t0 = time.time()
    result = Trainer(cfg, run, resume=True, progress=False).run()
    print(f"done {run.name} in {time.time() - t0:.0f}s: val R@1 {result['val'].get('recall@1', float('nan')):.1f}",
          flush=True)
    return result


def run_experiments(experiments: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, list[dict]]:
    """``experiments[name] = {"config": path, "overrides": [...]}``; returns results per name."""
    data = Path(args.data)
    ensure_data(data, args.size)
    seeds = [int(s) for s in str(args.seeds).split(",")]
    only = set(args.only.split(",")) if args.only else None
    jobs, keys = [], []
    todo = [(name, exp) for name, exp in experiments.items() if not only or name in only]
    for seed in seeds:  # seed-major order: an interrupted table still has every row for seed 0
        for name, exp in todo:
            smoke = []
            if args.smoke:
                n_stages = len(json.loads(Path(exp["config"]).read_text())["stages"])
                smoke = [f"stages.{i}.epochs=1" for i in range(n_stages)] + ["max_steps_per_epoch=2"]
            jobs.append({"run": str(Path(args.out) / f"{name}-seed{seed}"), "config": exp["config"],
                         "overrides": list(exp.get("overrides", [])) + smoke + list(args.set),
                         "explicit": {"root": str(data), "seed": seed, "device": args.device},
                         "threads": args.threads})
            keys.append(name)
    if getattr(args, "collect", False):
        done = [(j, k) for j, k in zip(jobs, keys) if (Path(j["run"]) / "results.json").is_file()]
        jobs, keys = [j for j, _ in done], [k for _, k in done]
    if args.parallel > 1:
        # not a multiprocessing.Pool: its daemonic workers may not start DataLoader workers
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(args.parallel, mp_context=mp.get_context("spawn"),
                                 initializer=die_with_parent) as pool:
            results = list(pool.map(_run_one, jobs))
    else:
        results = [_run_one(j) for j in jobs]
    out: dict[str, list[dict]] = {}
    for k, r in zip(keys, results):
        out.setdefault(k, []).append(r)
    return out


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def table(results: dict[str, list[dict]], splits: tuple[str, ...] = ("val", "heldout")) -> str:
    head = "| method | " + " | ".join(f"{s} {c}" for s in splits for c in COLUMNS) + " | seeds |"
    sep = "|" + "---|" * (2 + len(splits) * len(COLUMNS))
    rows = [head, sep]
    for name, runs in results.items():
        cells = []
        for s in splits:
            for c in COLUMNS:
                vals = [r[s][c] for r in runs if s in r and c in r[s]]
                cells.append(_fmt(vals) if vals else "-")
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {len(runs)} |")
    return "\n".join(rows)


def paired(results: dict[str, list[dict]], a: str, b: str, split: str = "val", key: str = "recall@1") -> str:
    """``a - b`` per seed (runs are listed seed by seed in both), and their mean: the seed
    spread of two rows overstates the noise of a difference when both share each seed's data
    order and initial weights."""
    if a not in results or b not in results:
        return "-"
    diffs = [ra[split][key] - rb[split][key] for ra, rb in zip(results[a], results[b])
             if key in ra.get(split, {}) and key in rb.get(split, {})]
    if not diffs:
        return "-"
    return " / ".join(f"{d:+.1f}" for d in diffs) + f" (mean {statistics.mean(diffs):+.1f})"


def edit_types(results: dict[str, list[dict]], split: str) -> list[str]:
    """The edit types the split's metrics break recall@1 down by (``cir eval`` JSON keys
    ``edit_type/{type}/recall@1``)."""
    kinds = {k.split("/")[1] for runs in results.values() for r in runs for k in r.get(split, {})
             if k.startswith("edit_type/") and k.endswith("/recall@1")}
    return sorted(kinds)


def edit_type_table(results: dict[str, list[dict]], split: str = "val") -> str:
    """Recall@1 by modification type (mean ± std over seeds), with each type's query count."""
    kinds = edit_types(results, split)
    if not kinds:
        return ""
    first = next(r for runs in results.values() for r in runs if split in r)
    counts = [int(first[split].get(f"edit_type/{k}/queries", 0)) for k in kinds]
    rows = ["| method | " + " | ".join(f"{k} (n={n})" for k, n in zip(kinds, counts)) + " |",
            "|" + "---|" * (1 + len(kinds))]
    for name, runs in results.items():
        cells = []
        for k in kinds:
            vals = [r[split][f"edit_type/{k}/recall@1"] for r in runs if f"edit_type/{k}/recall@1" in r.get(split, {})]
            cells.append(_fmt(vals) if vals else "-")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def report(results: dict[str, list[dict]], args: argparse.Namespace) -> None:
    text = table(results)
    print(text)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text + "\n")
