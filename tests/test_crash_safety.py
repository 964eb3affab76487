"""Crashes lose nothing: every writer is atomic, and SIGKILL at a seeded random point of
`cir train` / `cir index` followed by a rerun ends exactly where an uninterrupted run ends."""
from __future__ import annotations

import ast
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from composed_retrieval import fileio
from composed_retrieval.config import load_config
from composed_retrieval.index.build import build_index
from composed_retrieval.index.store import read_index, write_index
from composed_retrieval.train import checkpoint as ckpt
from composed_retrieval.train.loop import Trainer
from test_index import make_gallery, saved_model, tiny_method

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "composed_retrieval"
SMALL = ["encoder_config.image_width=16", "encoder_config.text_width=32", "encoder_config.embed_dim=32",
         "max_steps_per_epoch=3"]
#: writers that need not be atomic: synthetic images (the output folder carries an
#: "in progress" marker until the run completes) and that marker itself
NOT_ATOMIC_OK = {("synth/render.py", "write_bytes"), ("synth/writer.py", "write_text")}
WRITE_CALLS = {"write_text", "write_bytes", "save", "savez", "save_file", "savefig", "write_index"}


def _env() -> dict[str, str]:
    # same thread count as this test process (conftest), so float results match bit for bit
    return dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS=str(torch.get_num_threads()),
                PYTHONWARNINGS="ignore")


# ---- every writer goes through fileio.atomic_write* ------------------------------------------
def _writes(tree: ast.AST) -> list[tuple[ast.Call, list[ast.AST]]]:
    out = []

    def visit(node: ast.AST, parents: list[ast.AST]) -> None:
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            is_open_w = name == "open" and any(isinstance(a, ast.Constant) and isinstance(a.value, str)
                                               and "w" in a.value for a in node.args[1:2])
            to_memory = bool(node.args) and isinstance(node.args[0], ast.Name) and "buf" in node.args[0].id
            own_writer = isinstance(f, ast.Name) and name == "write_index"  # index/store.py, atomic itself
            if (name in WRITE_CALLS or is_open_w) and not to_memory and not own_writer:
                out.append((node, parents))
        for child in ast.iter_child_nodes(node):
            visit(child, parents + [node])
    visit(tree, [])
    return out


def test_every_file_writer_is_atomic():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel == "fileio.py":
            continue
        tree = ast.parse(path.read_text())
        passed = {a.id for n in ast.walk(tree) if isinstance(n, ast.Call) and "atomic_write" in ast.unparse(n.func)
                  for a in n.args if isinstance(a, ast.Name)}
        for call, parents in _writes(tree):
            inside_atomic = any(isinstance(p, ast.Call) and "atomic_write" in ast.unparse(p.func) for p in parents)
            funcs = [p for p in parents if isinstance(p, ast.FunctionDef)]
            inside_passed_def = bool(funcs) and funcs[-1].name in passed
            name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
            if not (inside_atomic or inside_passed_def or (rel, name) in NOT_ATOMIC_OK):
                offenders.append(f"{rel}:{call.lineno} {ast.unparse(call)[:80]}")
    assert not offenders, "non-atomic writes:\n" + "\n".join(offenders)


