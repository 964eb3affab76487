"""Cost of SPN's static-negative bank at scale: build, save/load, and one training step.

Builds a bank of ``--n`` images (default 100k, d=640 as CLIP RN50x4) from cached features
(random float16 rows stand in for the feature cache: the measurement is the same), through
``spn.bank.build_bank`` with the Combiner's gallery side; saves and reloads it (safetensors);
then times the bank loss of one training step for a query batch (default 128): ``q @ bank.T /
tau``, cross-entropy and backward to the query, with the whole bank and with k sampled
negatives; and, for scale, a whole step with a Combiner head (d=640) and its AdamW update. Prints a markdown table.

    python benchmarks/spn_bank.py                       # CPU
    python benchmarks/spn_bank.py --device cuda
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from composed_retrieval.encoders.base import Features
from composed_retrieval.spn.bank import bank_loss, build_bank, load_bank, save_bank
from composed_retrieval.cache import FeatureTable


class _Split:
    """Only what build_bank reads from a split when dedup is off."""

    dataset, category, split = "bench", None, "train"


class _Head(torch.nn.Module):
    """A stand-in method: the Combiner's default gallery side and a trainable query head."""

    def __init__(self, d: int) -> None:
        super().__init__()
        from composed_retrieval.methods.combiner import CombinerNet
        self.net = CombinerNet(d)

    def gallery_embedding(self, f: Features) -> torch.Tensor:
        return torch.nn.functional.normalize(f.pooled.float(), dim=-1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, device: torch.device, repeats: int) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    best, out = float("inf"), None
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=640)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--k", type=int, default=1024, help="sampled negatives for the k variant")
    ap.add_argument("--tau", type=float, default=0.02)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    rows: list[tuple[str, str, str]] = []

    names = [f"img{i:07d}" for i in range(args.n)]
    cached = FeatureTable(names, Features(torch.randn(args.n, args.dim).half(), torch.zeros(args.n, 0, 1).half()))
    rss0 = _rss_mb()
    head = _Head(args.dim).to(device)
    cuda_mem = lambda: torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")  # noqa: E731
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_build, bank = timed(lambda: build_bank(head, [_Split()], [cached], device, dedup=False), device, 1)
    bank_mb = bank.vectors.numel() * bank.vectors.element_size() / 2**20
    rows.append(("build bank from cached features", f"{t_build * 1000:.0f} ms",
                 f"bank {bank_mb:.0f} MiB float32; peak RSS +{_rss_mb() - rss0:.0f} MiB"
                 + (f"; peak GPU {cuda_mem():.0f} MiB" if device.type == "cuda" else "")))

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stage1.safetensors"
        t_save, _ = timed(lambda: save_bank(bank, path, "bench"), device, 1)
        t_load, loaded = timed(lambda: load_bank(path, "bench"), device, args.repeats)
        assert loaded is not None and torch.equal(loaded.vectors, bank.vectors.cpu())
        rows.append(("save bank (safetensors + JSON names)", f"{t_save * 1000:.0f} ms",
                     f"{path.stat().st_size / 2**20:.0f} MiB + {path.with_suffix('.json').stat().st_size / 2**20:.1f} MiB"))
        rows.append(("load bank", f"{t_load * 1000:.0f} ms", "key and size checked"))

    target = torch.randint(args.n, (args.batch,), device=device)
    q0 = torch.nn.functional.normalize(torch.randn(args.batch, args.dim, device=device), dim=-1)

    def loss_step(k: int | None):  # type: ignore[no-untyped-def]
        def run() -> float:
            q = q0.clone().requires_grad_(True)    # the query as a leaf: the bank's share of a step
            loss = bank_loss(q, bank.vectors, target, args.tau, k)
            loss.backward()
            return float(loss.detach())
        return run

    for label, k in (("bank loss fwd+bwd, whole bank", None), (f"bank loss fwd+bwd, k={args.k} sampled negatives", args.k)):
        loss_step(k)()   # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        before = _rss_mb()
        t, loss = timed(loss_step(k), device, args.repeats)
        logits_mb = args.batch * ((k + 1) if k else args.n) * 4 / 2**20
        extra = (f"; gathered candidate rows {args.batch * (k + 1) * args.dim * 4 / 2**20:.0f} MiB" if k else "")
        mem = f"peak GPU {cuda_mem():.0f} MiB" if device.type == "cuda" else f"peak RSS +{max(0.0, _rss_mb() - before):.0f} MiB"
        rows.append((label, f"{t * 1000:.1f} ms", f"batch {args.batch}; logits {logits_mb:.1f} MiB{extra}; {mem}; loss {loss:.3f}"))

    # for scale: the rest of a real step (a Combiner head at d=640 and its AdamW update)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-5)
    ref, txt = q0, torch.nn.functional.normalize(torch.randn(args.batch, args.dim, device=device), dim=-1)

    def full_step() -> float:
        q = torch.nn.functional.normalize(head.net(ref, txt), dim=-1)
        loss = bank_loss(q, bank.vectors, target, args.tau)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    full_step()
    t, loss = timed(full_step, device, args.repeats)
    n_head = sum(p.numel() for p in head.parameters())
    rows.append(("whole training step (Combiner head + AdamW + bank loss)", f"{t * 1000:.1f} ms",
                 f"head {n_head / 1e6:.0f}M parameters; loss {loss:.3f}"))

    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"SPN bank: n={args.n:,}, d={args.dim}, tau={args.tau}, {dev}, torch {torch.__version__} (best of {args.repeats})\n")
    print("| what | time | memory / notes |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
