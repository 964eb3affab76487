"""Issue 18's adversarial findings, one test each: no silent wrong result, no data loss, one
line with exit 2 instead of a traceback, files that respect the umask.

The CLI runs in-process (``run_main``: the same ``main()`` as ``cir``) except where a resource
limit must apply to the process (the full-disk cases run ``cir`` as a subprocess).
"""
from __future__ import annotations

import io
import json
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from composed_retrieval.config import DEFAULTS, FIELDS, STAGE_FIELDS, Rule
from composed_retrieval.data.images import ALPHA_BACKGROUND, load_image, orient_array, upright_rgb
from composed_retrieval.data.userdata import hold_out, load_user
from composed_retrieval.errors import CheckpointError, DataError
from composed_retrieval.fileio import atomic_write, atomic_write_text, read_json, read_jsonl
from composed_retrieval.index.build import build_index
from composed_retrieval.index.search import Searcher
from composed_retrieval.train import checkpoint as ckpt
from cli_run import run_main
from fixtures_data import write_user_fixture
from test_index import _quiet, make_gallery, saved_model

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
#: one short trainable stage (the Combiner head on cached features)
ONE_STAGE = ["--set", 'stages=[{"name": "combiner", "epochs": 1}]']


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def fails_in_one_line(argv: list[str], capsys, pattern: str, name: str | None = None) -> str:
    code, _, err = run_main(argv, capsys)
    line = one_line(err)
    assert code == 2 and line.startswith("error: ") and re.search(pattern, line), (code, line)
    assert name is None or name in line, line
    return line


