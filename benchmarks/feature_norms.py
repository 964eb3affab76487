"""Feature norms and TAC alignment-logit spread of finished supervised-table runs: the
measurement behind the README's diagnosis of CaLa's raw-feature recipe on the tiny towers
(the raw sum is image-dominated when image features are much longer than text features).

    python benchmarks/feature_norms.py --runs runs/supervised_table --data runs/tables/synth-small
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="runs/supervised_table")
    ap.add_argument("--data", default="runs/tables/synth-small")
    ap.add_argument("--names", default="cala-seed0,cala-no-tac-seed0,combiner-seed0")
    ap.add_argument("--queries", type=int, default=256, help="first N val queries")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from composed_retrieval.cache import FeatureCache
    from composed_retrieval.data.cirr import load_cirr
    from composed_retrieval.train.checkpoint import load_method, resolve_checkpoint

    split = load_cirr(args.data, "val")
    qs = split.queries[:args.queries]
    for name in args.names.split(","):
        m = load_method(resolve_checkpoint(Path(args.runs) / name), "cpu").eval()
        enc = m.encoder
        with torch.no_grad():
            text = m.text_features(enc.tokenize([q["caption"] for q in qs]))
            entry = FeatureCache(Path(args.runs) / ".feature_cache").get_or_build(
                enc, "cirr//val/val", split.all_image_names(), split.image_path, enc.image_transform("targetpad"),
                progress=False)
            row = {n: i for i, n in enumerate(entry.names)}
            ref = [row[q["reference"]] for q in qs]
            out = {"text_norm": text.pooled.norm(dim=-1).mean().item(),
                   "image_norm": entry.pooled[ref].float().norm(dim=-1).mean().item()}
            if m.name == "cala" and m.options["tac"]:
                fv = m.tac(entry.tokens[ref].float(), entry.tokens[[row[q["target"]] for q in qs]].float())
                out["tac_norm"] = fv.norm(dim=-1).mean().item()
                out["align_logit_std"] = (m.options["align_scale"] * text.pooled @ fv.T).std().item()
        print(name, {k: round(v, 2) for k, v in out.items()}, flush=True)


if __name__ == "__main__":
    main()
