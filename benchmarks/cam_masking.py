"""CAM IoU with the noun's object and object survival under both masking directions.

For the masked zero-shot objective (``methods/textual_inversion.py``): on fresh synthetic scenes
(the renderer knows every object's pixels), the CAM of one caption noun is thresholded at tau;
printed per tau are the IoU of that region with the noun's object and the fraction of the
object's pixels left in the query image when the part *unrelated* to the noun is masked (the
default, complementary pairing) and when the noun's region is masked. Rows: the given
pre-trained tiny towers (``cir pretrain``), a random-weight tower of the same shape, and a
"perfect CAM" (the object mask itself) as the bound. ``zeroshot/cam_check.py`` has the math.

    python benchmarks/cam_masking.py --encoder-checkpoint runs/pretrain/encoder.safetensors --n 512
"""
from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    from composed_retrieval.encoders.registry import build_encoder
    from composed_retrieval.zeroshot.cam_check import masking_report, synthetic_scenes

    ap = argparse.ArgumentParser()
    ap.add_argument("--encoder-checkpoint", default=None, help="pre-trained tiny towers (cir pretrain)")
    ap.add_argument("--n", type=int, default=512, help="scenes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--taus", default="0.2,0.3,0.4")
    ap.add_argument("--weighting", default="auto", choices=["auto", "gradcam", "layercam"])
    args = ap.parse_args()
    taus = [float(t) for t in args.taus.split(",")]

    rows = {}
    torch.manual_seed(args.seed)
    random_tower = build_encoder("tiny").eval()
    scenes = synthetic_scenes(random_tower, args.n, args.seed)
    if args.encoder_checkpoint:
        trained = build_encoder("tiny", checkpoint=args.encoder_checkpoint).eval()
        rows["pre-trained tiny towers"] = masking_report(trained, scenes, taus, weighting=args.weighting)
    rows["random-weight tiny towers"] = masking_report(random_tower, scenes, taus, weighting=args.weighting)
    rows["perfect CAM (object mask)"] = masking_report(random_tower, scenes, taus, cam=scenes.objects.float())

    print(json.dumps({"n": args.n, "seed": args.seed, "rows": rows}, indent=1))
    print(f"\nweighting {args.weighting}, {args.n} scenes, seed {args.seed}")
    print("| CAM | tau | IoU with the noun's object | IoU with any object | object kept, unrelated part masked "
          "(default) | object kept, noun region masked | CAM region area | object area |")
    print("|---|---|---|---|---|---|---|---|")
    for name, by_tau in rows.items():
        for tau, r in by_tau.items():
            print(f"| {name} | {tau} | {r['iou']:.3f} | {r['iou_any_object']:.3f} | {100 * r['survival_unrelated']:.1f} % "
                  f"| {100 * r['survival_noun']:.1f} % | {100 * r['region_area']:.1f} % "
                  f"| {100 * r['object_area']:.1f} % |")


if __name__ == "__main__":
    main()
