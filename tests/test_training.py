"""The one training loop: run folder outputs, checkpoints, resume, CLI, open_clip backbones."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from composed_retrieval.cli import main
from composed_retrieval.config import load_config
from composed_retrieval.errors import CheckpointError, ConfigError
from composed_retrieval.train import checkpoint as ckpt
from composed_retrieval.train.loop import Trainer


def _cfg(root: Path, **over) -> dict:
    base = {
        "method": "combiner", "encoder": "tiny", "dataset": "cirr", "root": str(root),
        "encoder_config": {"image_width": 32, "text_width": 64, "embed_dim": 64},
        "extra_eval_splits": ["heldout"], "batch_size": 16, "seed": 0, "device": "cpu",
        "stages": [{"name": "finetune", "epochs": 1, "lr": 1e-3, "train_image_tower": True, "train_text_tower": True},
                   {"name": "combiner", "epochs": 1, "lr": 1e-3}],
        "max_steps_per_epoch": 3,
    }
    base.update(over)
    return load_config(None, [], base)


def _weights(run: Path, sub: str = "last") -> dict[str, torch.Tensor]:
    return ckpt.load_weights(run / sub)


def test_run_folder_has_everything(synth_tiny: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = Trainer(_cfg(synth_tiny), run, progress=False).run()
    for name in ("config.json", "metrics.jsonl", "curves.png", "results.json",
                 "best/model.safetensors", "best/checkpoint.json", "last/state.pt"):
        assert (run / name).is_file(), name
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["finetune", "combiner"]
    assert result["best_epoch"] == 2  # the best epoch of the final stage: a Combiner run is a Combiner
    assert all(r["steps"] == 3 for r in rows)
    assert set(rows[0]["val"]) >= {"recall@1", "recall@5", "recall_subset@1", "avg"}
    assert "heldout" in rows[0] and "heldout" in result
    assert json.loads((run / "config.json").read_text())["stages"][1]["name"] == "combiner"
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_reload_gives_identical_scores(synth_tiny: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = Trainer(_cfg(synth_tiny), run, progress=False).run()
    out = main_json(["eval", "--run", str(run), "--device", "cpu", "--quiet"])
    assert {k: out[k] for k in result["val"]} == result["val"]
    assert set(out) == set(result["val"]) | {"model", "gallery"} and out["model"]["run"] == str(run.resolve())
    assert out["gallery"] == result["galleries"]["val"] and out["gallery"]["reference_removed"] is True


def main_json(argv: list[str]) -> dict:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    return json.loads(buf.getvalue())


def test_resume_continues_from_saved_epoch(synth_tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(synth_tiny, stages=[{"name": "finetune", "epochs": 2, "lr": 1e-3, "train_image_tower": True,
                                     "train_text_tower": True}, {"name": "combiner", "epochs": 2, "lr": 1e-3}])
    full = tmp_path / "full"
    Trainer(cfg, full, progress=False).run()

    # interrupt the second run right after its third epoch's checkpoint is written
    run = tmp_path / "interrupted"
    original = Trainer._write_history
    calls = {"n": 0}

    def crash(self, history):  # type: ignore[no-untyped-def]
        original(self, history)
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_write_history", crash)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, run, progress=False).run()
    monkeypatch.setattr(Trainer, "_write_history", original)
    assert json.loads((run / "checkpoint.json").read_text() if (run / "checkpoint.json").exists() else
                      (run / "last" / "checkpoint.json").read_text())["epoch"] == 3

    trained = []
    original_epoch = Trainer._train_epoch

    def spy(self, method, loader, optimizer, amp, stage, global_epoch):  # type: ignore[no-untyped-def]
        trained.append(global_epoch + 1)
        return original_epoch(self, method, loader, optimizer, amp, stage, global_epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", spy)
    Trainer(cfg, run, progress=False).run()
    assert trained == [4]  # only the missing epoch ran
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    a, b = _weights(full), _weights(run)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


def test_resume_refuses_a_different_config(synth_tiny: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    Trainer(_cfg(synth_tiny), run, progress=False).run()
    with pytest.raises(ConfigError, match="different config"):
        Trainer(_cfg(synth_tiny, seed=1), run, progress=False).run()


def test_tampered_checkpoint_is_rejected(synth_tiny: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    Trainer(_cfg(synth_tiny), run, progress=False).run()
    weights = run / "best" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="hash"):
        ckpt.load_method(run / "best")
    weights.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError):
        ckpt.load_method(run / "best")


def test_cli_train_eval_predict(synth_tiny: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg_file = tmp_path / "cfg.json"
    cfg = _cfg(synth_tiny)
    cfg_file.write_text(json.dumps({k: cfg[k] for k in ("method", "encoder", "encoder_config", "stages", "batch_size")}))
    out = main_json(["train", "--config", str(cfg_file), "--root", str(synth_tiny), "--out", str(run), "--device", "cpu",
                     "--set", "max_steps_per_epoch=2", "--set", "stages.0.epochs=1", "--quiet"])
    assert out["best_epoch"] in (1, 2)
    saved = json.loads((run / "config.json").read_text())
    assert saved["max_steps_per_epoch"] == 2 and saved["root"] == str(synth_tiny)
    sub = tmp_path / "sub"
    main_json(["predict", "--run", str(run), "--out", str(sub), "--device", "cpu", "--quiet"])
    files = sorted(p.name for p in sub.iterdir())
    assert len(files) == 2
    # the written files pass the official validator
    assert main(["validate-submission", "--dataset", "cirr", "--root", str(synth_tiny), "--split", "test1",
                 *[str(sub / f) for f in files]]) == 0


@pytest.mark.parametrize("model", ["RN50x4", "ViT-B-32"])
def test_open_clip_backbones_train_and_evaluate(model: str, tmp_path: Path) -> None:
    """Random-weight open_clip towers: 2 training steps with the text tower trained, then an
    evaluation through the cache on a tiny CIRR-format set."""
    from fixtures_data import write_cirr_fixture

    root = tmp_path / "data"
    write_cirr_fixture(root, split="train", n_images=8, n_queries=4, folder="train")
    write_cirr_fixture(root, split="val", n_images=8, n_queries=4)
    cfg = load_config(None, [], {
        "method": "combiner", "encoder": f"open_clip:{model}", "encoder_config": {"random_weights": True},
        "dataset": "cirr", "root": str(root),
        "batch_size": 2, "device": "cpu", "eval_batch_size": 8, "max_steps_per_epoch": 2,
        "method_config": {"projection_dim": 64, "hidden_dim": 64},
        "stages": [{"name": "combiner", "epochs": 1, "lr": 1e-4, "train_text_tower": True}]})
    run = tmp_path / "run"
    result = Trainer(cfg, run, progress=False).run()
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["steps"] == 2 and torch.isfinite(torch.tensor(rows[0]["loss"]))
    assert 0.0 <= result["val"]["recall@50"] <= 100.0


@pytest.mark.parametrize("name,typo", [("combiner", "hiden_dim"), ("sum", "logit_sclae"), ("image_only", "dropout")])
def test_unknown_method_options_are_one_line_errors(name, typo):
    """A misspelled method_config key fails by name instead of silently training the default."""
    from composed_retrieval.encoders.registry import build_encoder
    from composed_retrieval.methods.registry import build_method

    enc = build_encoder("tiny", embed_dim=32, image_width=16, text_width=32)
    with pytest.raises(ConfigError, match=rf"method_config\.{typo}: unknown option for {name}"):
        build_method(name, enc, {typo: 1})
    build_method(name, enc, {"logit_scale": 50.0, "_comment": "keys starting with _ are comments"})


# ---- checkpoint writing: in the background, frozen weights linked ------------------------------
def test_frozen_weights_are_written_once_and_linked(synth_tiny: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage that trains only the Combiner keeps the towers in frozen.safetensors, written at
    the stage's first epoch and hard-linked afterwards; the checkpoint loads to the live weights
    and a damaged frozen file is refused."""
    monkeypatch.setattr(ckpt, "FROZEN_SPLIT_MIN_BYTES", 0)     # the tiny towers are small
    writes: list[str] = []
    real_write = ckpt.atomic_write
    monkeypatch.setattr(ckpt, "atomic_write", lambda path, fn: (writes.append(Path(path).name), real_write(path, fn))[1])
    run = tmp_path / "run"
    cfg = _cfg(synth_tiny, stages=[{"name": "finetune", "epochs": 1, "lr": 1e-3, "train_image_tower": True,
                                    "train_text_tower": True}, {"name": "combiner", "epochs": 3, "lr": 1e-3}],
               checkpoint_every_s=0)         # every epoch's checkpoints
    trainer = Trainer(cfg, run, progress=False)
    live: dict[str, torch.Tensor] = {}
    real_finish = trainer._finish

    def finish(history):                     # the method as training left it
        live.update({k: v.clone() for k, v in trainer.captured_method.state_dict().items()})
        return real_finish(history)
    trainer._finish = finish  # type: ignore[method-assign]
    real_epoch = trainer._train_epoch

    def train_epoch(method, *a, **k):
        trainer.captured_method = method     # type: ignore[attr-defined]
        return real_epoch(method, *a, **k)
    trainer._train_epoch = train_epoch  # type: ignore[method-assign]
    trainer.run()
    meta = json.loads((run / "last" / "checkpoint.json").read_text())
    assert meta["frozen_weights"]["file"] == "frozen.safetensors"
    frozen = set(ckpt.load_file(str(run / "last" / "frozen.safetensors")))
    assert frozen and all(k.startswith("encoder.") for k in frozen)
    assert not frozen & set(ckpt.load_file(str(run / "last" / "model.safetensors")))
    # written once a stage, when it starts: the finetune stage's frozen part is the Combiner it
    # does not train, the combiner stage's the towers; every checkpoint links them
    assert writes.count(".frozen-stage0.safetensors") == writes.count(".frozen-stage1.safetensors") == 1, writes
    assert "frozen.safetensors" not in writes and not list(run.glob(".frozen-stage*"))
    assert writes.count("model.safetensors") == 4, writes      # one an epoch: last/ links best/'s
    best_epoch = json.loads((run / "best" / "checkpoint.json").read_text())["epoch"]
    assert (run / "best" / "frozen.safetensors").stat().st_ino == (run / "last" / "frozen.safetensors").stat().st_ino
    same = (run / "best" / "model.safetensors").stat().st_ino == (run / "last" / "model.safetensors").stat().st_ino
    assert same == (best_epoch == 4)
    loaded = ckpt.load_weights(run / "last")
    assert set(loaded) >= set(live) - set(meta["aliases"])
    assert all(torch.equal(loaded[k], v) for k, v in live.items() if k in loaded)
    data = bytearray((run / "last" / "frozen.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (run / "last" / "frozen.safetensors").unlink()          # the link: damage this copy only
    (run / "last" / "frozen.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="frozen weights do not match"):
        ckpt.load_weights(run / "last")


def test_checkpoint_cadence_defers_writes_and_keeps_the_best_epoch(synth_tiny: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """With checkpoint_every_s longer than the run, best/ and last/ are written once, at the end,
    and hold what every-epoch writing gives: the best epoch's weights (an earlier one than the
    last, here) and the last epoch's with its resume state."""
    stages = [{"name": "combiner", "epochs": 4, "lr": 3e-3}]
    runs = {}
    real = Trainer._write_checkpoints
    for every in (0, 3600):
        calls: list[int] = []

        def spy(self, best, weights, state, calls=calls):  # type: ignore[no-untyped-def]
            calls.append(state["global_epoch"])
            return real(self, best, weights, state)
        monkeypatch.setattr(Trainer, "_write_checkpoints", spy)
        headlines = iter([0.5, 0.9, 0.4, 0.3])     # epoch 2 is the best; later ones are worse
        monkeypatch.setattr("composed_retrieval.evaluation.protocols.headline", lambda protocol, val: next(headlines))
        run = tmp_path / f"every{every}"
        Trainer(_cfg(synth_tiny, stages=stages, checkpoint_every_s=every), run, progress=False).run()
        runs[every] = (run, calls)
    (eager, eager_calls), (lazy, lazy_calls) = runs[0], runs[3600]
    assert eager_calls == [1, 2, 3, 4] and lazy_calls == [4]
    for sub in ("best", "last"):
        a, b = _weights(eager, sub), _weights(lazy, sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    assert json.loads((lazy / "best" / "checkpoint.json").read_text())["epoch"] == 2
    assert json.loads((lazy / "last" / "checkpoint.json").read_text())["epoch"] == 4
    a, b = ckpt.load_state(eager / "last"), ckpt.load_state(lazy / "last")
    assert (a["global_epoch"], a["best"]) == (b["global_epoch"], b["best"]) == (4, 0.9)
    # the finished run's last/ has no optimizer moments (nothing resumes into a finished stage);
    # rerunning it trains nothing and gives the same result
    assert "optimizer" not in a and "optimizer" not in b
    before = json.loads((lazy / "results.json").read_text())
    monkeypatch.setattr(Trainer, "_train_epoch", lambda *a, **k: pytest.fail("a finished run trained again"))
    headlines = iter([])     # the patched headline now raises: a rerun that evaluated would fail
    assert Trainer(_cfg(synth_tiny, stages=stages, checkpoint_every_s=3600), lazy, progress=False).run() == before


def test_checkpoint_cadence_counts_the_seconds_of_unwritten_epochs() -> None:
    """A write once the epochs since the last one took every_s seconds; the best epoch in
    between goes with it; a run's last epoch waits for flush(finished=True), which drops the
    optimizer moments."""
    class Writer:
        def submit(self, job):  # type: ignore[no-untyped-def]
            job()
    writes: list[tuple] = []
    cadence = ckpt.CheckpointCadence(Writer(), 10, lambda best, w, state: writes.append((best, w, sorted(state))))
    snaps = [f"epoch{i}" for i in range(1, 8)]
    improved = [True, False, True, False, False, False, False]
    started = [cadence.epoch_done(b, s, {"optimizer": {}, "epoch": i}, 4.0, run_ends=i == 7)   # type: ignore[arg-type]
               for i, (s, b) in enumerate(zip(snaps, improved), 1)]
    assert started == [False, False, True, False, False, True, False]
    assert cadence.flush(finished=True) and not cadence.flush()
    assert writes == [("epoch3", "epoch3", ["epoch", "optimizer"]), (None, "epoch6", ["epoch", "optimizer"]),
                      (None, "epoch7", ["epoch"])]


def test_an_interrupted_run_writes_its_last_finished_epoch(synth_tiny: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C between checkpoint writes: the epochs since the last write reach last/ on the way out."""
    real = Trainer._train_epoch
    epochs = {"n": 0}

    def stop_in_third(self, *a, **k):  # type: ignore[no-untyped-def]
        epochs["n"] += 1
        if epochs["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)
    monkeypatch.setattr(Trainer, "_train_epoch", stop_in_third)
    run = tmp_path / "run"
    cfg = _cfg(synth_tiny, stages=[{"name": "combiner", "epochs": 4, "lr": 1e-3}], checkpoint_every_s=3600)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, run, progress=False).run()
    assert json.loads((run / "last" / "checkpoint.json").read_text())["epoch"] == 2
    state = ckpt.load_state(run / "last")
    assert state["global_epoch"] == 2 and state["optimizer"]["state"]   # resumable into epoch 3


def test_a_snapshot_is_unchanged_by_later_training() -> None:
    from composed_retrieval.encoders.tiny import TinyEncoder
    from composed_retrieval.methods.baselines import Sum
    method = Sum(TinyEncoder(embed_dim=16, image_width=8, text_width=16), {})
    snap = ckpt.snapshot_method(method)
    before = {k: v.clone() for k, v in snap.tensors.items()}
    with torch.no_grad():
        for p in method.parameters():
            p.add_(1.0)
    assert all(torch.equal(before[k], snap.tensors[k]) for k in before)
    state = {"m": torch.zeros(3), "history": [{"epoch": 1}]}
    cloned = ckpt.clone_state(state)
    state["m"].add_(1)
    state["history"].append({"epoch": 2})
    assert torch.equal(cloned["m"], torch.zeros(3)) and cloned["history"] == [{"epoch": 1}]


def test_a_failed_background_write_stops_the_run(synth_tiny: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(folder, state):
        raise OSError(28, "No space left on device", str(folder / "state.pt"))
    monkeypatch.setattr(ckpt, "save_state", no_space)
    run = tmp_path / "run"
    with pytest.raises(OSError, match="No space"):
        Trainer(_cfg(synth_tiny), run, progress=False).run()
    assert not (run / "results.json").exists()


def test_curves_png_draws_both_panels_and_stage_boundaries(tmp_path: Path) -> None:
    from composed_retrieval.train.curves import COLOURS, draw_curves, plot_curves
    history = [{"epoch": e, "stage": "a" if e < 3 else "b", "loss": 2.0 / e,
                "val": {"recall@1": 10.0 * e, "recall@5": 20.0 + 5 * e, "recall_subset@1": float("nan")}}
               for e in range(1, 6)]
    image = draw_curves(history)
    assert image.size == (880, 300)
    pixels = _colours(image)
    assert COLOURS[0] in pixels and COLOURS[1] in pixels        # the loss/recall@1 and recall@5 lines
    assert (128, 128, 128) in pixels                           # the dashed stage boundary
    single = draw_curves(history[:1])                          # one epoch: no zero-width axis
    assert COLOURS[0] in _colours(single)
    plot_curves(history, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _colours(image) -> set[tuple[int, int, int]]:
    import numpy as np
    return {tuple(c) for c in np.asarray(image).reshape(-1, 3).tolist()}


def test_decoding_workers_give_the_same_run(synth_tiny: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Pixels too large to preload are decoded per step, by num_workers processes when asked:
    the same batches, so the same weights as decoding in-process."""
    from composed_retrieval.train import loop
    used: list[int] = []
    real = loop.DataLoader
    monkeypatch.setattr(loop, "DataLoader", lambda *a, **k: (used.append(k.get("num_workers", 0)), real(*a, **k))[1])
    stages = [{"name": "finetune", "epochs": 1, "lr": 1e-3, "train_image_tower": True, "train_text_tower": True}]
    runs = {}
    for workers in (0, 1):
        run = tmp_path / f"w{workers}"
        Trainer(_cfg(synth_tiny, stages=stages, preload_pixels_max_mb=0, num_workers=workers), run,
                progress=False).run()
        runs[workers] = _weights(run)
    assert used == [0, 1]                                   # the training loaders (in-process, one worker)
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_the_checkpoint_writer_runs_at_the_lowest_priority() -> None:
    """Its serialising and hashing must not take cores from torch's threads (Linux: per-thread
    niceness); the trainer's own threads keep theirs."""
    import os
    import threading
    seen: dict[str, int] = {}
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    writer = ckpt.CheckpointWriter()
    writer.submit(lambda: seen.update(nice=os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
    writer.close()
    assert seen["nice"] == 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before   # (CI may run niced)