def test_a_crash_at_the_rename_keeps_the_previous_file(tmp_path, monkeypatch):
    """Checkpoints, indexes and JSON files: a write cut before its rename leaves the old bytes
    and no temporary file."""
    method = tiny_method(0)
    ckpt.save_method(method, tmp_path / "ck")
    write_index(tmp_path / "idx", np.eye(3, 4, dtype=np.float32), [{"name": f"{i}", "sha256": ""} for i in range(3)],
                {"model": "m", "gallery": "g", "kind": "flat"})
    fileio.atomic_write_json(tmp_path / "sub.json", {"1": ["a"]})
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def crash(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(fileio.os, "replace", crash)
    for write in (lambda: ckpt.save_method(tiny_method(1), tmp_path / "ck"),
                  lambda: write_index(tmp_path / "idx", np.ones((2, 4), np.float32),
                                      [{"name": "x", "sha256": ""}, {"name": "y", "sha256": ""}], {"kind": "flat"}),
                  lambda: fileio.atomic_write_json(tmp_path / "sub.json", {"2": ["b"]})):
        with pytest.raises(KeyboardInterrupt):
            write()
    monkeypatch.undo()
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before
    assert ckpt.load_weights(tmp_path / "ck").keys() and read_index(tmp_path / "idx").names == ["0", "1", "2"]


def test_a_crash_between_the_folder_swap_renames_is_recovered(tmp_path, monkeypatch):
    folder = tmp_path / "last"
    ckpt.write_folder(folder, lambda d: ckpt.save_method(tiny_method(0), d, {"epoch": 1}))
    real = os.replace

    def second_rename_dies(a, b):  # the folder swap's second rename; file renames go through
        if Path(a).name == ".last.new":
            raise KeyboardInterrupt
        return real(a, b)
    monkeypatch.setattr(ckpt.os, "replace", second_rename_dies)
    with pytest.raises(KeyboardInterrupt):
        ckpt.write_folder(folder, lambda d: ckpt.save_method(tiny_method(1), d, {"epoch": 2}))
    monkeypatch.undo()
    assert not folder.exists()                       # cut between "last -> .last.old" and ".last.new -> last"
    ckpt.recover_folder(folder)
    assert json.loads((folder / ckpt.META).read_text())["epoch"] == 1
    assert not (tmp_path / ".last.old").exists() and not (tmp_path / ".last.new").exists()
    ckpt.load_weights(folder)                        # hash matches: a complete, consistent folder


# ---- SIGKILL at seeded random points ------------------------------------------------------------
def _kill_when(proc: subprocess.Popen, ready, delay, limit: float = 120) -> bool:
    """SIGKILL ``proc`` ``delay`` s (a number, or a function called once ``ready()`` holds)
    after ``ready()`` holds; False if it finished first."""
    t_end = time.time() + limit
    while not ready():
        if proc.poll() is not None:
            return False
        assert time.time() < t_end, "the run never reached the kill point"
        time.sleep(0.02)
    time.sleep(delay() if callable(delay) else delay)
    if proc.poll() is not None:
        return False
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


def _run(argv: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "composed_retrieval", *argv], capture_output=True, text=True,
                          env=_env(), cwd=ROOT, timeout=timeout)


def _epochs_saved(run: Path) -> int:
    try:
        return json.loads((run / "last" / ckpt.META).read_text())["epoch"]
    except (OSError, ValueError, KeyError):
        return 0