# ---- silent wrong results: orientation and transparency ----------------------------------------
def _sideways_jpeg(path: Path, orientation: int = 6) -> np.ndarray:
    """A JPEG stored sideways with an EXIF orientation; returns its stored (un-rotated) pixels."""
    rng = np.random.default_rng(0)
    arr = np.zeros((48, 80, 3), np.uint8)
    arr[:, :30] = (220, 30, 30)                   # a red band on the left: not symmetric
    arr[30:] += rng.integers(0, 60, (18, 80, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(path, "JPEG", quality=95, exif=exif)
    with Image.open(path) as raw:                 # what was stored, orientation not applied
        return np.asarray(raw.convert("RGB"))


def test_exif_orientation_is_applied_where_images_are_decoded(tmp_path):
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    stored = _sideways_jpeg(gallery / "phone.jpg")
    upright = orient_array(stored, 6)
    Image.fromarray(upright).save(gallery / "upright.png")          # the rotated-upright copy
    Image.fromarray(stored).save(gallery / "unrotated.png")         # what was indexed before
    im = load_image(gallery / "phone.jpg")
    assert im.size == (48, 80) and np.array_equal(np.asarray(im), upright)
    assert load_image(gallery / "phone.jpg", reduce_to=20).size == (24, 40)    # reduced decodes too

    # indexing: the phone JPEG gets exactly the vector of its upright copy
    model, method = saved_model(tmp_path / "model")
    build_index(tmp_path / "idx", gallery, model, method=method, **_quiet())
    searcher = Searcher.open(tmp_path / "idx")
    vec = dict(zip(searcher.index.names, searcher.index.data.vectors))
    assert np.array_equal(vec["phone.jpg"], vec["upright.png"])
    assert not np.allclose(vec["phone.jpg"], vec["unrotated.png"], atol=1e-3)
    # queries: a file reference goes through the same decoding
    q = [searcher.query_vectors([searcher.reference(str(gallery / n)).image], ["a red band"])
         for n in ("phone.jpg", "upright.png")]
    assert np.array_equal(q[0], q[1])
    # thumbnails (the service's) show the same upright picture
    pytest.importorskip("fastapi")
    from composed_retrieval.service.app import ThumbnailCache

    thumbs = ThumbnailCache(40, 4, 10**8)
    shown = [np.asarray(Image.open(io.BytesIO(thumbs.get(gallery / n))).convert("RGB"), dtype=np.float32)
             for n in ("phone.jpg", "upright.png")]
    assert shown[0].shape[:2] == (40, 24) and shown[0].shape == shown[1].shape
    assert np.abs(shown[0] - shown[1]).mean() < 8


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_array_agrees_with_pillow_for_every_orientation(orientation):
    """``orient_array`` is what a decoder that yields arrays (the fast JPEG path) calls."""
    arr = np.random.default_rng(orientation).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, "PNG", exif=exif)
    with Image.open(io.BytesIO(buf.getvalue())) as opened:
        opened.load()
        reference = np.asarray(ImageOps.exif_transpose(opened.copy()).convert("RGB"))
        assert np.array_equal(np.asarray(upright_rgb(opened)), reference)
    assert np.array_equal(orient_array(arr, orientation), reference)


def test_transparency_is_composited_on_white_or_a_chosen_colour(tmp_path):
    logo = np.zeros((20, 20, 4), np.uint8)        # transparent everywhere ...
    logo[5:15, 5:15] = (0, 0, 0, 255)             # ... but a black square
    Image.fromarray(logo, "RGBA").save(tmp_path / "logo.png")
    Image.fromarray(logo, "RGBA").convert("P").save(tmp_path / "logo.gif", transparency=0)
    assert ALPHA_BACKGROUND == (255, 255, 255)
    arr = np.asarray(load_image(tmp_path / "logo.png"))
    assert (arr[0, 0] == 255).all() and (arr[10, 10] == 0).all()    # the logo stays visible
    green = np.asarray(load_image(tmp_path / "logo.png", background=(0, 255, 0)))
    assert tuple(green[0, 0]) == (0, 255, 0) and (green[10, 10] == 0).all()
    assert np.asarray(load_image(tmp_path / "logo.gif")).mean() > 100   # palette transparency too


# ---- silent wrong results: vectors -------------------------------------------------------------
def _nan_model(folder: Path) -> Path:
    _, method = saved_model(folder.parent / f"{folder.name}_src")
    with torch.no_grad():
        for p in method.parameters():
            p.fill_(float("nan"))
    ckpt.save_method(method, folder)
    return folder


def test_nan_weights_fail_indexing_and_searching_in_one_line(tmp_path, capsys):
    gallery = tmp_path / "gallery"
    names = make_gallery(gallery, n=4)
    nan = _nan_model(tmp_path / "nan")
    fails_in_one_line(["index", "--gallery", str(gallery), "--model", str(nan), "--out", str(tmp_path / "bad"),
                       "--quiet", "--num-workers", "0"], capsys, r"NaN or infinite embeddings for 4 of 4", "nan")
    assert not (tmp_path / "bad" / "index.json").exists()
    # a good index searched with the broken model: an error, never an empty table with exit 0
    model, method = saved_model(tmp_path / "model")
    build_index(tmp_path / "idx", gallery, model, method=method, **_quiet())
    broken = ckpt.load_method(nan)
    searcher = Searcher.open(tmp_path / "idx", method=broken)
    with pytest.raises(CheckpointError, match="NaN or infinite query vectors"):
        searcher.search(searcher.reference(names[0]), "x", 3)
    # through the CLI the retrained model is refused before any query runs
    fails_in_one_line(["search", "--index", str(tmp_path / "idx"), "--model", str(nan), "--image", names[0],
                       "--text", "x"], capsys, r"changed since this index was built")


def test_every_index_file_is_hashed_and_a_permuted_vectors_file_is_refused(tmp_path, capsys):
    gallery = tmp_path / "gallery"
    names = make_gallery(gallery, n=5)
    model, method = saved_model(tmp_path / "model")
    build_index(tmp_path / "idx", gallery, model, method=method, **_quiet())
    meta = read_json(tmp_path / "idx" / "index.json")
    assert {"vectors_sha256", "items_sha256"} <= set(meta)
    vec_path = tmp_path / "idx" / meta["files"]["vectors"]
    vectors = np.load(vec_path)
    with open(vec_path, "wb") as fh:
        np.save(fh, vectors[::-1].copy())       # same shape, same values, rows permuted
    fails_in_one_line(["search", "--index", str(tmp_path / "idx"), "--image", names[0], "--text", "x"],
                      capsys, r"vectors file does not match the sha256", vec_path.name)
    np.save(vec_path, vectors)
    items_path = tmp_path / "idx" / meta["files"]["items"]
    items = json.loads(items_path.read_text())
    items[0]["name"], items[1]["name"] = items[1]["name"], items[0]["name"]
    items_path.write_text(json.dumps(items))
    with pytest.raises(CheckpointError, match="items file does not match"):
        Searcher.open(tmp_path / "idx")


# ---- user data: validation on a file or a held-out fraction ------------------------------------
def _user_rows(n: int) -> list[dict]:
    names = ["a.png", "b.jpg", "sub/c.png", "sub/deep/d.png"]
    return [{"reference": names[i % 4], "caption": f"change {i}", "target": names[(i + 1) % 4]} for i in range(n)]


def test_held_out_fraction_is_disjoint_exact_and_stable(tmp_path):
    info = write_user_fixture(tmp_path, _user_rows(10))
    split = load_user(info["jsonl"], info["image_root"])
    train, val = hold_out(split, 0.3)
    ids = lambda s: {q["query_id"] for q in s.queries}  # noqa: E731
    assert len(val.queries) == 3 and len(train.queries) == 7 and not ids(train) & ids(val)
    assert ids(hold_out(split, 0.3)[1]) == ids(val) and train.gallery == split.gallery
    with pytest.raises(DataError, match="leaves no"):
        hold_out(split, 0.01)


def test_user_training_says_which_validation_it_used(tmp_path, capsys):
    info = write_user_fixture(tmp_path / "u", _user_rows(8))
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps(r) + "\n" for r in _user_rows(3)))
    base = ["train", "--method", "combiner", *ONE_STAGE, "--dataset", "user", "--root", str(info["jsonl"]), "--quiet",
            "--image-root", str(info["image_root"]),
            "--set", "max_steps_per_epoch=1", "--set", "batch_size=4"]
    seen = {}
    for label, extra in (("file", ["--val-file", str(val)]), ("fraction", ["--val-fraction", "0.25"]),
                         ("none", [])):
        code, out, err = run_main(base + ["--out", str(tmp_path / f"run_{label}")] + extra, capsys)
        assert code == 0, err
        seen[label] = json.loads((tmp_path / f"run_{label}" / "results.json").read_text())["validation"]
    assert seen["file"] == f"separate file {val}"
    assert seen["fraction"].startswith("held-out 0.25 of") and "not trained on" in seen["fraction"]
    assert "training file" in seen["none"] and "itself" in seen["none"]
    fails_in_one_line(["train", "--method", "combiner", *ONE_STAGE, "--root", str(tmp_path), "--val-fraction", "0.2",
                       "--out", str(tmp_path / "r")], capsys, r"'val_fraction' applies only to --dataset user")


