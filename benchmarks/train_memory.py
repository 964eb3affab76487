"""Training memory with and without gradient checkpointing of the open_clip towers.

One optimizer step of the Combiner's ``finetune`` stage (both towers trained, element-wise sum
query, the loop's batch-based contrastive loss) on random pixels and captions.

CPU: each measurement runs in a fresh process and reports its peak resident memory (ru_maxrss);
two batch sizes give the per-sample slope (MB per triplet), which is what checkpointing
changes; the model and optimizer state are the intercept. GPU: ``torch.cuda.max_memory_allocated``
of one step at each paper config's batch size (configs/*_paper.json), in this process.

    python benchmarks/train_memory.py                                  # ViT-B-32, CPU, batches 2 and 6
    python benchmarks/train_memory.py --model open_clip:RN50x4 --batches 2,4
    python benchmarks/train_memory.py --device cuda                     # paper batch sizes
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "composed_retrieval" / "configs"


def paper_batch_sizes() -> dict[str, int]:
    out = {}
    for path in sorted(CONFIGS.glob("*_paper.json")):
        cfg = json.loads(path.read_text())
        if "batch_size" in cfg:
            out[path.stem] = int(cfg["batch_size"])
    return out


def encoder_options(model: str, checkpointing: bool) -> dict:
    from train_speed import random_weight_options   # benchmarks/ sibling: one place for that rule
    return {**random_weight_options(model), **({"grad_checkpointing": True} if checkpointing else {})}


def one_step(model: str, batch: int, checkpointing: bool, device: torch.device) -> None:
    from composed_retrieval.encoders.registry import build_encoder
    from composed_retrieval.methods.registry import build_method

    torch.manual_seed(0)
    encoder = build_encoder(model, **encoder_options(model, checkpointing))
    method = build_method("combiner", encoder, {}).to(device)
    method.set_stage("finetune")
    method.train_image_tower = method.train_text_tower = True
    for p in method.parameters():
        p.requires_grad_(False)
    params = method.trainable_parameters()
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    size = encoder.image_size
    pixels = torch.randn(2 * batch, 3, size, size, device=device)
    text = encoder.tokenize([f"make it number {i} and red" for i in range(batch)]).to(device)
    out = method({"reference": pixels[:batch], "target": pixels[batch:], "text": text,
                  "caption": ["x"] * batch, "index": torch.arange(batch)})
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    optimizer.step()


def child(args: argparse.Namespace) -> int:
    one_step(args.model, args.child_batch, args.child_ckpt, torch.device("cpu"))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux
    print(json.dumps({"peak_mb": peak_mb}))
    return 0


def cpu_peak(model: str, batch: int, ckpt: bool) -> float:
    cmd = [sys.executable, __file__, "--model", model, "--child-batch", str(batch)] + (["--child-ckpt"] if ckpt else [])
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"measurement failed: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}")
    return float(json.loads(res.stdout.strip().splitlines()[-1])["peak_mb"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="open_clip:ViT-B-32")
    ap.add_argument("--batches", default="2,6", help="CPU: two batch sizes (triplets) for the slope")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--child-batch", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-ckpt", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if args.child_batch is not None:
        return child(args)

    device = torch.device(args.device)
    if device.type == "cuda":
        slopes = {}
        for name, batch in paper_batch_sizes().items():
            row = []
            for ckpt in (False, True):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                try:
                    one_step(args.model, batch, ckpt, device)
                    torch.cuda.synchronize(device)
                    peak = torch.cuda.max_memory_allocated(device) / 2**20
                except torch.cuda.OutOfMemoryError:
                    peak = float("nan")
                row.append(peak)
            slopes[name] = row
            print(f"{name:18s} batch {batch:4d}  peak {row[0]:9.0f} MB  with checkpointing {row[1]:9.0f} MB  "
                  f"per sample {row[0] / batch:7.1f} / {row[1] / batch:7.1f} MB")
        ratios = [b / a for a, b in slopes.values() if a == a and b == b and a > 0]
        if ratios:
            print(f"ratio: {max(ratios):.3f} (peak with / without checkpointing, worst config; lower is better)")
        return 0

    b1, b2 = (int(x) for x in args.batches.split(","))
    print(f"model {args.model}  device cpu  batches {b1}, {b2} (triplets; {2 * b1}, {2 * b2} images)  "
          f"torch threads {torch.get_num_threads()}")
    slope = {}
    for ckpt in (False, True):
        p1, p2 = cpu_peak(args.model, b1, ckpt), cpu_peak(args.model, b2, ckpt)
        slope[ckpt] = (p2 - p1) / (b2 - b1)
        print(f"checkpointing {'on ' if ckpt else 'off'}: peak RSS {p1:8.0f} MB at batch {b1}, {p2:8.0f} MB at batch {b2}  "
              f"-> {slope[ckpt]:6.1f} MB per triplet")
    print(f"ratio: {slope[True] / slope[False]:.3f} (per-triplet memory with / without checkpointing; lower is better)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
