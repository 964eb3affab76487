"""README row: CaLa-BLIP-2 on the tiny random BLIP-2 vs CaLa on the tiny CLIP-style towers, same
synthetic small benchmark, same 15-epoch budget, 3 seeds (both train from scratch: nothing here
was pre-trained, so this compares the architectures and losses, not BLIP-2's pre-training).

    python benchmarks/blip2_table.py --seeds 0,1,2 --parallel 2 --threads 1
    python benchmarks/blip2_table.py --seeds 0 --device cuda
"""
from __future__ import annotations

from table_runner import ROOT, common_args, report, run_experiments

CONFIGS = ROOT / "src" / "composed_retrieval" / "configs"
EXPERIMENTS = {
    "cala-tiny-towers": {"config": CONFIGS / "synth_cala.json"},
    "cala_blip2-tiny": {"config": CONFIGS / "cala_blip2_tiny.json"},
}

if __name__ == "__main__":
    args = common_args(__doc__).parse_args()
    report(run_experiments(EXPERIMENTS, args), args)
