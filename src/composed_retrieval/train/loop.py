"""The one training loop every method uses.

Stages run in order (each with its own optimizer and which towers train); every epoch is
validated by the dataset's protocol; the best checkpoint is kept by the protocol's headline
metric; ``last/`` holds everything needed to resume at the next epoch. Data order and dropout
are seeded per epoch, so a resumed run ends where an uninterrupted one would.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import ConcatDataset, DataLoader

from ..config import DEFAULTS, merge
from ..data.base import CIRSplit
from ..encoders.base import Features
from ..errors import CheckpointError, ConfigError
from ..fileio import atomic_write_json, atomic_write_text, read_json
from ..methods.base import CIRMethod
from . import checkpoint as ckpt
from . import distributed
from .curves import plot_curves
from .optim import build_optimizer, set_epoch_lr
from ..cache import FeatureTable, encode_with
from ..data.pixels import PixelSource


#: written into every run folder the toolkit creates; best/ and last/ are only replaced there
RUN_MARKER = "cir-run.json"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, global_epoch: int) -> int:
    return (seed * 1_000_003 + global_epoch * 7919) % 2**63


def build_method_from_config(cfg: dict[str, Any]) -> CIRMethod:
    from ..encoders.registry import build_encoder
    from ..methods.registry import build_method

    encoder = build_encoder(cfg["encoder"], checkpoint=cfg.get("encoder_checkpoint"), **(cfg.get("encoder_config") or {}))
    method = build_method(cfg["method"], encoder, cfg.get("method_config") or {})
    if cfg.get("init_from"):
        ckpt.init_weights_from(method, cfg["init_from"])
    return method


def load_data(cfg: dict[str, Any], split: str, training: bool) -> list[CIRSplit]:
    from ..data.registry import load_splits

    if not cfg.get("root"):
        raise ConfigError("config field 'root' (the dataset folder) is not set; pass --root")
    options: dict[str, Any] = {}
    if cfg["dataset"] == "fashioniq":
        options["caption_policy"] = cfg.get("caption_policy", "random") if training else "eval"
        if cfg.get("categories"):
            options["categories"] = cfg["categories"]
    if cfg["dataset"] == "user" and split in (cfg["train_split"], cfg["val_split"]):
        return [_user_split(cfg, split, training)]
    return load_splits(cfg["dataset"], cfg["root"], split, image_root=cfg.get("image_root"), **options)


def _user_split(cfg: dict[str, Any], split: str, training: bool) -> CIRSplit:
    """User data validates on ``val_file``, on a held-out ``val_fraction`` of the training
    file, or (neither set) on the training file itself -- which ``validation_source`` says."""
    from ..data.registry import load_split
    from ..data.userdata import hold_out

    is_val = split == cfg["val_split"] and not (training and split == cfg["train_split"])
    image_root = cfg.get("image_root")
    if is_val and cfg.get("val_file"):
        return load_split("user", cfg["val_file"], split, image_root=image_root or Path(cfg["val_file"]).parent)
    data = load_split("user", cfg["root"], split, image_root=image_root)
    if cfg.get("val_fraction"):
        train, val = hold_out(data, float(cfg["val_fraction"]))
        return val if is_val else train
    return data


def validation_source(cfg: dict[str, Any]) -> str:
    """What the validation metrics (and the best epoch) were measured on, for results.json."""
    if cfg.get("dataset") != "user":
        return f"{cfg.get('dataset')} split {cfg.get('val_split')!r}"
    if cfg.get("val_file"):
        return f"separate file {cfg['val_file']}"
    if cfg.get("val_fraction"):
        return f"held-out {cfg['val_fraction']:g} of {cfg.get('root')} (not trained on)"
    return f"the training file {cfg.get('root')} itself (no val_file or val_fraction given)"


#: curves.png is redrawn at most this often (and always at the end of the run)
CURVES_EVERY_S = 30.0

#: a stage's frozen weights while it trains (``checkpoint.FrozenPart``), removed at the end
FROZEN_PREFIX = ".frozen-stage"


class Trainer:
    """Owns one run folder: config.json, metrics.jsonl, curves.png, best/, last/."""

    def __init__(self, cfg: dict[str, Any], run_dir: str | Path, resume: bool = True, progress: bool = True) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.progress = progress
        self.device = resolve_device(cfg.get("device", "auto"))
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.dist = distributed.DistInfo(device=self.device)   # set by run() under torchrun
        self.ddp: torch.nn.Module | None = None                # the stage's DDP wrapper, if any
        self.last_speed: dict[str, float] = {}                 # the last epoch's throughput
        self._normalise: Callable[[torch.Tensor], torch.Tensor] | None = None  # uint8 pixel batches -> model input
        self._history_written = 0                              # epochs in metrics.jsonl
        self._curves_drawn = (0, time.monotonic())             # curves.png: (epochs, when drawn)

    # ---- set-up ---------------------------------------------------------------------------
    def _check_run_dir(self) -> dict[str, Any] | None:
        saved = self.run_dir / "config.json"
        state = None
        self._claim_run_dir()
        # a run folder with no checkpoint yet (a first run that failed early) is not a run to
        # protect: the corrected command starts it afresh instead of being "a different config"
        started = any((self.run_dir / sub / ckpt.META).is_file() for sub in ("best", "last", ".last.old"))
        if saved.exists() and self.resume and started:
            for sub in ("best", "last"):  # finish or undo a checkpoint swap cut by a crash
                ckpt.recover_folder(self.run_dir / sub)
            for tmp in [*self.run_dir.glob(".*.tmp"), *self.run_dir.glob(f"{FROZEN_PREFIX}*")]:
                tmp.unlink(missing_ok=True)      # temporaries of a killed run
            old = read_json(saved, "run config")
            if not isinstance(old, dict) or _comparable(merge(DEFAULTS, old)) != _comparable(self.cfg):
                raise ConfigError(f"run folder {self.run_dir} holds a run with a different config; "
                                  "choose a new --out or pass --no-resume")
            if (self.run_dir / "last" / ckpt.META).is_file():
                state = ckpt.load_state(self.run_dir / "last")
        elif saved.exists():
            for name in ("metrics.jsonl",):
                (self.run_dir / name).unlink(missing_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.run_dir / RUN_MARKER, {"written_by": "cir train"})
        atomic_write_json(self.run_dir / "config.json", self.cfg)
        return state

    def _claim_run_dir(self) -> None:
        """Refuse to write into checkpoint folders the toolkit did not create: writing best/ and
        last/ replaces them whole. The marker file says a run folder is ours; a folder from before
        markers existed is recognised by its config.json next to checkpoint folders."""
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ConfigError("--out names an existing file; a run is a folder", self.run_dir)
        if (self.run_dir / RUN_MARKER).is_file():
            return
        ours = [self.run_dir / n for n in ("best", "last", ".best.new", ".best.old", ".last.new", ".last.old")]
        present = [p for p in ours if p.exists()]
        if not present:
            return
        legacy = (self.run_dir / "config.json").is_file() and all(
            (p / ckpt.META).is_file() for p in present if p.name in ("best", "last"))
        if not legacy:
            raise ConfigError(f"{present[0]} exists but was not written by `cir train` (no {RUN_MARKER} "
                              f"marker in the run folder); move it away or choose another --out", self.run_dir)

    def _cache(self):  # type: ignore[no-untyped-def]
        from ..cache import FeatureCache
        root = self.cfg.get("cache_dir") or (self.run_dir.parent / ".feature_cache")
        return FeatureCache(root)

    def image_table(self, method: CIRMethod, splits: list[CIRSplit], role: str) -> list[FeatureTable]:
        """Encoded images of each split with the encoder's current weights (cached on disk
        when the image tower is frozen, since then the features never change)."""
        transform = method.encoder.image_transform(self.cfg["preprocess"])
        tables = []
        for split in splits:
            names = split.all_image_names()
            if method.image_tower_frozen:
                cached = self._cache().get_or_build(
                    method.encoder, f"{split.dataset}/{split.category or ''}/{split.split}/{role}",
                    names, split.image_path, transform, batch_size=self.cfg["eval_batch_size"],
                    progress=self.progress)
                tables.append(FeatureTable(cached.names, Features(cached.pooled.float(), cached.tokens.float())))
            else:
                pixels = PixelSource(names, split.image_path, transform, self.cfg["preload_pixels_max_mb"],
                                     self.cfg["num_workers"], self.progress)
                tables.append(encode_with(method.encoder, names, pixels, self.cfg["eval_batch_size"],
                                          self.device, self.progress))
        return tables

    # ---- the loop -------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from ..data.triplets import TripletDataset, collate_triplets
        from ..evaluation.protocols import headline
        from ..evaluation.runner import evaluate_method

        cfg = self.cfg
        self._join_process_group()
        state = self._check_run_dir() if not self.dist.active else self._check_run_dir_all_ranks()
        seed_everything(cfg["seed"])
        method = build_method_from_config(cfg).to(self.device)
        self._method_options = method_options(method)
        if state is not None:
            ckpt.load_into(method, ckpt.load_weights(self.run_dir / "last"), self.run_dir / "last" / ckpt.WEIGHTS)
        if self.dist.active and cfg.get("sync_batchnorm", True):
            method = distributed.sync_batchnorm(method, self.device)
        if self.dist.active and getattr(method, "masked", False):
            raise ConfigError("masked textual inversion picks its masked pairs per batch, so ranks would "
                              "disagree on which collectives to run; train it with one process (no torchrun)")
        # -- zero-shot hook: a method with train_on == "pairs" (textual inversion) trains on
        # -- image-caption pairs (cfg["pairs"], data/pairs.py) instead of triplets
        on_pairs = getattr(method, "train_on", "triplets") == "pairs"
        train_splits = [] if on_pairs else load_data(cfg, cfg["train_split"], training=True)
        # -- SPN hook (spn/bank.py): extra_train_splits (generated positives) join the training
        # -- splits; a pairs method gets triplets when one of its stages uses spn_negatives
        from ..spn.bank import spn_stage, training_splits
        base_splits, loaded = train_splits, {}

        def load_once(name: str) -> list[Any]:
            if name not in loaded:
                loaded[name] = load_data(cfg, name, training=True)
            return loaded[name]

        for st in cfg["stages"]:   # every stage's files are checked before anything trains
            training_splits(cfg, on_pairs, base_splits, load_once, st)
        self._spn = None
        # -- end SPN hook
        val_splits = load_data(cfg, cfg["val_split"], training=False)
        extra = {name: load_data(cfg, name, training=False) for name in cfg.get("extra_eval_splits") or []}
        from ..evaluation.runner import describe_gallery
        self.galleries = {"val": describe_gallery(val_splits), **{n: describe_gallery(sp) for n, sp in extra.items()}}

        best = state["best"] if state else -math.inf
        global_epoch = state["global_epoch"] if state else 0
        start_stage = state["stage_index"] if state else 0
        start_epoch = state["epoch_in_stage"] if state else 0
        history = list(state["history"]) if state and "history" in state else _read_history(self.metrics_path, global_epoch)
        amp = bool(cfg.get("amp")) and self.device.type == "cuda"

        writer = ckpt.CheckpointWriter()   # epoch N's files are written while epoch N+1 trains
        cadence = ckpt.CheckpointCadence(writer, cfg["checkpoint_every_s"], self._write_checkpoints)
        try:
            for stage_index, stage in enumerate(cfg["stages"]):
                if stage_index < start_stage:
                    continue
                self._apply_stage(method, stage)
                train_splits = training_splits(cfg, on_pairs, base_splits, load_once, stage)  # SPN: per-stage positives
                params = method.trainable_parameters()
                if not params:
                    raise ConfigError(f"stage {stage['name']!r} of method {method.name!r} has nothing to train")
                groups = method.module_groups()
                trains = sorted({groups[id(p)] for p in params})   # logged: step counts per module
                optimizer = build_optimizer(method, params, stage,
                                            float(stage.get("weight_decay", cfg["weight_decay"])))
                first_epoch = start_epoch if stage_index == start_stage else 0
                if first_epoch >= int(stage.get("epochs", 1)):
                    continue
                if state is not None and stage_index == start_stage and first_epoch > 0:
                    if not state.get("optimizer"):   # a finished run's last/ (CheckpointCadence.flush)
                        raise CheckpointError("no optimizer state to resume this stage from", self.run_dir / "last" / ckpt.STATE)
                    optimizer.load_state_dict(state["optimizer"])
                # the weights this stage does not train: written once now, linked into its checkpoints
                frozen = ckpt.store_frozen(method, self.run_dir / f"{FROZEN_PREFIX}{stage_index}.safetensors") \
                    if self.dist.is_main else None
                train_tables = None if not method.image_tower_frozen else self._train_tables(method, train_splits)
                if train_tables is None:
                    transform = method.encoder.image_transform(cfg["preprocess"])
                    pixels = [PixelSource(s.all_image_names(), s.image_path, transform,
                                          cfg["preload_pixels_max_mb"], cfg["num_workers"], self.progress)
                              for s in train_splits]
                    fns = [p.uint8 for p in pixels]      # batches normalised on the device (_to_device)
                    self._normalise = transform.normaliser(self.device)
                else:
                    fns = [t.lookup for t in train_tables]
                    self._normalise = None
                # a split too large to keep decoded in memory decodes from disk every step: there
                # the config's num_workers decode in worker processes (the datasets draw their
                # random choices from (seed, epoch, index), so workers give the same batches);
                # preloaded pixels and cached features are cheaper in-process than through IPC
                workers = int(cfg["num_workers"]) if train_tables is None and any(
                    p.pixels is None for p in pixels) else 0
                datasets = [TripletDataset(s, fn, seed=cfg["seed"]) for s, fn in zip(train_splits, fns)]
                if on_pairs and not stage.get("spn_negatives"):  # zero-shot hook (see above): pair datasets replace the triplet ones (SPN: not in a bank stage)
                    from .sources import pair_training_data
                    datasets = pair_training_data(cfg, method, self.progress)
                data = ConcatDataset(datasets)
                self._spn = spn_stage(self, method, stage, stage_index, train_splits, train_tables)  # SPN hook: None or the bank step
                self.ddp = distributed.wrap(method, self.dist, bool(cfg.get("ddp_find_unused_parameters", True))) \
                    if self.dist.active else None
                if first_epoch == 0 and int(stage.get("epochs", 1)) > 0:
                    # the best checkpoint is the best epoch of the last stage that trains: a
                    # two-stage method is its final stage (a Combiner run must not end up being
                    # its stage-1 sum model because that epoch scored higher)
                    best = -math.inf
                for epoch in range(first_epoch, int(stage.get("epochs", 1))):
                    t0 = time.time()
                    torch.manual_seed(epoch_seed(cfg["seed"], global_epoch) + distributed.seed_offset(self.dist))
                    for ds in datasets:
                        ds.set_epoch(global_epoch)
                    gen = torch.Generator().manual_seed(epoch_seed(cfg["seed"], global_epoch))
                    if self.dist.active:  # same global batches as below; each rank takes its slice
                        loader = DataLoader(data, batch_sampler=distributed.RankSliceBatchSampler(
                            len(data), cfg["batch_size"], len(data) > cfg["batch_size"], gen,
                            self.dist.rank, self.dist.world_size), generator=gen, collate_fn=collate_triplets, num_workers=workers,
                                            pin_memory=self.device.type == "cuda")
                    else:
                        loader = DataLoader(data, batch_size=cfg["batch_size"], shuffle=True, drop_last=len(data) > cfg["batch_size"],
                                            generator=gen, collate_fn=collate_triplets, num_workers=workers,
                                            pin_memory=self.device.type == "cuda")
                    epoch_lr = set_epoch_lr(optimizer, stage, epoch)
                    losses = self._train_epoch(method, loader, optimizer, amp, stage, global_epoch)
                    if self.dist.active:  # rank 0 alone evaluates, logs and saves; the others wait
                        losses = distributed.average(losses)
                        if not self.dist.is_main:
                            global_epoch += 1
                            distributed.barrier()
                            continue
                    val = evaluate_method(method, val_splits, self.image_table(method, val_splits, "val"),
                                          cfg["eval_batch_size"], self.device)
                    record: dict[str, Any] = {"epoch": global_epoch + 1, "stage": stage["name"], "stage_index": stage_index,
                                              "lr": epoch_lr, "trains": trains, **losses,
                                              "val": val, "headline": headline(val_splits[0].protocol, val)}
                    for name, splits in extra.items():
                        record[name] = evaluate_method(method, splits, self.image_table(method, splits, name),
                                                       cfg["eval_batch_size"], self.device)
                    record["seconds"] = round(time.time() - t0, 3)
                    record["speed"] = self.last_speed   # train_seconds, steps_per_s, samples_per_s
                    global_epoch += 1
                    improved = record["headline"] > best
                    history.append(record)
                    # best/ and last/ are each swapped in whole (weights, metadata and, in last/,
                    # the resume state with the metrics so far), so a crash leaves one epoch's set;
                    # they are copied now and written while later epochs train, at most every
                    # checkpoint_every_s seconds and at the end (ckpt.CheckpointCadence)
                    if improved:
                        best = record["headline"]
                    weights = ckpt.snapshot_method(method, {"epoch": global_epoch, "val": val}, frozen)
                    resume_state = ckpt.clone_state({
                        "optimizer": optimizer.state_dict(), "global_epoch": global_epoch,
                        "stage_index": stage_index, "epoch_in_stage": epoch + 1, "best": best,
                        "history": history})
                    run_ends = epoch + 1 == int(stage.get("epochs", 1)) and not any(
                        int(later.get("epochs", 1)) > 0 for later in cfg["stages"][stage_index + 1:])
                    cadence.epoch_done(improved, weights, resume_state, time.time() - t0, run_ends)
                    # on this thread: the writer runs at nice 19, and Python work there (JSON, the
                    # Pillow figure) holds the GIL while the OS leaves that thread waiting behind the
                    # training threads, stalling this one (train_speed RN50x4 frozen: 0.84 moved there, 0.896 here)
                    self._write_history(history)
                    if self.progress:
                        print(json.dumps({k: record[k] for k in ("epoch", "stage", "loss", "headline")}), flush=True)
                    if self.dist.active:
                        distributed.barrier()
                start_epoch = 0
                if state is not None:
                    state = None
        except BaseException:
            try:   # the last finished epoch reaches the disk (Ctrl-C loses no epoch); the error propagates
                cadence.flush()
            except Exception:
                pass   # a failed earlier write: the error on its way out comes first
            writer.close(raise_errors=False)   # the files in flight complete
            raise
        cadence.flush(finished=True)                     # the last epoch, and the best one if not yet written
        if self.dist.is_main:
            self._write_history(history, final=True)     # the last curves.png while the last checkpoint is written
        writer.close()                                   # checkpoints complete before results.json
        for stale in self.run_dir.glob(f"{FROZEN_PREFIX}*"):  # best/ and last/ hold links to what they need
            stale.unlink(missing_ok=True)
        return self._finish(history) if self.dist.is_main else {}   # results.json: rank 0's alone

    def _write_checkpoints(self, best: "ckpt.MethodSnapshot | None", weights: "ckpt.MethodSnapshot",
                           resume_state: dict[str, Any]) -> None:
        """best/ (when an epoch improved since the last write) before last/, as a resume
        replays from last/."""
        if best is not None:
            ckpt.write_folder(self.run_dir / "best", lambda d: ckpt.write_snapshot(best, d))
            ckpt.stored_in(best, self.run_dir / "best")       # last/ links best/'s weight files when the same
        ckpt.write_folder(self.run_dir / "last", lambda d: (ckpt.write_snapshot(weights, d),
                                                            ckpt.save_state(d, resume_state)))
        ckpt.stored_in(weights, self.run_dir / "last")

    # ---- several processes (torchrun): see train/distributed.py ---------------------------
    def _join_process_group(self) -> None:
        self.dist = distributed.setup(self.cfg.get("device", "auto"))
        if self.dist.active:
            self.device = self.dist.device
            self.progress = self.progress and self.dist.is_main

    def _check_run_dir_all_ranks(self) -> dict[str, Any] | None:
        """Rank 0 checks and writes the run folder; then every rank reads ``last/`` itself
        (the run folder must be on a file system that every node sees)."""
        state, has_state = distributed.run_on_main(self._check_run_dir, lambda s: s is not None)
        if not self.dist.is_main and has_state:
            state = ckpt.load_state(self.run_dir / "last")
        return state

    def _train_tables(self, method: CIRMethod, splits: list[CIRSplit]) -> list[FeatureTable]:
        """Training features of a frozen tower: rank 0 fills the feature cache first, so the
        other ranks read it instead of encoding the same images again."""
        if not self.dist.active:
            return self.image_table(method, splits, "train")
        tables, _ = distributed.run_on_main(lambda: self.image_table(method, splits, "train"))
        return tables if tables is not None else self.image_table(method, splits, "train")

    def _apply_stage(self, method: CIRMethod, stage: dict[str, Any]) -> None:
        method.set_stage(stage["name"])
        method.train_image_tower = bool(stage.get("train_image_tower", False))
        method.train_text_tower = bool(stage.get("train_text_tower", False))
        for p in method.encoder.parameters():
            p.requires_grad_(False)
        for p in method.trainable_parameters():
            p.requires_grad_(True)

    def _train_epoch(self, method: CIRMethod, loader: DataLoader, optimizer: torch.optim.Optimizer,
                     amp: bool, stage: dict[str, Any], global_epoch: int) -> dict[str, float]:
        from tqdm import tqdm

        method.train()
        if method.image_tower_frozen:
            method.encoder.eval()  # no dropout/batch-norm updates in a frozen tower
        sums: dict[str, torch.Tensor] = {}   # on the device: no sync per step (the GPU runs ahead)
        steps = samples = 0
        max_steps = self.cfg.get("max_steps_per_epoch")
        log_every = max(1, int(self.cfg.get("log_every", 20)))
        bar = tqdm(loader, desc=f"epoch {global_epoch + 1} ({stage['name']})", disable=not self.progress,
                   leave=False, unit="step")
        clip = float(self.cfg["grad_clip"]) if self.cfg.get("grad_clip") else None
        clip_params = method.trainable_parameters() if clip else []   # once per epoch, not per step
        start = time.perf_counter()
        for batch in bar:
            batch = self._to_device(method, batch)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp), distributed.global_batch(self.ddp is not None):
                out = (self.ddp if self.ddp is not None else method)(batch) if self._spn is None else self._spn(method, batch)  # SPN hook
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(clip_params, clip)
            optimizer.step()
            steps += 1
            samples += len(batch["caption"])
            for k, v in out.items():
                v = v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
                sums[k] = sums[k] + v if k in sums else v
            if steps % log_every == 0:
                rate = steps / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(loss=f"{float(sums['loss']) / steps:.4f}", **{"samples/s": f"{rate * samples / steps:.1f}"})
            if max_steps and steps >= int(max_steps):
                break
        means = {k: round(float(v) / max(steps, 1), 6) for k, v in sums.items()}
        # every scalar a method returns is logged (its epoch mean); a method whose training
        # query is not its inference query (DRA) returns "match" and "match_inference", and
        # their gap is logged beside them so that a target leak shows in metrics.jsonl
        if "match" in means and "match_inference" in means:
            means["match_gap"] = round(means["match_inference"] - means["match"], 6)
        seconds = time.perf_counter() - start
        # throughput of whole steps (data loading included), this process: a slow data path
        # shows here; kept apart from the losses (timings differ between identical runs)
        self.last_speed = {"train_seconds": round(seconds, 6), "steps_per_s": round(steps / max(seconds, 1e-9), 4),
                           "samples_per_s": round(samples / max(seconds, 1e-9), 2)}
        return means | {"steps": steps}

    def _to_device(self, method: CIRMethod, batch: dict[str, Any]) -> dict[str, Any]:
        out = dict(batch)
        for key in ("reference", "target"):
            x = batch[key]
            if isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and self._normalise is not None:
                out[key] = self._normalise(x.to(self.device, non_blocking=True))
            else:
                out[key] = x.to(self.device) if isinstance(x, (torch.Tensor, Features)) else x
        out["text"] = method.encoder.tokenize(batch["caption"]).to(self.device)
        return out

    # ---- outputs --------------------------------------------------------------------------
    def _write_history(self, history: list[dict[str, Any]], final: bool = False) -> None:
        """metrics.jsonl every epoch; curves.png at most every CURVES_EVERY_S seconds and at the
        end (the Pillow figure costs ~20 ms, a few percent of a sub-second epoch)."""
        if not history:
            return
        if self._history_written != len(history):
            self._history_written = len(history)
            atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in history))
        epochs, at = self._curves_drawn
        now = time.monotonic()
        if epochs == len(history) or (not final and now - at < CURVES_EVERY_S):
            return
        self._curves_drawn = (len(history), now)
        try:
            plot_curves(history, self.run_dir / "curves.png")
        except Exception as exc:  # a plot must never stop training
            print(f"warning: could not draw curves.png ({exc})")

    def _finish(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        if not history:
            return {}
        self._write_history(history, final=True)
        last_stage = max(r.get("stage_index", 0) for r in history)
        best = max((r for r in history if r.get("stage_index", 0) == last_stage), key=lambda r: r["headline"])
        result = {"best_epoch": best["epoch"], "val": best["val"],
                  **{k: best[k] for k in self.cfg.get("extra_eval_splits") or [] if k in best},
                  "epochs": len(history), "validation": validation_source(self.cfg),
                  "galleries": getattr(self, "galleries", {}), "config": self.cfg,
                  "method_options": getattr(self, "_method_options", None)}
        atomic_write_json(self.run_dir / "results.json", result)
        return result


def method_options(method: CIRMethod) -> dict[str, Any]:
    """Every option the method runs with, defaults included (e.g. the sum's fusion), for
    results.json: the config holds only what the user wrote."""
    options = getattr(method, "options", None)
    resolved = options if isinstance(options, dict) else method.config
    return {k: v for k, v in resolved.items() if not str(k).startswith("_")}


def _comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    """Fields that must match to resume a run (not device or progress settings)."""
    ignore = {"device", "num_workers", "eval_batch_size", "log_every", "checkpoint_every_s"}
    return {k: v for k, v in cfg.items() if k not in ignore}


def _read_history(path: Path, upto_epoch: int) -> list[dict[str, Any]]:
    if not path.is_file() or upto_epoch == 0:
        return []
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    return [r for r in rows if r["epoch"] <= upto_epoch]
