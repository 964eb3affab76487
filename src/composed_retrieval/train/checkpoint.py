"""Checkpoints without pickle: safetensors weights + a JSON config that rebuilds the method.

A checkpoint folder holds ``model.safetensors`` and ``checkpoint.json``; a run folder holds
``best/`` and ``last/`` checkpoint folders. ``load_method`` accepts either.
The resumable training state (optimizer moments, RNG) goes to ``state.pt`` and is read back
with ``torch.load(weights_only=True)``, which refuses arbitrary Python objects.
"""
from __future__ import annotations

import copy
import hashlib
import os
import pickle
import shutil
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..fileio import sha256_file, atomic_write, atomic_write_json, read_json
from ..methods.base import CIRMethod

WEIGHTS = "model.safetensors"
FROZEN = "frozen.safetensors"     # the weights a stage did not train (training-loop checkpoints)
META = "checkpoint.json"
STATE = "state.pt"




@dataclass
class FrozenPart:
    """The weights a stage does not train (a frozen tower: 600 MB for ViT-B-32), written once
    when the stage starts and hard-linked into each of its checkpoints as ``frozen.safetensors``.
    Rewriting them twice an epoch made a Combiner stage on a frozen ViT-B-32 spend its time
    writing files, not training."""
    keys: frozenset[str]
    stamp: tuple          # (name, storage, in-place version) of each: a change shows
    path: Path
    sha256: str


@dataclass
class MethodSnapshot:
    """A method's weights copied at one moment (CPU tensors of its own), with the metadata that
    rebuilds it: what ``save_method`` writes, taken apart so the writing can run in the
    background while training changes the live weights. With ``frozen`` the weights it names
    are not copied; its file is linked."""
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    frozen: FrozenPart | None = None
    weights_sha256: str | None = None      # set by the first write
    #: where a folder of this snapshot now holds its weights: last/ links the file best/ got
    stored_at: Path | None = None


#: the weights a stage does not train get their own file from this size on (smaller ones are
#: cheaper to rewrite than to track: a file and a hash more per run; the tiny encoder's 4.5 MB
#: were rewritten with each of its 20-step epochs when this was 16 MiB)
FROZEN_SPLIT_MIN_BYTES = 1 * 2**20