# ---- loose checks -------------------------------------------------------------------------------
def test_duplicate_json_keys_are_refused_everywhere(tmp_path, capsys, synth_tiny):
    cfg = tmp_path / "cfg.json"
    cfg.write_text('{"method": "sum", "seed": 1, "seed": 2}')
    fails_in_one_line(["train", "--config", str(cfg), "--root", str(synth_tiny), "--out", str(tmp_path / "r")],
                      capsys, r"malformed config file: duplicate key 'seed'", str(cfg))
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text('{"reference": "a.png", "caption": "x", "caption": "y"}\n')
    with pytest.raises(DataError, match="line 1: duplicate key 'caption'"):
        read_jsonl(jsonl)
    # a submission whose first duplicate pairid held a nonexistent image
    pairid = next(iter(json.loads((synth_tiny / "captions" / "cap.rc2.val.json").read_text())))["pairid"]
    sub = tmp_path / "sub.json"
    sub.write_text('{"version": "rc2", "metric": "recall", "%s": ["nope"], "%s": ["also"]}' % (pairid, pairid))
    fails_in_one_line(["validate-submission", "--dataset", "cirr", "--root", str(synth_tiny), "--split", "val",
                       str(sub), str(sub)], capsys, r"duplicate key", str(sub))


@pytest.mark.parametrize("setting,field", [("stages.0.epochs=true", "epochs"), ("amp=\"yes\"", "amp"),
                                           ("stages.0.train_image_tower=\"yes\"", "train_image_tower"),
                                           ("batch_size=true", "batch_size"), ("max_steps_per_epoch=true", "max_steps")])
def test_a_boolean_is_never_an_integer_and_a_string_never_a_boolean(tmp_path, capsys, synth_tiny, setting, field):
    fails_in_one_line(["train", "--method", "combiner", *ONE_STAGE, "--root", str(synth_tiny), "--out", str(tmp_path / "r"),
                       "--set", setting], capsys, field)


def test_misspelled_user_jsonl_keys_are_refused(tmp_path):
    info = write_user_fixture(tmp_path, [{"reference": "a.png", "caption": "x", "targte": "b.jpg"}])
    with pytest.raises(DataError, match=r"entry 0: unknown key 'targte'"):
        load_user(info["jsonl"], info["image_root"])


