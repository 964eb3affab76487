"""`cir demo`: the synthetic benchmark end to end on 2 CPU cores in a few minutes."""
from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

from ..config import load_config
from ..fileio import atomic_write_json


def demo_config_path(method: str) -> Path:
    """``demo_<method>.json`` (a budget sized for 2 CPU cores) or else ``synth_<method>.json``."""
    folder = Path(str(resources.files("composed_retrieval") / "configs"))
    path = folder / f"demo_{method}.json"
    if not path.is_file():
        path = folder / f"synth_{method}.json"
    if not path.is_file():
        from ..errors import ConfigError
        available = sorted(p.name[6:-5] for p in path.parent.glob("synth_*.json"))
        raise ConfigError(f"no demo config for method {method!r}; available: {', '.join(available)}")
    return path


def ensure_synth(data: Path, size: str, seed: int, progress: bool) -> None:
    if (data / "synth.json").is_file():
        return
    import os

    from ..synth.writer import write_synth
    meta = write_synth(data, seed, size, "cirr", min(2, os.cpu_count() or 1))
    print(json.dumps({"out": str(data), "format": meta["format"], "seed": meta["seed"], "size": meta["size"],
                      "images": meta["images"], "triplets": meta["triplets"]}))


def run_demo(out: Path, method: str = "combiner", seed: int = 0, size: str = "small", config: str | None = None,
             overrides: list[str] | None = None, progress: bool = True) -> dict[str, Any]:
    from ..evaluation.protocols import rank_split
    from ..evaluation.runner import split_vectors
    from .checkpoint import load_method
    from .loop import Trainer, load_data
    from .report import write_report

    t0 = time.time()
    data = out / "data"
    ensure_synth(data, size, seed, progress)
    cfg = load_config(config or demo_config_path(method), overrides,
                      {"root": str(data), "seed": seed, "dataset": "cirr"})
    run = out / "run"
    trainer = Trainer(cfg, run, resume=True, progress=progress)
    result = trainer.run()
    method_obj = load_method(run / "best", trainer.device)
    split = load_data(cfg, cfg["val_split"], training=False)[0]
    table = trainer.image_table(method_obj, [split], "report")[0]
    q, g = split_vectors(method_obj, split, table, cfg["eval_batch_size"], trainer.device)
    ranks = rank_split(split, q, g, k=5)
    report = write_report(out / "report.html", f"composed-retrieval demo: {method} on the synthetic benchmark ({size}, seed {seed})",
                          split, ranks.names, result["val"], run / "curves.png")
    summary = {"method": method, "val": result["val"],
               **{k: result[k] for k in cfg.get("extra_eval_splits") or [] if k in result},
               "best_epoch": result["best_epoch"], "seconds": round(time.time() - t0, 1),
               "report": str(report), "run": str(run)}
    atomic_write_json(out / "results.json", summary)
    return summary