def _unique_state(method: CIRMethod) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with each tensor once, and the names that alias another."""
    state, aliases = {}, {}
    first_of: dict[tuple, str] = {}
    for k, v in method.state_dict().items():
        # a module registered under two names (e.g. a hooked sub-module) shares its tensors;
        # safetensors stores each tensor once, the alias is restored by loading the first name
        key = (v.data_ptr(), tuple(v.shape), tuple(v.stride()), v.dtype) if v.numel() else None
        if key is not None and key in first_of:
            aliases[k] = first_of[key]
            continue
        if key is not None:
            first_of[key] = k
        state[k] = v
    return state, aliases


def _stamp(state: dict[str, torch.Tensor], keys: frozenset[str]) -> tuple:
    return tuple((k, state[k].data_ptr(), state[k]._version) for k in sorted(keys) if k in state)


def store_frozen(method: CIRMethod, path: Path) -> FrozenPart | None:
    """Write the weights that no parameter being trained shares (``requires_grad`` as the stage
    set it), or None when they are too few to be worth a file of their own."""
    trained = {p.data_ptr() for p in method.parameters() if p.requires_grad}
    state, _ = _unique_state(method)
    frozen = {k: v for k, v in state.items() if v.data_ptr() not in trained}
    if sum(v.numel() * v.element_size() for v in frozen.values()) < FROZEN_SPLIT_MIN_BYTES:
        return None
    atomic_write(path, lambda p: save_file({k: v.detach().cpu().contiguous() for k, v in frozen.items()}, str(p)))
    keys = frozenset(frozen)
    return FrozenPart(keys, _stamp(state, keys), path, sha256_file(path))


def snapshot_method(method: CIRMethod, extra: dict[str, Any] | None = None,
                    frozen: FrozenPart | None = None) -> MethodSnapshot:
    state, aliases = _unique_state(method)
    if frozen is not None and (_stamp(state, frozen.keys) != frozen.stamp or not frozen.path.is_file()):
        frozen = None          # changed in place since the stage began (or gone): copy them all
    meta = {
        "format": "composed-retrieval-checkpoint/1",
        "method": method.name,
        "method_config": copy.deepcopy(method.config),
        "stage": method.stage,
        "encoder_config": copy.deepcopy(method.encoder.config),
        "aliases": aliases,
        **copy.deepcopy(extra or {}),
    }
    skip = frozen.keys if frozen is not None else frozenset()
    return MethodSnapshot({k: _copy(v) for k, v in state.items() if k not in skip}, meta, frozen)


def _copy(v: torch.Tensor) -> torch.Tensor:
    return v.detach().to("cpu", copy=True).contiguous()


def write_snapshot(snapshot: MethodSnapshot, folder: str | Path) -> Path:
    """Write weights then metadata (with the weights' hash) atomically; metadata last, so a
    folder with a checkpoint.json always has complete weights. Files already on disk (the
    stage's frozen weights, the weights best/ got this epoch) are hard-linked."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = dict(snapshot.meta)
    if snapshot.stored_at is None or snapshot.weights_sha256 is None or not _link(snapshot.stored_at, folder / WEIGHTS):
        atomic_write(folder / WEIGHTS, lambda p: save_file(snapshot.tensors, str(p)))
        snapshot.weights_sha256 = sha256_file(folder / WEIGHTS)
    meta["weights_sha256"] = snapshot.weights_sha256
    if snapshot.frozen is not None:
        if not _link(snapshot.frozen.path, folder / FROZEN):
            atomic_write(folder / FROZEN, lambda p: shutil.copyfile(snapshot.frozen.path, p))  # type: ignore[union-attr]
        meta["frozen_weights"] = {"file": FROZEN, "sha256": snapshot.frozen.sha256}
    order = ("format", "method", "method_config", "stage", "encoder_config", "weights_sha256", "aliases")
    atomic_write_json(folder / META, {**{k: meta[k] for k in order}, **meta})
    return folder


def _link(source: Path, path: Path) -> bool:
    try:
        os.link(source, path)
        return True
    except OSError:
        return False   # gone, or no hard links here (another file system, FAT): write a copy


def stored_in(snapshot: MethodSnapshot, folder: Path) -> None:
    """Note that ``folder`` (after its swap into place) holds ``snapshot``'s weights, so its
    next folder (last/ after best/) links them."""
    snapshot.stored_at = folder / WEIGHTS


def weights_fingerprint(meta: dict[str, Any]) -> str | None:
    """One hash for all the weight files a checkpoint names (a model's identity for indexes)."""
    frozen = meta.get("frozen_weights")
    if not isinstance(frozen, dict):
        return meta.get("weights_sha256")
    return hashlib.sha256(f"{meta.get('weights_sha256')}+{frozen.get('sha256')}".encode()).hexdigest()


def save_method(method: CIRMethod, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    return write_snapshot(snapshot_method(method, extra), folder)


def clone_state(obj: Any) -> Any:
    """A copy of a resume state (optimizer moments, history) that later steps cannot change:
    ``optimizer.state_dict()`` hands out the live tensors."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: clone_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone_state(v) for v in obj)
    return copy.deepcopy(obj)


def _lowest_priority() -> None:
    """The writer thread at nice 19 (Linux niceness is per thread): serialising and hashing a
    checkpoint on a core that torch's threads use would stall their parallel regions (a
    preempted thread holds up the rest at the next barrier); at the lowest priority it takes
    the gaps. Unchanged where the OS does not allow it."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, 19)
    except (AttributeError, OSError):
        pass


class CheckpointWriter:
    """Writes a run's checkpoints on one background thread, so the next epoch trains while the
    previous one's files are serialised, hashed and fsynced (train_speed.py: on short epochs the
    writes were a tenth of the run). At most one write is in flight: ``submit`` first waits
    for the previous one and raises its error, so a failed write stops the run one epoch later
    at most; ``wait`` before anything that reads the checkpoints (results.json, the run's end).
    A crash while a write is in flight leaves the previous complete folders (``write_folder``)."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    def submit(self, job: Callable[[], Any]) -> None:
        self.wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer",
                                            initializer=_lowest_priority)
        self._pending = self._pool.submit(job)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self, raise_errors: bool = True) -> None:
        try:
            self.wait()
        except Exception:
            if raise_errors:
                raise      # else an error is already on its way out; the write's own is secondary
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


class CheckpointCadence:
    """When an epoch's checkpoints reach the disk: once the epochs not yet written took
    ``every_s`` seconds (training and validation; 0: every epoch), when ``flush`` is called
    (the run's end; an exception or Ctrl-C leaving the loop), and never more than one write in
    flight (``CheckpointWriter``). Each epoch's snapshot is kept in memory until it is written
    or replaced (so an exception can still write it), and the best epoch's weights since the
    last write are kept apart, so a write puts the best epoch so far in best/ and the latest in
    last/ together: a resume from last/ finds the best/ that its history names. Writing each
    short epoch cost a tenth of the run or more (train_speed.py: a tiny model's 1 s epochs spent
    ~70 ms of CPU each writing 28 MB; RN50x4's Combiner 0.7 GB), so a process killed outright
    loses the epochs of about the last ``every_s`` seconds (and the one in progress); one
    stopped by an exception loses only the epoch in progress."""

    def __init__(self, writer: CheckpointWriter, every_s: float,
                 write: Callable[["MethodSnapshot | None", "MethodSnapshot", dict[str, Any]], None]) -> None:
        self.writer, self.every_s, self.write = writer, float(every_s), write
        self.unsaved_s = 0.0      # seconds of the epochs since the last write (setup not counted)
        self._best: MethodSnapshot | None = None
        self._last: tuple[MethodSnapshot, dict[str, Any]] | None = None

    def epoch_done(self, improved: bool, weights: "MethodSnapshot", resume_state: dict[str, Any],
                   seconds: float, run_ends: bool = False) -> bool:
        """Note an epoch's snapshot; True when its write was started now (``run_ends``: not
        yet, ``flush(finished=True)`` follows)."""
        if improved:
            self._best = weights
        self._last = (weights, resume_state)
        self.unsaved_s += seconds
        if not run_ends and self.unsaved_s >= self.every_s:
            return self.flush()
        return False

    def flush(self, finished: bool = False) -> bool:
        """Write what is pending. ``finished``: the run's last epoch; its resume state drops the
        optimizer moments (twice the trained weights: 472 MB of RN50x4's Combiner), which only
        a resume into an unfinished stage reads."""
        if self._last is None:
            return False
        best, (weights, state) = self._best, self._last
        self._best = self._last = None
        if finished:
            state = {k: v for k, v in state.items() if k != "optimizer"}
        self.writer.submit(lambda: self.write(best, weights, state))
        self.unsaved_s = 0.0
        return True


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or the ``best`` (else ``last``) checkpoint of a run folder."""
    path = Path(path)
    if (path / META).is_file():
        return path
    for sub in ("best", "last"):
        if (path / sub / META).is_file():
            return path / sub
    if path.is_file() and path.name in (META, WEIGHTS):
        return path.parent
    raise CheckpointError(f"no checkpoint found (expected {META} here or in best/ or last/)", path)


def read_checkpoint_meta(folder: Path) -> dict[str, Any]:
    meta = read_json(folder / META, "checkpoint metadata")
    if not isinstance(meta, dict) or "method" not in meta or "encoder_config" not in meta:
        raise CheckpointError("checkpoint metadata lacks 'method' or 'encoder_config'", folder / META)
    for key, kinds, wanted in _META_FIELDS:
        value = meta.get(key)
        if key in meta and (not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds):
            raise CheckpointError(f"checkpoint metadata field '{key}' must be {wanted}, "
                                  f"found {type(value).__name__}", folder / META)
    if not isinstance(meta["encoder_config"].get("name"), str):
        raise CheckpointError("checkpoint metadata field 'encoder_config' lacks a string 'name'", folder / META)
    frozen = meta.get("frozen_weights")
    if frozen is not None and not (isinstance(frozen, dict) and frozen.get("file") == FROZEN
                                   and isinstance(frozen.get("sha256"), str)):
        raise CheckpointError(f"checkpoint metadata field 'frozen_weights' must be "
                              f'{{"file": "{FROZEN}", "sha256": HEX}}', folder / META)
    aliases = meta.get("aliases") or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise CheckpointError("checkpoint metadata field 'aliases' must map names to names", folder / META)
    return meta


#: checkpoint.json fields and their types (wrong types are one-line errors, not tracebacks)
_META_FIELDS: tuple[tuple[str, tuple[type, ...], str], ...] = (
    ("method", (str,), "a string"), ("encoder_config", (dict,), "an object"),
    ("method_config", (dict, type(None)), "an object"), ("stage", (str, type(None)), "a string"),
    ("weights_sha256", (str, type(None)), "a hex string"), ("aliases", (dict, type(None)), "an object"),
    ("format", (str,), "a string"), ("epoch", (int, type(None)), "an integer"),
)


def load_into(method: CIRMethod, state: dict[str, torch.Tensor], path: Path, strict: bool = True) -> tuple[list[str], list[str]]:
    """``method.load_state_dict`` with a tensor of the wrong shape as a one-line error (a file
    whose hash was updated after editing passes the hash check)."""
    try:
        missing, unexpected = method.load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        shapes = [" ".join(line.split()) for line in str(exc).splitlines() if "size mismatch" in line]
        detail = shapes[0] if shapes else " ".join(str(exc).split())[:200]
        raise CheckpointError(f"checkpoint does not fit method {getattr(method, 'name', '?')!r}: {detail[:300]}",
                              path) from None
    return list(missing), list(unexpected)


def load_weights(folder: Path, verify: bool = True) -> dict[str, torch.Tensor]:
    """Weights of a checkpoint folder, refusing truncated or tampered files."""
    meta = read_checkpoint_meta(folder)
    state = _read_weights(folder / WEIGHTS, meta.get("weights_sha256") or None, verify, "weights")
    frozen = meta.get("frozen_weights")
    if frozen is not None:
        more = _read_weights(folder / FROZEN, frozen["sha256"], verify, "frozen weights")
        if set(more) & set(state):
            raise CheckpointError("frozen weights repeat names of the trained ones", folder / FROZEN)
        state.update(more)
    return state


def _read_weights(path: Path, sha256: str | None, verify: bool, label: str) -> dict[str, torch.Tensor]:
    """One weight file of a checkpoint, checked against its recorded hash (None: none recorded)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {label} file is missing", path)
    if verify and sha256 is not None and sha256_file(path) != sha256:
        raise CheckpointError(f"checkpoint {label} do not match the hash in checkpoint.json "
                              "(truncated or modified)", path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"unreadable checkpoint weights ({exc})", path) from None


def load_method(path: str | Path, device: str | torch.device = "cpu") -> CIRMethod:
    """Rebuild the method (encoder included) from a run or checkpoint folder."""
    from ..encoders.registry import encoder_from_config
    from ..methods.registry import build_method

    folder = resolve_checkpoint(path)
    meta = read_checkpoint_meta(folder)
    # the method's own weights include the towers, so the encoder's original checkpoint file
    # is not needed (and may be gone) when a trained method is loaded
    encoder = encoder_from_config({**meta["encoder_config"], "checkpoint": None}, random_weights=True)
    method = build_method(meta["method"], encoder, meta.get("method_config") or {})
    state = load_weights(folder)
    missing, unexpected = load_into(method, state, folder / WEIGHTS, strict=False)
    missing = [k for k in missing if k not in (meta.get("aliases") or {})]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not fit method {meta['method']!r}: "
                              f"{len(missing)} missing keys (e.g. {missing[:3]}), "
                              f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})", folder / WEIGHTS)
    if meta.get("stage") in method.stages:
        method.set_stage(meta["stage"])
    return method.to(device).eval()


def init_weights_from(method: CIRMethod, path: str | Path) -> list[str]:
    """Initialise matching parameters from another checkpoint (e.g. stage-1 towers); returns
    the names that were loaded."""
    folder = resolve_checkpoint(path)
    state = load_weights(folder)
    own = method.state_dict()
    clash = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and own[k].shape != v.shape]
    if clash:
        raise CheckpointError(f"{len(clash)} weights do not fit this model (is encoder_config the same as the "
                              f"run's?), e.g. {'; '.join(clash[:2])}", folder / WEIGHTS)
    take = {k: v for k, v in state.items() if k in own}
    if not any(k.startswith("encoder.") for k in take):
        raise CheckpointError("no encoder weights in common with this model (different encoder?)", folder / WEIGHTS)
    load_into(method, take, folder / WEIGHTS, strict=False)
    return sorted(take)


def write_folder(final: str | Path, fill: Callable[[Path], None]) -> Path:
    """Fill a fresh hidden sibling folder, then swap it in with two renames, so a crash at any
    point leaves the previous complete folder or the new one (``recover_folder`` finishes a swap
    cut between its renames). Used for ``last/``, whose weights and training state must agree."""
    final = Path(final)
    new, old = final.with_name(f".{final.name}.new"), final.with_name(f".{final.name}.old")
    shutil.rmtree(new, ignore_errors=True)
    fill(new)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def recover_folder(final: str | Path) -> None:
    """Undo what a crash inside ``write_folder`` left: restore the previous folder if the swap
    was cut between its renames, and drop half-filled or leftover siblings. Writers only."""
    final = Path(final)
    new, old = final.with_name(f".{final.name}.new"), final.with_name(f".{final.name}.old")
    if not final.exists() and old.exists():
        os.replace(old, final)
    shutil.rmtree(new, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def save_state(folder: Path, state: dict[str, Any]) -> None:
    atomic_write(folder / STATE, lambda p: torch.save(state, p))


def load_state(folder: Path) -> dict[str, Any] | None:
    path = folder / STATE
    if not path.is_file():
        return None
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols: not one-line output
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only" not in str(exc):  # a truncated legacy pickle, not a refusal
            raise CheckpointError(f"corrupt or truncated file ({' '.join(str(exc).split())[:200]})", path) from None
        raise CheckpointError("training state refused: it holds Python objects other than tensors and "
                              "plain values (nothing was executed); delete it or pass --no-resume", path) from None
    except Exception as exc:  # truncation, bad zip: the same user problem
        raise CheckpointError(f"unreadable training state, truncated or corrupt "
                              f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})", path) from None