# ---- data loss ----------------------------------------------------------------------------------
def test_train_refuses_checkpoint_folders_it_did_not_write(tmp_path, capsys, synth_tiny):
    out = tmp_path / "mine"
    (out / "best").mkdir(parents=True)
    (out / "best" / "thesis.tex").write_text("two years of work")
    fails_in_one_line(["train", "--method", "combiner", *ONE_STAGE, "--root", str(synth_tiny), "--out", str(out), "--quiet",
                       "--set", "max_steps_per_epoch=1"],
                      capsys, r"best exists but was not written by `cir train`")
    assert (out / "best" / "thesis.tex").read_text() == "two years of work"


def test_index_refuses_a_partial_folder_it_did_not_write(tmp_path, capsys):
    gallery = tmp_path / "gallery"
    make_gallery(gallery, n=3)
    model, _ = saved_model(tmp_path / "model")
    (tmp_path / "idx" / "partial").mkdir(parents=True)
    (tmp_path / "idx" / "partial" / "notes.txt").write_text("keep me")
    fails_in_one_line(["index", "--gallery", str(gallery), "--model", str(model), "--out", str(tmp_path / "idx"),
                       "--quiet", "--num-workers", "0"], capsys, r"was not written by `cir index`")
    assert (tmp_path / "idx" / "partial" / "notes.txt").read_text() == "keep me"


def test_a_failed_first_run_does_not_block_the_corrected_command(tmp_path, capsys, synth_tiny):
    out = tmp_path / "run"
    base = ["train", "--method", "combiner", *ONE_STAGE, "--root", str(synth_tiny), "--out", str(out), "--quiet",
            "--set", "max_steps_per_epoch=1"]
    fails_in_one_line(base + ["--set", "val_split=nosuchsplit"], capsys, r"nosuchsplit")
    assert (out / "config.json").is_file() and not (out / "last").exists()
    code, _, err = run_main(base, capsys)
    assert code == 0, err
    assert (out / "last" / "checkpoint.json").is_file()
    # a run WITH a checkpoint is still protected
    fails_in_one_line(base + ["--set", "seed=5"], capsys, r"different config")


# ---- tracebacks -> one line ---------------------------------------------------------------------
@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without a GPU")
@pytest.mark.parametrize("command", ["train", "index", "serve", "search"])
def test_device_cuda_without_a_gpu_is_one_line(tmp_path, capsys, command):
    argv = {"train": ["train", "--method", "combiner", *ONE_STAGE, "--root", str(tmp_path), "--out", str(tmp_path / "r")],
            "index": ["index", "--gallery", str(tmp_path), "--model", str(tmp_path), "--out", str(tmp_path / "i")],
            "serve": ["serve", "--index", str(tmp_path)],
            "search": ["search", "--index", str(tmp_path), "--image", "x", "--text", "y"]}[command]
    fails_in_one_line(argv + ["--device", "cuda"], capsys, r"--device is 'cuda', but no CUDA GPU is available")
    cfg = tmp_path / "cfg.json"
    cfg.write_text('{"device": "cuda:1"}')
    if command == "train":
        fails_in_one_line(["train", "--config", str(cfg), "--root", str(tmp_path), "--out", str(tmp_path / "r")],
                          capsys, r"'device' is 'cuda:1', but no CUDA GPU", str(cfg))


def test_out_naming_an_existing_file_is_one_line(tmp_path, capsys, synth_tiny):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    fails_in_one_line(["train", "--method", "combiner", *ONE_STAGE, "--root", str(synth_tiny), "--out", str(blocker)],
                      capsys, r"--out names an existing file", str(blocker))
    gallery = tmp_path / "gallery"
    make_gallery(gallery, n=2)
    model, _ = saved_model(tmp_path / "model")
    fails_in_one_line(["index", "--gallery", str(gallery), "--model", str(model), "--out", str(blocker)],
                      capsys, r"--out names an existing file", str(blocker))
    # a file where a parent folder should be: the OS error itself, in one line naming the path
    fails_in_one_line(["index", "--gallery", str(gallery), "--model", str(model), "--out", str(blocker / "idx"),
                       "--quiet", "--num-workers", "0"], capsys, r"Not a directory|File exists", str(blocker))


