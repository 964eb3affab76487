"""BLIP-2 forward time and memory per image (ViT-g and ViT-L, random weights), with and without
the ViT cache, and the peak memory of one CaLa-BLIP-2 training step (optionally with gradient
checkpointing), extrapolated to the public batch size.

For each variant, in one run: ``encode_image`` on preprocessed tensors (frozen ViT + visual
Q-Former) with the ViT cache off, then with a warm in-memory ViT cache (the Q-Former alone);
each measured ``--repeats`` times alternating, the best kept. ``ratio`` = uncached / cached time.
Memory: peak CUDA allocation on a GPU; on the CPU the growth of the peak resident set
(``ru_maxrss``, which only grows: run one variant per process for clean forward numbers; each
training measurement runs in its own process). Training: one forward + backward + AdamW step of CaLa-BLIP-2 (three Q-Formers,
both sides trained) at two small batch sizes; peak(batch) is fitted as fixed + slope x batch and
reported at ``--public-batch`` (CaLa: 64).

    python benchmarks/blip2_speed.py --variants tiny --images 4               # smoke check
    python benchmarks/blip2_speed.py --variants vit_g,vit_l --images 16       # CPU, idle machine
    python benchmarks/blip2_speed.py --device cuda --images 256 --batch-size 64 --train-batches 4,8
    python benchmarks/blip2_speed.py --device cuda --gradient-checkpointing   # Q-Former checkpointing
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch

from composed_retrieval.encoders.blip2 import Blip2Encoder
from composed_retrieval.methods.registry import build_method


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # Linux: KiB


def peak_mb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else rss_mb()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def timed_forward(encoder: Blip2Encoder, pixels: torch.Tensor, batch: int, device: torch.device) -> float:
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode(), autocast:
        for i in range(0, len(pixels), batch):
            encoder.encode_image(pixels[i:i + batch].to(device))
    sync(device)
    return time.perf_counter() - t0


def train_step_peak(variant: str, batch: int, device: torch.device, checkpointing: bool) -> float:
    """Peak memory (MB) of one CaLa-BLIP-2 step at ``batch``, on a fresh model, in a fresh process
    (on the CPU the peak resident set only grows, so each measurement needs its own process)."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_train_step_peak, (variant, batch, str(device), checkpointing))


def _train_step_peak(variant: str, batch: int, device_name: str, checkpointing: bool) -> float:
    device = torch.device(device_name)
    base = 0.0 if device.type == "cuda" else rss_mb()
    torch.manual_seed(0)
    enc = Blip2Encoder(random_weights=True, preset=variant, gradient_checkpointing=checkpointing)
    method = build_method("cala_blip2", enc).to(device)
    method.train_image_tower = method.train_text_tower = True
    for p in method.encoder.parameters():
        p.requires_grad_(False)
    params = method.trainable_parameters()
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-5)
    size = enc.image_size
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randn(batch, 3, size, size, device=device)
    ids = enc.tokenize(["a photo of a dog on the grass, make it a cat"] * batch).to(device)
    method.train()
    reset_peak(device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    with autocast:
        out = method({"reference": x, "target": y, "text": ids})
    out["loss"].backward()
    opt.step()
    sync(device)
    return peak_mb(device) - base


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="vit_g,vit_l", help="comma list of presets: vit_g, vit_l, tiny")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--train-batches", default="1,2", help="two batch sizes for the training-memory fit; '' skips it")
    ap.add_argument("--public-batch", type=int, default=64)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    results = []
    for variant in [v for v in args.variants.split(",") if v]:
        before = rss_mb()
        reset_peak(device)
        torch.manual_seed(0)
        plain = Blip2Encoder(random_weights=True, preset=variant).to(device).eval()
        n_vit = sum(p.numel() for p in plain.vit.parameters())
        n_q = sum(p.numel() for p in plain.qformer.parameters())
        size = plain.image_size
        pixels = torch.randn(args.images, 3, size, size, generator=torch.Generator().manual_seed(1))
        timed_forward(plain, pixels[: args.batch_size], args.batch_size, device)       # warm-up
        fwd_peak = peak_mb(device)
        cached = plain
        plain_s, cached_s = [], []
        for _ in range(args.repeats):
            cached.vit_cache.items = 0
            plain_s.append(timed_forward(plain, pixels, args.batch_size, device))
            cached.vit_cache.items = args.images
            if not cached.vit_cache.memory:
                timed_forward(cached, pixels, args.batch_size, device)                  # fills the cache
            cached_s.append(timed_forward(cached, pixels, args.batch_size, device))
        cached.vit_cache.items = 0
        per_image = next(iter(cached.vit_cache.memory.values()), None)
        row = {"variant": variant, "device": str(device), "vit_params_M": round(n_vit / 1e6, 1),
               "qformer_params_M": round(n_q / 1e6, 1), "image_size": size,
               "ms_per_image": round(1000 * min(plain_s) / args.images, 2),
               "ms_per_image_vit_cached": round(1000 * min(cached_s) / args.images, 2),
               "ratio": round(min(plain_s) / max(min(cached_s), 1e-9), 2),
               "vit_cache_kb_per_image": None if per_image is None else round(per_image.numel() * per_image.element_size() / 1024, 1),
               "forward_peak_mb" if device.type == "cuda" else "rss_growth_mb": round(fwd_peak - (0 if device.type == "cuda" else before), 1)}
        del plain, cached
        batches = [int(b) for b in args.train_batches.split(",") if b]
        if len(batches) == 2:
            peaks = [train_step_peak(variant, b, device, args.gradient_checkpointing) for b in batches]
            slope = (peaks[1] - peaks[0]) / (batches[1] - batches[0])
            row.update({"train_batches": batches, "train_peak_mb": [round(p, 1) for p in peaks],
                        "gradient_checkpointing": args.gradient_checkpointing,
                        f"train_peak_mb_at_{args.public_batch}_estimate": round(peaks[0] + slope * (args.public_batch - batches[0]), 1)})
        results.append(row)
        print(json.dumps(row), flush=True)
        print(f"ratio: {row['ratio']}  ({variant}: uncached / ViT-cached forward time per image)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
