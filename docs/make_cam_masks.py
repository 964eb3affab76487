"""Draw docs/cam_masks.png: Grad-CAM masks of the pre-trained tiny towers on synthetic images.

Each row: the image, the CAM for the masked noun (the caption's shape word), the query image of
the default complementary pairing (everything outside the CAM region above tau masked,
``cam_region="unrelated"``) with the mean fill and with the next image's pixels
(``cam_fill="batch"``), and the other direction (the noun's region masked, ``cam_region="noun"``).

    .venv/bin/python docs/make_cam_masks.py --root SYNTH_DIR --encoder-checkpoint PRE/encoder.safetensors
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from composed_retrieval.data.nouns import mask_noun, noun_finder
    from composed_retrieval.data.pairs import read_pairs
    from composed_retrieval.encoders.registry import build_encoder
    from composed_retrieval.methods.cam import apply_cam_mask, noun_cams
    from composed_retrieval.train.sources import PixelSource

    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True, help="synthetic benchmark folder")
    ap.add_argument("--encoder-checkpoint", required=True)
    ap.add_argument("--out", default=str(Path(__file__).with_name("cam_masks.png")))
    ap.add_argument("--tau", type=float, default=0.3)
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weighting", default="auto", choices=["auto", "gradcam", "layercam"])
    args = ap.parse_args()

    enc = build_encoder("tiny", checkpoint=args.encoder_checkpoint).eval()
    pairs = read_pairs(Path(args.root) / "pairs" / "val.tsv", image_root=args.root)
    from composed_retrieval.synth.world import NOUNS
    find = noun_finder(list(NOUNS))
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(pairs), generator=g).tolist()
    picks = [i for i in order if 2 <= len(find(pairs.captions[i])) <= 3][: args.n]
    tf = enc.image_transform("targetpad")
    src = PixelSource([str(pairs.paths[i]) for i in picks], Path, tf, progress=False)
    pixels = torch.stack([src(str(pairs.paths[i])) for i in picks])
    masked_caps, nouns = [], []
    for i in picks:
        spans = find(pairs.captions[i])
        cap, noun = mask_noun(pairs.captions[i], spans, int(torch.randint(len(spans), (1,), generator=g)))
        masked_caps.append(cap)
        nouns.append(noun)
    cam = noun_cams(enc, pixels, nouns, weighting=args.weighting)
    masked = apply_cam_mask(pixels, cam, args.tau, region="unrelated", fill="mean")
    swapped = apply_cam_mask(pixels, cam, args.tau, region="unrelated", fill="batch")
    noun_masked = apply_cam_mask(pixels, cam, args.tau, region="noun", fill="mean")
    mean = torch.tensor(tf.mean)[:, None, None]
    std = torch.tensor(tf.std)[:, None, None]

    def show(x: torch.Tensor):
        return (x * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()

    fig, axes = plt.subplots(len(picks), 5, figsize=(15, 3 * len(picks)))
    for r in range(len(picks)):
        axes[r, 0].imshow(show(pixels[r]))
        axes[r, 0].set_title(f"noun: {nouns[r]!r}", fontsize=9)
        axes[r, 1].imshow(show(pixels[r]))
        axes[r, 1].imshow(cam[r].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
        axes[r, 1].set_title(f"CAM ({args.weighting}, 0..1)", fontsize=9)
        axes[r, 2].imshow(show(masked[r]))
        axes[r, 2].set_title(f"CAM <= {args.tau} masked (default, mean)", fontsize=9)
        axes[r, 3].imshow(show(swapped[r]))
        axes[r, 3].set_title(f"CAM <= {args.tau} from the next image", fontsize=9)
        axes[r, 4].imshow(show(noun_masked[r]))
        axes[r, 4].set_title(f"CAM > {args.tau} masked ('noun', mean)", fontsize=9)
        fig.text(0.5, 1 - (r + 1) / len(picks) + 0.005, masked_caps[r], ha="center", fontsize=8)
        for a in axes[r]:
            a.axis("off")
    fig.tight_layout(h_pad=2.2)
    fig.savefig(args.out, dpi=80)
    print(args.out)


if __name__ == "__main__":
    main()