def test_empty_user_jsonl_nan_override_and_deep_json_are_one_line(tmp_path, capsys, synth_tiny):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    fails_in_one_line(["train", "--method", "combiner", *ONE_STAGE, "--dataset", "user", "--root", str(empty), "--out",
                       str(tmp_path / "r")], capsys, r"holds no queries", str(empty))
    for value in ("NaN", "Infinity", "-1e999"):
        fails_in_one_line(["train", "--method", "combiner", *ONE_STAGE, "--root", str(synth_tiny), "--out", str(tmp_path / "r"),
                           "--set", f"stages.0.lr={value}"], capsys, r"stages.0.lr|stages\[0\]\.lr")
    deep = tmp_path / "deep.json"
    deep.write_text('{"method_config": ' + "[" * 100_000 + "]" * 100_000 + "}")
    fails_in_one_line(["train", "--config", str(deep), "--root", str(synth_tiny), "--out", str(tmp_path / "r")],
                      capsys, r"nested too deeply", str(deep))
    deep_line = tmp_path / "deep.jsonl"
    deep_line.write_text("[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(DataError, match="line 1: nested too deeply"):
        read_jsonl(deep_line)


def test_damaged_checkpoints_with_updated_hashes_are_one_line(tmp_path, capsys, synth_tiny):
    from safetensors.torch import load_file, save_file

    from composed_retrieval.fileio import sha256_file

    model, _ = saved_model(tmp_path / "model")
    state = load_file(str(model / "model.safetensors"))
    key = next(k for k, v in state.items() if v.ndim == 2)
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    save_file(state, str(model / "model.safetensors"))
    meta = json.loads((model / "checkpoint.json").read_text())
    meta["weights_sha256"] = sha256_file(model / "model.safetensors")      # the hash "updated"
    (model / "checkpoint.json").write_text(json.dumps(meta))
    argv = ["eval", "--run", str(model), "--root", str(synth_tiny), "--device", "cpu", "--quiet"]
    fails_in_one_line(argv, capsys, rf"does not fit method .*size mismatch for {re.escape(key)}", "model.safetensors")
    for field, value in (("method", 5), ("encoder_config", "tiny"), ("method_config", [1]), ("stage", 3),
                         ("aliases", {"a": 1}), ("weights_sha256", True), ("epoch", "two")):
        bad = dict(meta, **{field: value})
        (model / "checkpoint.json").write_text(json.dumps(bad))
        fails_in_one_line(argv, capsys, rf"'{field}'", "checkpoint.json")


def _limited(max_bytes: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails (EFBIG), as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return apply


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, synth_tiny):
    """Writes past RLIMIT_FSIZE fail with EFBIG exactly where ENOSPC would: numpy's short write,
    torch's serializer ("enforce fail ... unexpected pos") and safetensors' I/O error."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    code = ("import sys, torch; from composed_retrieval.fileio import atomic_write\n"
            "try:\n atomic_write(sys.argv[1], lambda p: torch.save({'a': torch.zeros(100000)}, p))\n"
            "except OSError as e: print(e.filename, '|', e.strerror)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "state.pt")], capture_output=True, text=True,
                         env=env, preexec_fn=_limited(50_000), timeout=120)
    assert out.stdout.startswith(f"{tmp_path / 'state.pt'} | ") and "unexpected pos" in out.stdout, out
    assert list(tmp_path.glob(".state.pt.*")) == []            # no temporary left behind

    gallery = tmp_path / "gallery"
    make_gallery(gallery, n=6)
    model, _ = saved_model(tmp_path / "model")
    jobs = {"index": ["index", "--gallery", str(gallery), "--model", str(model), "--out", str(tmp_path / "idx"),
                      "--quiet", "--num-workers", "0"],
            "train": ["train", "--method", "combiner", *ONE_STAGE, "--root", str(synth_tiny), "--out", str(tmp_path / "run"),
                      "--quiet", "--set", "max_steps_per_epoch=1", "--set", "num_workers=0",
                      "--set", f"cache_dir={tmp_path / 'cache'}"]}
    # train: the limit falls on config.json, before the feature cache's worker processes start
    # (a DataLoader worker that cannot write its shared memory hangs its parent: not covered here)
    for name, argv in jobs.items():
        proc = subprocess.run([sys.executable, "-m", "composed_retrieval", *argv], capture_output=True, text=True,
                              env=env, cwd=tmp_path, preexec_fn=_limited({"index": 2_000, "train": 600}[name]),
                              timeout=120)
        line = one_line(proc.stderr)
        assert proc.returncode == 2 and line.startswith(f"error: {tmp_path}"), (name, proc.stderr[-2000:])
        assert re.search(r"File too large|disk full", line), line


# ---- the generated config test ------------------------------------------------------------------
def _bad_values(key: str, rule: Rule, tmp: Path) -> list[tuple[str, object]]:
    """(label, value) pairs: one wrong-typed, one (or two) out of range, derived from the rule."""
    wrong = {"str": 5, "path": 5, "file_spec": 5, "int": "3", "num": "x", "bool": "yes", "names": "heldout",
             "dict": [1]}[rule.kind]
    cases: list[tuple[str, object]] = [("wrong type", wrong)]
    if rule.kind == "int":
        cases += [("boolean as integer", True), ("out of range", int(rule.low) - 1 if rule.low is not None else "x")]
    elif rule.kind == "num":
        cases += [("out of range", -1.0 if rule.low is not None and not rule.high else 1.5), ("NaN", float("nan"))]
    elif rule.kind == "bool":
        cases += [("integer as boolean", 1)]
    elif rule.kind == "str":
        cases += [("out of range", "no-such-name")]
    elif rule.kind == "path":
        cases += [("out of range", str(tmp / "nowhere" / "x"))] if key != "cache_dir" else \
                 [("out of range", str(tmp / "a_file"))]
    elif rule.kind == "file_spec":
        cases += [("out of range", str(tmp / "nowhere" / "x")), ("object without file", {"image_root": "x"})]
    elif rule.kind == "names":
        cases += [("out of range", ["no-such-name"])]
    elif rule.kind == "dict":
        cases += [("out of range", {"no_such_option": 1})]
    return cases


def _generated_cases() -> list[tuple[str, str, object]]:
    out = []
    for key, rule in FIELDS.items():
        for label, value in _bad_values(key, rule, Path("TMP")):
            out.append((key, label, value))
    for key, rule in STAGE_FIELDS.items():
        for label, value in _bad_values(key, rule, Path("TMP")):
            out.append((f"stages.0.{key}", label, value))
    return out


def test_every_config_key_has_a_rule():
    assert set(FIELDS) == set(DEFAULTS) - {"stages"}


@pytest.mark.parametrize("key,label,value", _generated_cases(), ids=lambda v: str(v)[:30])
def test_generated_every_config_key_wrong_typed_and_out_of_range(tmp_path, capsys, synth_tiny, key, label, value):
    if isinstance(value, str) and value.startswith("TMP"):
        value = str(tmp_path / value[4:])
    (tmp_path / "a_file").write_text("not a folder")
    argv = ["train", "--method", "combiner", *ONE_STAGE, "--root", str(synth_tiny), "--out", str(tmp_path / "run"), "--quiet",
            "--set", "max_steps_per_epoch=1", "--set", f"{key}={json.dumps(value)}"]
    line = fails_in_one_line(argv, capsys, r".")
    if label != "out of range":   # the validator itself caught it, so the line names the field
        assert key.split(".")[-1] in line.replace("stages[0].", "stages.0."), line


# ---- files and formats --------------------------------------------------------------------------
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = atomic_write_text(tmp_path / "f.json", "{}")
        other = atomic_write(tmp_path / "w.npy", lambda p: np.save(p, np.zeros(2)))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode and other.stat().st_mode & 0o777 == mode


def test_more_extensions_are_indexed_or_listed_as_skipped(tmp_path, capsys):
    from PIL import features

    gallery = tmp_path / "gallery"
    names = make_gallery(gallery, n=2)
    for ext in (".jfif", ".jpe"):
        Image.new("RGB", (16, 16), (200, 10, 10)).save(gallery / f"photo{ext}", "JPEG")
    (gallery / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64)
    expected = {*names, "photo.jfif", "photo.jpe"}
    if features.check("avif"):
        Image.new("RGB", (16, 16), (10, 200, 10)).save(gallery / "new.avif", "AVIF")
        expected.add("new.avif")
    model, _ = saved_model(tmp_path / "model")
    code, out, _ = run_main(["index", "--gallery", str(gallery), "--model", str(model), "--out",
                             str(tmp_path / "idx"), "--quiet", "--num-workers", "0"], capsys)
    assert code == 0
    assert re.search(r"^skipped phone\.heic: .*cannot decode \.heic files", out, re.M), out
    indexed = {it["name"] for it in json.loads(next((tmp_path / "idx").glob("items-*.json")).read_text())}
    assert indexed == expected


def test_hardening_case_count_is_reported():
    """Bad-input cases this file (and test_index's batch test) adds to test_bad_input.py's
    (printed with -s; docs/reliability.md quotes both counts)."""
    count = (len(_generated_cases()) + 5 + 5 + 3 + 6 + 8 + 3 + 3 + 1 + 5 + 2 + 2 + 3 + 1 + 2)
    print(f"hardening bad-input cases: {count}")
    assert count >= 130 and len(_generated_cases()) >= 2 * len(FIELDS)
