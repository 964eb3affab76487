"""Methods compared on one shared backbone (CPU-affordable): the tiny towers are trained once
(``--backbone RUN``, e.g. the stage-1 fine-tuning of `cir train --config synth_combiner.json`),
then frozen; training-free baselines are evaluated on them and every compositor (Combiner, DRA,
CaLa and their ablations) trains on the cached features with the same budget (4 epochs of 30 steps).

    python benchmarks/frozen_table.py --backbone runs/backbone --seeds 0,1,2
"""
from __future__ import annotations

import json
from pathlib import Path

from table_runner import ROOT, common_args, report, run_experiments

CONFIGS = ROOT / "src" / "composed_retrieval" / "configs"
TRAINED = {
    "combiner": {"config": CONFIGS / "frozen_combiner.json"},
    "dra": {"config": CONFIGS / "frozen_dra.json"},
    "dra-no-implicit": {"config": CONFIGS / "frozen_dra.json", "overrides": ["method_config.implicit=false"]},
    "dra-no-explicit": {"config": CONFIGS / "frozen_dra.json", "overrides": ["method_config.explicit=false"]},
    "cala": {"config": CONFIGS / "frozen_cala.json"},
    "cala-no-hca": {"config": CONFIGS / "frozen_cala.json", "overrides": ["method_config.hca=false"]},
    "cala-no-tac": {"config": CONFIGS / "frozen_cala.json", "overrides": ["method_config.tac=false"]},
}
TRAINING_FREE = ("image_only", "text_only", "sum")


def evaluate_training_free(backbone: Path, data: Path, device: str) -> dict[str, list[dict]]:
    """image-only, text-only and sum need no training: evaluate them on the backbone's towers."""
    from composed_retrieval.config import DEFAULTS, merge
    from composed_retrieval.evaluation.runner import evaluate_method
    from composed_retrieval.methods.registry import build_method
    from composed_retrieval.train.checkpoint import load_method, resolve_checkpoint
    from composed_retrieval.train.loop import Trainer, load_data

    folder = resolve_checkpoint(backbone)
    cfg = merge(DEFAULTS, {"root": str(data), "device": device, "dataset": "cirr"})
    trainer = Trainer(cfg, folder.parent, progress=False)
    encoder = load_method(folder, trainer.device).encoder
    out = {}
    for name in TRAINING_FREE:
        method = build_method(name, encoder).to(trainer.device).eval()
        row = {}
        for split in ("val", "heldout"):
            splits = load_data(cfg, split, training=False)
            row[split] = evaluate_method(method, splits, trainer.image_table(method, splits, split), 256, trainer.device)
        out[name.replace("_", "-")] = [row]
    return out


if __name__ == "__main__":
    parser = common_args(__doc__)
    parser.add_argument("--backbone", required=True, help="run or checkpoint folder whose towers are shared")
    args = parser.parse_args()
    from composed_retrieval.train.checkpoint import read_checkpoint_meta, resolve_checkpoint

    towers = read_checkpoint_meta(resolve_checkpoint(args.backbone))["encoder_config"].get("kwargs") or {}
    args.set = [f"encoder_config={json.dumps(towers)}", f"init_from={Path(args.backbone).resolve()}"] + list(args.set)
    results = evaluate_training_free(Path(args.backbone), Path(args.data), args.device)
    results.update(run_experiments(TRAINED, args))
    report(results, args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "frozen_table.json").write_text(json.dumps(results, indent=1))
