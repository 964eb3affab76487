"""How close does `cir train`'s loop get to the bare model's optimizer steps?

Toolkit: ``train.loop.Trainer.run`` on a generated user-format dataset (JSONL + photo-sized
JPEGs), from the first training step to the end of the run: data loading (pixels or cached
features, collation, tokenisation, device copies), progress/logging, the checkpoints at the
loop's cadence (best/ and last/ once the unwritten epochs took ``checkpoint_every_s``, default
60 s, and at the end; written by the loop's background writer, the run waits for the last
one; ``--checkpoint-every-s 0`` writes every epoch), metrics.jsonl and curves.png. Validation
is left out (its cost depends on the split, not on the loop): the time spent in evaluation is
subtracted. The weights a stage does not train (a frozen tower) are written once when the
stage starts, before its first step, like the feature cache; the time is printed beside the
ratio.
Bare: the run's own method and optimizer, with the same autocast, ``forward + backward + clip +
step`` on one batch that is already on the device. It runs right after each toolkit epoch for as
many steps, off the toolkit's clock (a checkpoint still being written is waited for first, on
the toolkit's clock), so each epoch is paired with a bare segment a second away: the bare loop
alone drifts 30 % within one process on these 2 shared cores, and two runs one after the other
measured that drift, not the loop. (The bare steps train the run's model further, so its metrics
are not a clean run's; a copy of the model instead made both loops slower, their working sets
evicting each other from the caches.) Both clocks start after one untimed step (the toolkit's
first optimizer step, the bare loop's warm-up step). ``--repeats N`` runs every case N times and
reports the median ratio.

Cases: each ``--models`` entry with the towers trained (``finetune`` stage, pixels) and frozen
(``combiner`` stage, cached features). An epoch here is ``--steps`` steps; each line says how
often best/ + last/ were written (a run shorter than the cadence writes once, at its end: that
write has nothing to overlap and is on the clock).

    python benchmarks/train_speed.py                                  # tiny, ViT-B-32, RN50x4, CPU
    python benchmarks/train_speed.py --models tiny --steps 20 --epochs 2
    python benchmarks/train_speed.py --models tiny --checkpoint-every-s 0   # every epoch written
    python benchmarks/train_speed.py --device cuda --batch-size 128 --steps 50
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from composed_retrieval.config import DEFAULTS, load_config
from composed_retrieval.evaluation import runner
from composed_retrieval.train import checkpoint as ckpt
from composed_retrieval.train import loop


def write_dataset(folder: Path, n_queries: int, n_images: int = 48, seed: int = 0) -> Path:
    """A user-format JSONL over photo-sized JPEGs (400x300, noise and blocks)."""
    rng = np.random.default_rng(seed)
    images = folder / "images"
    images.mkdir(parents=True)
    for i in range(n_images):
        arr = (rng.random((300, 400, 3)) * 50).astype(np.uint8)
        y, x = rng.integers(0, 200), rng.integers(0, 300)
        arr[y:y + 100, x:x + 100] = rng.integers(0, 256, 3)
        Image.fromarray(arr).save(images / f"im{i:03d}.jpg", quality=90)
    words = ["red", "blue", "bigger", "smaller", "left", "right", "two", "three"]
    lines = []
    for q in range(n_queries):
        a, b = rng.choice(n_images, 2, replace=False)
        caption = " ".join(rng.choice(words, 5))
        lines.append(json.dumps({"reference": f"im{a:03d}.jpg", "caption": f"make it {caption}", "target": f"im{b:03d}.jpg"}))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "train.jsonl"


def random_weight_options(model: str) -> dict[str, Any]:
    """Encoder options: random open_clip weights must be asked for explicitly."""
    if not model.startswith("open_clip:"):
        return {"image_width": 64, "text_width": 128, "embed_dim": 128} if model == "tiny" else {}
    return {"random_weights": True}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedTrainer(loop.Trainer):
    """The real Trainer; it notes when training starts and how long evaluation takes, and after
    each of its epochs runs the bare loop for as many steps on the same method and optimizer
    (that pause is off the toolkit's clock). Pairing each epoch with its bare segment
    cancels the drift of these 2 shared cores over a run (the bare loop alone moves 30 % within
    one process), which two runs one after the other do not."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.first_step_at: float | None = None
        self.eval_seconds = 0.0
        self.paused_seconds = 0.0
        self.bare_seconds = 0.0
        self.bare_steps = 0
        self.bare_warm = False
        self.captured: dict[str, Any] = {}
        self.writers: list[ckpt.CheckpointWriter] = []

    def _train_epoch(self, method, loader, optimizer, amp, stage, global_epoch):  # type: ignore[no-untyped-def]
        if self.first_step_at is None and "hook" not in self.captured:
            # the clock starts when the first optimizer step has finished: the bare loop's
            # warm-up step is not timed either (first-call allocations, lazy kernel setup)
            def started(*_: Any) -> None:
                if self.first_step_at is None:
                    sync(self.device)
                    self.first_step_at = time.perf_counter()
            self.captured["hook"] = optimizer.register_step_post_hook(started)
        out = super()._train_epoch(method, loader, optimizer, amp, stage, global_epoch)
        sync(self.device)
        for writer in self.writers:   # a checkpoint still being written is the toolkit's time
            writer.wait()
        paused = time.perf_counter()
        self._bare_segment(method, optimizer, amp, out["steps"])
        self.paused_seconds += time.perf_counter() - paused
        return out

    def _to_device(self, method, batch):  # type: ignore[no-untyped-def]
        out = super()._to_device(method, batch)
        self.captured.setdefault("batch", out)
        return out

    def image_table(self, method, splits, role):  # type: ignore[no-untyped-def]
        if self.first_step_at is None or role == "train":
            return super().image_table(method, splits, role)
        t0 = time.perf_counter()
        try:
            return super().image_table(method, splits, role)
        finally:
            self.eval_seconds += time.perf_counter() - t0

    def _bare_segment(self, method, optimizer, amp: bool, steps: int) -> None:  # type: ignore[no-untyped-def]
        """forward + backward + clip + step on one batch already on the device, with the run's
        method, optimizer and autocast."""
        first, self.bare_warm = not self.bare_warm, True
        if first:
            steps -= 1                 # the toolkit's first step is off its clock: warm up instead
        params = method.trainable_parameters()
        batch = self.captured["batch"]
        clip = float(self.cfg["grad_clip"]) if self.cfg.get("grad_clip") else None
        method.train()
        if method.image_tower_frozen:
            method.encoder.eval()

        def step() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                out = method(batch)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()

        if first:
            step()
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(self.device)
        self.bare_seconds += time.perf_counter() - t0
        self.bare_steps += steps


def run_case(model: str, towers: bool, args: argparse.Namespace, data: Path, tmp: Path) -> tuple[float, float, int]:
    stage = {"name": "finetune", "epochs": args.epochs, "lr": 1e-5, "train_image_tower": True, "train_text_tower": True} \
        if towers else {"name": "combiner", "epochs": args.epochs, "lr": 1e-4}
    cfg = load_config(None, [], {
        "method": "combiner", "encoder": model, "encoder_config": random_weight_options(model),
        "dataset": "user", "root": str(data), "image_root": str(data.parent / "images"),
        "batch_size": args.batch_size, "seed": 0, "device": args.device, "stages": [stage],
        "max_steps_per_epoch": args.steps, "eval_batch_size": 64, "cache_dir": str(tmp / "cache"),
        **({} if args.checkpoint_every_s is None else {"checkpoint_every_s": args.checkpoint_every_s})})
    trainer = TimedTrainer(cfg, tmp / f"run-{model.replace(':', '_')}-{towers}", resume=False, progress=args.progress)
    evaluate = runner.evaluate_method

    def timed_evaluate(*a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return evaluate(*a, **kw)
        finally:
            trainer.eval_seconds += time.perf_counter() - t0

    class Writer(ckpt.CheckpointWriter):
        def __init__(self) -> None:
            super().__init__()
            trainer.writers.append(self)
            self.submitted = 0

        def submit(self, job: Any) -> None:
            self.submitted += 1
            super().submit(job)

    runner.evaluate_method = timed_evaluate   # the loop imports it from the module at run time
    store_frozen, writer_class = ckpt.store_frozen, ckpt.CheckpointWriter
    frozen_s = [0.0]

    def timed_store_frozen(*a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return store_frozen(*a, **kw)
        finally:
            frozen_s[0] += time.perf_counter() - t0

    ckpt.store_frozen, ckpt.CheckpointWriter = timed_store_frozen, Writer
    try:
        trainer.run()
    finally:
        runner.evaluate_method = evaluate
        ckpt.store_frozen, ckpt.CheckpointWriter = store_frozen, writer_class
    args.frozen_s = frozen_s[0]
    args.writes = sum(w.submitted for w in trainer.writers)
    sync(trainer.device)
    toolkit_s = time.perf_counter() - trainer.first_step_at - trainer.eval_seconds - trainer.paused_seconds  # type: ignore[operator]
    rows = [json.loads(line) for line in trainer.metrics_path.read_text().splitlines()]
    steps = sum(r["steps"] for r in rows) - 1    # the first step is before the clock starts
    if trainer.bare_steps != steps:
        raise RuntimeError(f"bare loop ran {trainer.bare_steps} steps, the toolkit {steps}")
    return toolkit_s, trainer.bare_seconds, steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,open_clip:ViT-B-32,open_clip:RN50x4")
    ap.add_argument("--towers", default="on,off", help="on (train the towers), off (frozen, cached features), or both")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per epoch")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--progress", action="store_true", help="show the loop's progress bars")
    ap.add_argument("--checkpoint-every-s", type=float, default=None,
                    help="the loop's checkpoint cadence (default: the config's, 60 s; 0: every epoch)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of every case; the median ratio counts")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    print(f"device {device}  batch {args.batch_size}  steps/epoch {args.steps}  epochs {args.epochs}  "
          f"torch threads {torch.get_num_threads()}  amp {'bf16' if device.type == 'cuda' else 'off (CPU fp32)'}  "
          f"checkpoint_every_s {DEFAULTS['checkpoint_every_s'] if args.checkpoint_every_s is None else args.checkpoint_every_s}")
    ratios = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = write_dataset(tmp / "data", args.batch_size * args.steps)
        for model in args.models.split(","):
            for towers in args.towers.split(","):
                case = []
                for repeat in range(args.repeats):
                    toolkit_s, bare_s, steps = run_case(model, towers == "on", args, data, tmp / f"r{repeat}")
                    kit, bare = steps / toolkit_s, steps / bare_s
                    case.append(kit / bare)
                    once = f"; frozen weights written once, before the first step: {args.frozen_s:.2f} s" \
                        if args.frozen_s > 0.05 else ""
                    print(f"{model:22s} towers {towers:3s}  toolkit {kit:8.2f} steps/s  bare {bare:8.2f} steps/s  "
                          f"ratio {kit / bare:.3f}  ({steps} timed steps, {toolkit_s:.1f} s; "
                          f"best/ + last/ written {args.writes}x{once})", flush=True)
                ratios.append(float(np.median(case)))
                if args.repeats > 1:
                    print(f"{model:22s} towers {towers:3s}  median ratio of {args.repeats}: {ratios[-1]:.3f}", flush=True)
    print(f"ratio: {min(ratios):.3f} (worst case; goal >= 0.9)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
