"""Several processes (gloo on CPU) give what one process gives: same batches, losses, weights,
same gallery index; interrupted ranks resume."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from composed_retrieval.config import load_config
from composed_retrieval.train import checkpoint as ckpt
from composed_retrieval.train import distributed
from composed_retrieval.train.loop import Trainer, build_method_from_config, seed_everything

LR = 1e-3


def _launch(fn, *args, nprocs: int = 2) -> None:  # type: ignore[no-untyped-def]
    """Run ``fn(rank, *args)`` in ``nprocs`` processes. Forked, so the children need not import
    torch again (seconds each on 2 cores); torch resets its thread pools after a fork."""
    mp.start_processes(fn, args=args, nprocs=nprocs, start_method="fork")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)


def _cfg(root: Path) -> dict:
    # both towers train (batch norm, text transformer, gradients through gathered targets),
    # then the Combiner trains on cached features: two stages, two DDP wrappers.
    # Dropout 0: with dropout, ranks draw their own masks and agree only in distribution.
    return load_config(None, [], {
        "method": "combiner", "encoder": "tiny", "dataset": "cirr", "root": str(root),
        "encoder_config": {"image_width": 32, "text_width": 64, "embed_dim": 64},
        "method_config": {"dropout": 0.0}, "batch_size": 16, "seed": 0, "device": "cpu",
        "stages": [{"name": "finetune", "epochs": 1, "lr": LR, "train_image_tower": True, "train_text_tower": True},
                   {"name": "combiner", "epochs": 1, "lr": LR}],
        "max_steps_per_epoch": 2,
    })


# ---- the global batch ----------------------------------------------------------------------
@pytest.mark.parametrize("length,batch,world", [(45, 16, 2), (45, 16, 3), (10, 16, 4), (37, 8, 2)])
def test_rank_slices_are_the_single_process_batches(length: int, batch: int, world: int) -> None:
    drop_last = length > batch

    def single() -> list[list[int]]:
        gen = torch.Generator().manual_seed(123)
        loader = DataLoader(list(range(length)), batch_size=batch, shuffle=True, drop_last=drop_last,
                            generator=gen, collate_fn=list)
        return list(loader)

    per_rank = []
    for rank in range(world):
        gen = torch.Generator().manual_seed(123)
        sampler = distributed.RankSliceBatchSampler(length, batch, drop_last, gen, rank, world)
        per_rank.append(list(DataLoader(list(range(length)), batch_sampler=sampler, generator=gen, collate_fn=list)))
    expected = single()
    assert [sum((r[i] for r in per_rank), []) for i in range(len(expected))] == expected
    assert all(len(r) == len(expected) for r in per_rank)
    sizes = [len(r[0]) for r in per_rank]
    assert max(sizes) - min(sizes) <= 1


def test_batch_smaller_than_world_is_refused() -> None:
    from composed_retrieval.errors import ConfigError
    with pytest.raises(ConfigError, match="smaller than the 4 processes"):
        distributed.RankSliceBatchSampler(10, 3, False, torch.Generator(), 0, 4)


# ---- losses and batch norm over the global batch ---------------------------------------------
def _loss_worker(rank: int, world: int, port: int, out: str) -> None:
    """Each rank holds its rows of one global batch; losses and gradients are written out."""
    from composed_retrieval import losses

    _join(rank, world, port)
    distributed.setup("cpu")
    g = torch.Generator().manual_seed(0)
    q, t = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    bn = torch.nn.BatchNorm1d(5)
    x = torch.randn(7, 5, generator=g)
    lo, hi = distributed.shard_bounds(7, rank, world)   # uneven: 3 and 4 rows
    q, t, x = (v[lo:hi].clone().requires_grad_() for v in (q, t, x))
    bn = distributed.sync_batchnorm(bn, torch.device("cpu"))
    with distributed.global_batch():
        a = losses.batch_contrastive(torch.nn.functional.normalize(q, dim=-1),
                                     torch.nn.functional.normalize(t, dim=-1), 10.0)
        s = losses.symmetric_contrastive(q, t, 1.0)
        y = bn(x)
        total = a + s + (y * torch.arange(1.0, 6.0)).sum() / 7 * world
    total.backward()
    # DDP averages gradients over ranks; do the same by hand for the inputs' own rows
    torch.save({"a": a.detach(), "s": s.detach(), "gq": q.grad / world, "gt": t.grad / world,
                "gx": x.grad / world, "rm": bn.running_mean, "rv": bn.running_var}, f"{out}.{rank}")
    distributed.shutdown()


def test_gathered_losses_and_batch_norm_match_one_process(tmp_path: Path) -> None:
    from composed_retrieval import losses

    g = torch.Generator().manual_seed(0)
    q, t = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    bn = torch.nn.BatchNorm1d(5)
    x = torch.randn(7, 5, generator=g)
    q, t, x = (v.clone().requires_grad_() for v in (q, t, x))
    a = losses.batch_contrastive(torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(t, dim=-1), 10.0)
    s = losses.symmetric_contrastive(q, t, 1.0)
    y = bn(x)
    (a + s + (y * torch.arange(1.0, 6.0)).sum() / 7).backward()

    _launch(_loss_worker, 2, _free_port(), str(tmp_path / "r"))
    r = [torch.load(tmp_path / f"r.{k}") for k in range(2)]
    # the ranks' losses average to the global one (their rows: 3 and 4 of 7)
    assert torch.allclose((r[0]["a"] + r[1]["a"]) / 2, a, atol=1e-5)
    assert torch.allclose((r[0]["s"] + r[1]["s"]) / 2, s, atol=1e-5)
    for key, full in (("gq", q.grad), ("gt", t.grad), ("gx", x.grad)):
        assert torch.allclose(torch.cat([r[0][key], r[1][key]]), full, atol=1e-6), key
    for k in range(2):
        assert torch.allclose(r[k]["rm"], bn.running_mean, atol=1e-6)
        assert torch.allclose(r[k]["rv"], bn.running_var, atol=1e-6)


# ---- training ------------------------------------------------------------------------------
def _train_worker(rank: int, world: int, port: int, cfg: dict, run: str, crash_after: int) -> None:
    _join(rank, world, port)
    if crash_after:
        original = Trainer._write_history

        def crash(self, history):  # type: ignore[no-untyped-def]
            original(self, history)
            if len(history) == crash_after:
                raise KeyboardInterrupt("simulated interruption")
        Trainer._write_history = crash  # type: ignore[method-assign]
    try:
        Trainer(cfg, run, progress=False).run()
    finally:
        distributed.shutdown()


def _displacement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys: list[str]) -> float:
    return float(sum(((a[k].float() - b[k].float()) ** 2).sum() for k in keys) ** 0.5)


def test_two_ranks_train_like_one_process_and_resume(synth_tiny: Path, tmp_path: Path) -> None:
    cfg = _cfg(synth_tiny)
    one = tmp_path / "one" / "run"
    Trainer(cfg, one, progress=False).run()

    two = tmp_path / "two" / "run"
    with pytest.raises(Exception):   # rank 0 stops after epoch 1 (rank 1 sees its peer gone)
        _launch(_train_worker, 2, _free_port(), cfg, str(two), 1)
    assert [json.loads(l)["epoch"] for l in (two / "metrics.jsonl").read_text().splitlines()] == [1]
    _launch(_train_worker, 2, _free_port(), cfg, str(two), 0)   # every rank resumes

    rows1 = [json.loads(l) for l in (one / "metrics.jsonl").read_text().splitlines()]
    rows2 = [json.loads(l) for l in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows2] == ["finetune", "combiner"]
    assert [r["steps"] for r in rows2] == [2, 2]
    for r1, r2 in zip(rows1, rows2):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-3)

    w1, w2 = ckpt.load_weights(one / "last"), ckpt.load_weights(two / "last")
    assert w1.keys() == w2.keys()   # the global batch norm saves plain batch-norm keys
    seed_everything(cfg["seed"])
    w0 = build_method_from_config(cfg).state_dict()
    # Adam turns float-level differences of near-zero gradients into lr-sized steps, so the
    # weights agree up to a small fraction of how far training moved them, not bit for bit.
    # Measured: towers 4e-4 of their displacement (0.14 without the global batch norm, 0.2
    # without gathered negatives); the Combiner, trained on those towers' features, 0.08 (~1).
    for group, bound in (("encoder.", 0.01), ("combiner.", 0.3)):
        keys = [k for k in w1 if k.startswith(group) and w1[k].is_floating_point()]
        moved = _displacement(w1, w0, keys)
        assert moved > 10 * LR, group
        assert _displacement(w1, w2, keys) < bound * moved, group
    assert json.loads((two / "results.json").read_text())["epochs"] == 2, (two / "results.json").read_text()[:3000] + (two / "metrics.jsonl").read_text()


# ---- gallery index -------------------------------------------------------------------------
def _model(synth_tiny: Path, tmp_path: Path) -> tuple[Path, Path]:
    from composed_retrieval.train.checkpoint import save_method

    seed_everything(0)
    method = build_method_from_config(load_config(None, [], {
        "method": "sum", "encoder": "tiny", "encoder_config": {"image_width": 16, "text_width": 32, "embed_dim": 32}}))
    return save_method(method, tmp_path / "model"), synth_tiny / "dev"


def _index_worker(rank: int, world: int, port: int, out: str, gallery: str, model: str, fail_rank: int) -> None:
    from composed_retrieval.index import build

    _join(rank, world, port)
    distributed.setup("cpu", timeout_minutes=2)
    if rank == fail_rank:
        original = build._embed_chunk
        calls = {"n": 0}

        def embed_then_fail(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt("simulated interruption")
            return original(*args, **kwargs)
        build._embed_chunk = embed_then_fail
    try:
        report = build.build_index(out, gallery=gallery, model=model, chunk_size=5, batch_size=4,
                                   num_workers=0, progress=False)
        Path(f"{out}.embedded.{rank}").write_text(str(report.embedded))
    finally:
        distributed.shutdown()


def test_index_under_torchrun_equals_one_process(synth_tiny: Path, tmp_path: Path) -> None:
    from composed_retrieval.index.build import build_index
    from composed_retrieval.index.store import read_index

    model, gallery = _model(synth_tiny, tmp_path)
    build_index(tmp_path / "one", gallery=gallery, model=model, chunk_size=5, batch_size=4, num_workers=0,
                progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "composed_retrieval", "index", "--gallery", str(gallery), "--model", str(model),
           "--out", str(tmp_path / "two"), "--chunk-size", "5", "--batch-size", "4", "--num-workers", "0", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rank 1/2:" in done.stdout and "index " in done.stdout
    one, two = read_index(tmp_path / "one"), read_index(tmp_path / "two")
    assert two.names == one.names and two.items == one.items
    np.testing.assert_allclose(two.vectors, one.vectors, atol=1e-5)
    assert not (tmp_path / "two" / "partial").exists()


def test_interrupted_rank_resumes_its_shard(synth_tiny: Path, tmp_path: Path) -> None:
    from composed_retrieval.index.build import build_index
    from composed_retrieval.index.store import PartialBuild, read_index

    model, gallery = _model(synth_tiny, tmp_path)
    one = build_index(tmp_path / "one", gallery=gallery, model=model, chunk_size=5, batch_size=4,
                      num_workers=0, progress=False)
    out = tmp_path / "two"
    with pytest.raises(Exception):   # rank 1 dies in its 2nd chunk
        _launch(_index_worker, 2, _free_port(), str(out), str(gallery), str(model), 1)
    chunks = PartialBuild(out).chunks()
    assert any(p.name.endswith("-r1.npz") for p in chunks)
    kept, _ = PartialBuild(out).load()
    _launch(_index_worker, 2, _free_port(), str(out), str(gallery), str(model), -1)
    a, b = read_index(tmp_path / "one"), read_index(out)
    assert b.names == a.names and len(a.names) == one.count
    np.testing.assert_allclose(b.vectors, a.vectors, atol=1e-5)
    # what the interrupted run finished was not embedded again; rank 0 reports the whole index
    assert 5 <= len(kept) < one.count
    embedded_by_rank1 = int(Path(f"{out}.embedded.1").read_text())
    shard1 = one.count - one.count // 2
    assert embedded_by_rank1 == shard1 - len([n for n in kept if n in b.names[one.count // 2:]])
    assert int(Path(f"{out}.embedded.0").read_text()) == one.count - len(kept)
    meta = json.loads((out / "index.json").read_text())
    assert meta["count"] == one.count and not (out / "partial").exists()


def test_a_partial_folder_with_only_a_plan_being_written_is_ours(tmp_path: Path) -> None:
    """Ranks start a sharded build at once: one rank's plan.json temporary must not make the
    other refuse the folder as "not written by cir index" (seen under load)."""
    from composed_retrieval.errors import ConfigError
    from composed_retrieval.index.store import PartialBuild
    build = PartialBuild(tmp_path / "idx", tag="r1")
    build.folder.mkdir(parents=True)
    (build.folder / ".plan.json.x1y2.tmp").write_text("{")
    build.check_plan({"model": "m", "gallery": "g"})
    assert json.loads((build.folder / "plan.json").read_text()) == {"model": "m", "gallery": "g"}
    (build.folder / "plan.json").unlink()
    (build.folder / "mine.txt").write_text("a user's file")
    with pytest.raises(ConfigError, match="not written by `cir index`"):
        build.check_plan({"model": "m", "gallery": "g"})
