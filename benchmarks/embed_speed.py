"""How close does the toolkit's gallery embedding get to the bare model forward?

Toolkit: ``encoders.embed.embed_images`` on JPEG and PNG files on disk (decode, preprocess,
batch, DataLoader workers, device copy, results gathered on the CPU). Bare: ``encoder.encode_image``
on tensors that were decoded and preprocessed beforehand (fp16 autocast on CUDA, as the toolkit).
Same model, same run, same batch size; each is measured ``--repeats`` times, alternating, and the
ratio is the median over repeats of toolkit / bare within one repeat (paired, as train_speed.py
pairs its epochs: on these 2 shared cores one process's speed drifts by a third within a run, and
taking each side's best run let the bare side's first, fastest run set the ratio). The best-run
ratio is printed beside it. The toolkit runs its default decoder ("fast"); ``--compare-decoders`` also
times decoder="pillow" (the variant timed later in each repeat tends to win by a few percent on
2 cores, so compare the two over several runs); ``--compare-workers N`` also times the fast decoder
with N DataLoader worker processes (the CPU default decodes in this process between forwards,
a thread per core). Goal: >= 0.93 on CPU for both formats, >= 0.8 on GPU.

    python benchmarks/embed_speed.py                      # ViT-B-32, random weights, CPU
    python benchmarks/embed_speed.py --device cuda --n 2048 --batch-size 256
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from composed_retrieval.encoders.embed import default_num_workers, embed_images
from composed_retrieval.encoders.registry import build_encoder
from composed_retrieval.data.images import load_image


def write_images(folder: Path, n: int, width: int, height: int, seed: int = 0, fmt: str = "png") -> list[str]:
    """Photo-sized images with shapes and noise (noise keeps PNG decoding honest)."""
    gen = torch.Generator().manual_seed(seed)
    names = []
    for i in range(n):
        noise = (torch.rand(height, width, 3, generator=gen) * 40).to(torch.uint8).numpy()
        im = Image.fromarray(noise)
        draw = ImageDraw.Draw(im)
        for _ in range(4):
            x0, y0 = int(torch.randint(0, width - 40, (1,), generator=gen)), int(torch.randint(0, height - 40, (1,), generator=gen))
            x1, y1 = x0 + int(torch.randint(20, 120, (1,), generator=gen)), y0 + int(torch.randint(20, 120, (1,), generator=gen))
            colour = tuple(int(c) for c in torch.randint(0, 256, (3,), generator=gen))
            (draw.ellipse if i % 2 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
        name = f"img{i:05d}"
        im.save(folder / f"{name}.{fmt}", **({"quality": 90} if fmt == "jpg" else {}))
        names.append(name)
    return names


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_forward(encoder, pixels: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Seconds for the model alone on pre-decoded, pre-processed tensors (already on the device
    when it is a GPU, as a best case)."""
    autocast = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode(), autocast:
        for i in range(0, len(pixels), batch_size):
            encoder.encode_image(pixels[i:i + batch_size])
    sync(device)
    return time.perf_counter() - start


def toolkit(encoder, names, path_of, transform, batch_size, workers, device, decoder="fast") -> float:
    sync(device)
    start = time.perf_counter()
    feats, kept, errors = embed_images(encoder, names, path_of, transform, batch_size=batch_size,
                                       num_workers=workers, device=device, progress=False, decoder=decoder)
    sync(device)
    assert len(kept) == len(names) and not errors
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="open_clip:ViT-B-32", help="encoder name (tiny, open_clip:<model>)")
    ap.add_argument("--checkpoint", default=None, help="weights file (default: random weights)")
    ap.add_argument("--n", type=int, default=256, help="number of images per format")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the toolkit's choice)")
    ap.add_argument("--image-px", default="400x300", help="size of the generated images, WxH")
    ap.add_argument("--formats", default="jpg,png", help="comma-separated: jpg, png")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compare-decoders", action="store_true",
                    help="also time decoder='pillow'")
    ap.add_argument("--compare-workers", type=int, default=None,
                    help="also time the fast decoder with this many DataLoader workers (0: decode in this process)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    encoder = build_encoder(args.model, checkpoint=args.checkpoint, random_weights=args.checkpoint is None).to(device).eval()
    transform = encoder.image_transform("targetpad")
    width, height = (int(v) for v in args.image_px.lower().split("x"))
    workers = default_num_workers(device) if args.workers is None else args.workers
    print(f"model {args.model}  device {device}  n {args.n}  batch {args.batch_size}  "
          f"images {width}x{height}  workers {workers}  torch threads {torch.get_num_threads()}  "
          f"cpus {len(os.sched_getaffinity(0))}")

    ratios = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats.split(","):
            folder = Path(tmp) / fmt
            folder.mkdir()
            names = write_images(folder, args.n, width, height, fmt=fmt)
            path_of = lambda n, folder=folder, fmt=fmt: folder / f"{n}.{fmt}"  # noqa: E731
            t0 = time.perf_counter()
            pixels = torch.stack([transform(load_image(path_of(n))) for n in names])
            decode_s = time.perf_counter() - t0
            pixels = pixels.to(device)
            with torch.inference_mode():  # warm-up (kernel selection, allocator, lazy init)
                encoder.encode_image(pixels[: args.batch_size])
            bare, kit, pil, alt = [], [], [], []
            other = "pillow"
            for _ in range(args.repeats):
                bare.append(bare_forward(encoder, pixels, args.batch_size, device))
                kit.append(toolkit(encoder, names, path_of, transform, args.batch_size, workers, device))
                if args.compare_decoders:
                    pil.append(toolkit(encoder, names, path_of, transform, args.batch_size, workers, device, other))
                if args.compare_workers is not None:
                    alt.append(toolkit(encoder, names, path_of, transform, args.batch_size, args.compare_workers, device))
            bare_ips, kit_ips = args.n / min(bare), args.n / min(kit)
            print(f"[{fmt}] Pillow decode+preprocess alone (1 process): {args.n / decode_s:8.1f} images/s")
            print(f"[{fmt}] bare model forward:                  {bare_ips:8.1f} images/s  (runs: {', '.join(f'{t:.2f}s' for t in bare)})")
            print(f"[{fmt}] toolkit embed_images from files:     {kit_ips:8.1f} images/s  (runs: {', '.join(f'{t:.2f}s' for t in kit)})")
            if pil:
                print(f"[{fmt}] toolkit, decoder={other!r}:            {args.n / min(pil):8.1f} images/s  "
                      f"(paired with bare: {statistics.median(b / t for b, t in zip(bare, pil)):.3f})")
            if alt:
                print(f"[{fmt}] toolkit, {args.compare_workers} workers:               {args.n / min(alt):8.1f} images/s  "
                      f"(paired with bare: {statistics.median(b / t for b, t in zip(bare, alt)):.3f}; "
                      f"runs: {', '.join(f'{t:.2f}s' for t in alt)})")
            paired = [b / k for b, k in zip(bare, kit)]
            ratios[fmt] = statistics.median(paired)
            print(f"[{fmt}] ratio toolkit / bare: {ratios[fmt]:.3f} (median of repeats {', '.join(f'{r:.3f}' for r in paired)}; "
                  f"best runs {kit_ips / bare_ips:.3f})")
            del pixels
    goal = 0.93 if device.type == "cpu" else 0.8
    print(f"ratio: {min(ratios.values()):.3f} (worst of {', '.join(f'{k} {v:.3f}' for k, v in ratios.items())}; goal >= {goal:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
