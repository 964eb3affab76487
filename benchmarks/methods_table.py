"""Issue-3 and issue-4 tables on the synthetic small benchmark, tiny encoder, same budget
(15 epochs per run: 12 tower epochs + 3 compositor epochs for the two-stage methods):
baselines (image-only, text-only, sum, Combiner), DRA and CaLa with their ablations.

    python benchmarks/methods_table.py --seeds 0,1,2 --device cuda --parallel 12
    python benchmarks/methods_table.py --only sum,combiner --seeds 0          # a subset
"""
from __future__ import annotations

from table_runner import ROOT, common_args, report, run_experiments

CONFIGS = ROOT / "src" / "composed_retrieval" / "configs"
EXPERIMENTS = {
    "image-only": {"config": CONFIGS / "synth_image_only.json"},
    "text-only": {"config": CONFIGS / "synth_text_only.json"},
    "sum": {"config": CONFIGS / "synth_sum.json"},
    "combiner": {"config": CONFIGS / "synth_combiner.json"},
    "dra": {"config": CONFIGS / "synth_dra.json"},
    "dra-no-implicit": {"config": CONFIGS / "synth_dra.json", "overrides": ["method_config.implicit=false"]},
    "dra-no-explicit": {"config": CONFIGS / "synth_dra.json", "overrides": ["method_config.explicit=false"]},
    "cala": {"config": CONFIGS / "synth_cala.json"},
    "cala-no-hca": {"config": CONFIGS / "synth_cala.json", "overrides": ["method_config.hca=false"]},
    "cala-no-tac": {"config": CONFIGS / "synth_cala.json", "overrides": ["method_config.tac=false"]},
}

if __name__ == "__main__":
    args = common_args(__doc__).parse_args()
    report(run_experiments(EXPERIMENTS, args), args)