def _comparable_rows_seconds(run: Path) -> list[float]:
    """Each finished epoch's own duration (metrics.jsonl ``seconds``)."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [float(json.loads(l)["seconds"]) for l in lines if l.strip()]


def _comparable_rows(run: Path) -> list[dict]:
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("seconds", "speed")} for r in rows]   # timings


def test_sigkilled_training_resumes_to_the_uninterrupted_result(synth_tiny, tmp_path):
    rng = random.Random(1234)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps({"method": "sum", "batch_size": 16, "seed": 0, "device": "cpu",
                                    "checkpoint_every_s": 0,   # every epoch: kills land between writes
                                    "stages": [{"name": "main", "epochs": 4, "lr": 1e-3,
                                                "train_image_tower": True, "train_text_tower": True}]}))
    argv = ["train", "--config", str(cfg_path), "--root", str(synth_tiny), "--quiet"]
    for s in SMALL:
        argv += ["--set", s]

    killed_run = tmp_path / "killed"
    wait_epochs = 1                                  # the first checkpoint, then a random delay
    # epoch 1's checkpoint is written while epoch 2 trains, so the kill lands in epoch 2 or 3 and
    # epoch 4 is the margin that keeps it before the end under load
    fraction = rng.uniform(0.05, 0.95)               # of epoch 1's duration: lands inside the run,
    proc = subprocess.Popen([sys.executable, "-m", "composed_retrieval", *argv, "--out", str(killed_run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(), cwd=ROOT)
    # however fast the machine (a fixed delay in seconds outlasted the whole run on an idle one)
    killed = _kill_when(proc, lambda: _epochs_saved(killed_run) >= wait_epochs
                        and len(_comparable_rows_seconds(killed_run)) >= wait_epochs,
                        lambda: fraction * _comparable_rows_seconds(killed_run)[0])

    # the uninterrupted reference, in this process (same config the CLI builds)
    reference = tmp_path / "reference"
    cfg = load_config(cfg_path, SMALL, {"root": str(synth_tiny)})
    Trainer(cfg, reference, progress=False).run()

    resumed = _run(argv + ["--out", str(killed_run)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert killed, "the run finished before the kill point; pick an earlier one"
    for sub in ("last", "best"):
        a, b = ckpt.load_weights(reference / sub), ckpt.load_weights(killed_run / sub)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (sub, k)
    assert _comparable_rows(killed_run) == _comparable_rows(reference)
    ref_result = json.loads((reference / "results.json").read_text())
    got = json.loads((killed_run / "results.json").read_text())
    assert got["val"] == ref_result["val"] and got["best_epoch"] == ref_result["best_epoch"]
    leftovers = [p.name for p in killed_run.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers


def test_sigkilled_index_build_resumes_to_the_uninterrupted_index(tmp_path):
    rng = random.Random(99)
    gallery = tmp_path / "gallery"
    make_gallery(gallery, n=60)
    model, method = saved_model(tmp_path / "model")
    reference = tmp_path / "reference"
    build_index(reference, gallery, model, method=method, batch_size=4, chunk_size=4, progress=False,
                num_workers=0, log=lambda s: None)

    out = tmp_path / "killed"
    argv = ["index", "--gallery", str(gallery), "--model", str(model), "--out", str(out), "--quiet",
            "--batch-size", "4", "--chunk-size", "4", "--num-workers", "0"]
    wait_chunks = rng.randint(1, 8)
    delay = rng.uniform(0.0, 0.05)
    proc = subprocess.Popen([sys.executable, "-m", "composed_retrieval", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=_env(), cwd=ROOT)
    killed = _kill_when(proc, lambda: len(list((out / "partial").glob("chunk-*.npz"))) >= wait_chunks, delay)
    assert killed, "the build finished before the kill point"
    if not (out / "index.json").exists():  # (a kill after index.json landed leaves a whole index)
        rerun = _run(argv)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        reused = re.search(r"(\d+) reused", rerun.stdout)
        assert reused and int(reused.group(1)) >= 4 * wait_chunks and not (out / "partial").exists()
    a, b = read_index(reference), read_index(out)
    assert a.names == b.names and [it["sha256"] for it in a.items] == [it["sha256"] for it in b.items]
    np.testing.assert_allclose(a.vectors, b.vectors, rtol=0, atol=1e-6)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_rerun_after_a_kill_between_index_write_and_cleanup(tmp_path, monkeypatch):
    """Killed after the index is written but before partial/ is cleared: the same command
    again finishes (clears the leftovers, reports the index) instead of refusing; leftovers
    holding images the index lacks (an interrupted --add) are kept and the rerun still refuses."""
    from composed_retrieval.errors import ConfigError
    from composed_retrieval.index.store import PartialBuild

    gallery = tmp_path / "gallery"
    make_gallery(gallery, n=12)
    model, method = saved_model(tmp_path / "model")
    out = tmp_path / "idx"
    kw = dict(method=method, batch_size=4, chunk_size=4, progress=False, num_workers=0, log=lambda s: None)

    def killed(self):
        raise KeyboardInterrupt("killed before partial/ was cleared")

    monkeypatch.setattr(PartialBuild, "clear", killed)
    with pytest.raises(KeyboardInterrupt):
        build_index(out, gallery, model, **kw)
    monkeypatch.undo()
    assert PartialBuild(out).chunks()
    before = read_index(out)
    report = build_index(out, gallery, model, **kw)
    assert not (out / "partial").exists()
    assert report.count == len(before.names) == 12 and report.embedded == 0
    assert np.array_equal(read_index(out).vectors, before.vectors)

    leftover = PartialBuild(out)
    leftover.check_plan({"model": str(model.resolve()), "gallery": str(gallery.resolve())})
    leftover.write_chunk(np.zeros((1, before.vectors.shape[1]), np.float32), ["new.png"], ["0" * 64], [])
    with pytest.raises(ConfigError, match="already holds an index"):
        build_index(out, gallery, model, **kw)
    assert leftover.chunks()
