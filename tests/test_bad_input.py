"""Bad input of every kind gets a clear error, never a traceback or a hang.

The corpus is generated (tests/badinput/make_corpus.py). Library calls must raise a one-line
CIRError naming the file; the CLI must print ONE line on stderr and exit 2 (the real `cir` is
run as a subprocess for a representative subset); the HTTP API must answer a 4xx JSON error.
Valid images in odd modes must load as RGB instead.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent / "badinput"))
from make_corpus import BAD_IMAGES, ODD_IMAGES, bomb_png, png_bytes, write_corpus  # noqa: E402

from composed_retrieval.config import load_config  # noqa: E402
from composed_retrieval.data.cirr import load_cirr  # noqa: E402
from composed_retrieval.data.fashioniq import load_fashioniq  # noqa: E402
from composed_retrieval.data.images import load_image  # noqa: E402
from composed_retrieval.data.userdata import load_user  # noqa: E402
from composed_retrieval.errors import CIRError, DataError  # noqa: E402
from cli_run import run_main  # noqa: E402
from fixtures_data import write_cirr_fixture, write_fashioniq_fixture, write_user_fixture  # noqa: E402
from test_index import make_gallery, saved_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def one_line(text: str) -> str:
    lines = [l for l in text.splitlines() if l.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


# ---- images ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_image_is_a_one_line_error_naming_the_file(corpus, name):
    t0 = time.perf_counter()
    with pytest.raises(DataError) as info:
        load_image(corpus[name])
    assert time.perf_counter() - t0 < 5      # no decompression, no hang
    message = one_line(str(info.value))
    assert message.startswith(str(corpus[name]) + ": ")
    assert re.search(r"not a readable image|corrupt or truncated|above the limit|too large", message)


@pytest.mark.parametrize("name", sorted(ODD_IMAGES))
def test_valid_image_in_an_odd_mode_loads_as_rgb(corpus, name):
    image = load_image(corpus[name])
    assert image.mode == "RGB" and image.size == (40, 30)


def test_alpha_is_composited_and_16_bit_is_scaled(corpus):
    # the pixel values survive conversion (not all black / all white)
    for name in ("gray16.png", "rgba.png", "cmyk.jpg"):
        arr = torch.tensor(list(load_image(corpus[name]).tobytes()), dtype=torch.float32)
        assert 20 < arr.mean() < 235 and arr.std() > 10, name


# ---- dataset files (CIRR format, as the synthetic benchmark writes it) -------------------------
def _edit_captions(fn):
    def mutate(root: Path, info: dict) -> Path:
        entries = json.loads(info["caption_file"].read_text())
        out = fn(entries)
        info["caption_file"].write_bytes(out if isinstance(out, bytes) else json.dumps(out).encode())
        return info["caption_file"]
    return mutate


def _edit_split(fn):
    def mutate(root: Path, info: dict) -> Path:
        rel = json.loads(info["split_file"].read_text())
        info["split_file"].write_text(json.dumps(fn(rel)), encoding="utf-8")
        return info["split_file"]
    return mutate


def _set(i: int, key: str, value):
    def fn(entries):
        entries[i][key] = value
        return entries
    return fn


def _drop(i: int, key: str):
    def fn(entries):
        del entries[i][key]
        return entries
    return fn


def _first_name(rel: dict, value) -> dict:
    rel[next(iter(rel))] = value
    return rel


def _remove_image(root: Path, info: dict) -> Path:
    (root / "dev" / f"{info['names'][2]}.png").unlink()
    return info["split_file"]


CIRR_CASES = {
    "truncated_json": (_edit_captions(lambda e: json.dumps(e)[:50].encode()), r"malformed CIRR caption file"),
    "empty_file": (_edit_captions(lambda e: b""), r"malformed CIRR caption file"),
    "not_utf8": (_edit_captions(lambda e: json.dumps(e).replace("make", "m\u00e9ke").encode("latin-1")), r"not UTF-8"),
    "top_level_object": (_edit_captions(lambda e: {"entries": e}), r"must be a list at the top level"),
    "entry_is_string": (_edit_captions(lambda e: ["hello"] + e), r"entry 0: expected an object"),
    "missing_pairid": (_edit_captions(_drop(1, "pairid")), r"entry 1: missing field 'pairid'"),
    "missing_reference": (_edit_captions(_drop(0, "reference")), r"entry 0: missing field 'reference'"),
    "missing_caption": (_edit_captions(_drop(2, "caption")), r"entry 2: missing field 'caption'"),
    "missing_target": (_edit_captions(_drop(0, "target_hard")), r"entry 0: missing field 'target_hard'"),
    "missing_img_set": (_edit_captions(_drop(0, "img_set")), r"entry 0: missing field 'img_set'"),
    "pairid_string": (_edit_captions(_set(0, "pairid", "100")), r"field 'pairid' must be an integer, found a string"),
    "pairid_bool": (_edit_captions(_set(0, "pairid", True)), r"field 'pairid' must be an integer, found a boolean"),
    "caption_number": (_edit_captions(_set(1, "caption", 3.5)), r"field 'caption' must be a string, found a number"),
    "caption_null": (_edit_captions(_set(1, "caption", None)), r"field 'caption' must be a string, found null"),
    "members_not_list": (_edit_captions(lambda e: [{**e[0], "img_set": {"members": "x"}}] + e[1:]),
                         r"field 'members' must be a list"),
    "unknown_reference": (_edit_captions(_set(0, "reference", "no-such-image")), r"reference 'no-such-image' is not in"),
    "unknown_target": (_edit_captions(_set(3, "target_hard", "ghost")), r"entry 3: target 'ghost' is not in"),
    "duplicate_pairid": (_edit_captions(_set(2, "pairid", 100)), r"pairid 100 repeats entry 0"),
    "split_is_list": (_edit_split(lambda rel: list(rel)), r"must be an object at the top level"),
    "split_path_dotdot": (_edit_split(lambda rel: _first_name(rel, "./dev/../../../etc/passwd")), r"contains '\.\.'"),
    "split_path_absolute": (_edit_split(lambda rel: _first_name(rel, "/etc/passwd")), r"is an absolute path"),
    "split_path_number": (_edit_split(lambda rel: _first_name(rel, 7)), r"path must be a non-empty string"),
    "split_path_backslash": (_edit_split(lambda rel: _first_name(rel, "..\\..\\x.png")), r"backslash"),
    "image_missing": (_remove_image, r"1 image listed in .* is missing"),
}


@pytest.mark.parametrize("case", sorted(CIRR_CASES))
def test_malformed_cirr_files_are_one_line_errors(tmp_path, case):
    mutate, pattern = CIRR_CASES[case]
    info = write_cirr_fixture(tmp_path, split="val")
    bad_file = mutate(tmp_path, info)
    with pytest.raises(DataError) as err:
        load_cirr(tmp_path, "val")
    message = one_line(str(err.value))
    assert str(bad_file) in message or str(tmp_path) in message
    assert re.search(pattern, message), message


@pytest.mark.parametrize("split", ["../val", "/etc/passwd", "val/../../x", ""])
def test_split_names_cannot_leave_the_dataset_folder(tmp_path, split):
    write_cirr_fixture(tmp_path, split="val")
    with pytest.raises(DataError, match="not a valid name"):
        load_cirr(tmp_path, split)


@pytest.mark.parametrize("name", ["../../outside", "sub/x", "..", "a\\b"])
def test_fashioniq_names_must_be_plain_file_names(tmp_path, name):
    info = write_fashioniq_fixture(tmp_path)
    split_file = tmp_path / "image_splits" / "split.dress.val.json"
    names = json.loads(split_file.read_text())
    split_file.write_text(json.dumps(names + [name]))
    with pytest.raises(DataError, match="must be a plain file name") as err:
        load_fashioniq(tmp_path, "val", "dress")
    assert str(split_file) in str(err.value) and info


def _outside_link(tmp_path: Path, images: Path) -> str:
    outside = tmp_path / "outside.png"
    Image.new("RGB", (4, 4)).save(outside)
    (images / "link.png").symlink_to(outside)
    return "link.png"


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink_out", "nul", "not_a_string"])
def test_user_data_names_cannot_leave_the_image_folder(tmp_path, case):
    info = write_user_fixture(tmp_path / "data")
    ref = {"dotdot": "../../outside.png", "absolute": "/etc/passwd", "nul": "a\x00.png",
           "not_a_string": 5}.get(case) or _outside_link(tmp_path, info["image_root"])
    info["jsonl"].write_text(json.dumps({"reference": ref, "caption": "x"}) + "\n")
    with pytest.raises(DataError) as err:
        load_user(info["jsonl"], info["image_root"])
    message = one_line(str(err.value))
    assert str(info["jsonl"]) in message or str(info["image_root"]) in message


def test_a_gallery_with_a_symlink_out_is_refused(tmp_path):
    from composed_retrieval.data.userdata import list_gallery
    make_gallery(tmp_path / "g", n=3)
    _outside_link(tmp_path, tmp_path / "g")
    with pytest.raises(DataError, match="symlink that leads outside the gallery folder"):
        list_gallery(tmp_path / "g")


def test_huge_and_odd_captions_load_and_tokenize_quickly(tmp_path):
    """A 1 MB caption and a lone surrogate (JSON '\\udce9') are valid JSON: they load, and the
    tokenizer truncates / hashes them instead of hanging or crashing."""
    from composed_retrieval.encoders.tiny import TinyEncoder
    info = write_cirr_fixture(tmp_path, split="val")
    entries = json.loads(info["caption_file"].read_text())
    entries[0]["caption"] = "make it red " * 87_382            # ~1 MB
    entries[1]["caption"] = "caf\udce9 au lait"
    info["caption_file"].write_text(json.dumps(entries), encoding="utf-8")
    split = load_cirr(tmp_path, "val")
    assert len(split.queries[0]["caption"]) >= 1_000_000
    encoder = TinyEncoder(embed_dim=16, image_width=8, text_width=16, text_layers=1, text_heads=2,
                          n_buckets=64, context_length=16)
    t0 = time.perf_counter()
    tokens = encoder.tokenize([q["caption"] for q in split.queries])
    assert time.perf_counter() - t0 < 5 and tokens.shape == (len(split.queries), 16)


# ---- configs and checkpoints (in-process CLI: same code path as `cir`, exit code 2) ------------
CONFIG_CASES = {
    "not_json": ("{\"method\": ", r"malformed config file"),
    "not_object": ("[1, 2]", r"config file must hold a JSON object"),
    "unknown_key": (json.dumps({"learning_rate": 3}), r"unknown config keys: learning_rate"),
    "stages_wrong_type": (json.dumps({"stages": "main"}), r"'stages' must be a non-empty list"),
    "epochs_string": (json.dumps({"stages": [{"name": "main", "epochs": "2"}]}), r"stages\[0\]\.epochs"),
    "lr_string": (json.dumps({"stages": [{"name": "main", "lr": "fast"}]}), r"stages\[0\]\.lr must be a finite number >= 0"),
    "seed_string": (json.dumps({"seed": "abc"}), r"'seed' must be an integer >= 0"),
    "batch_size_zero": (json.dumps({"batch_size": 0}), r"'batch_size' must be an integer >= 1"),
    "grad_clip_string": (json.dumps({"grad_clip": "x"}), r"'grad_clip' must be a finite number >= 0 or null"),
    "extra_eval_string": (json.dumps({"extra_eval_splits": "heldout"}), r"'extra_eval_splits' must be a list"),
    "num_workers_negative": (json.dumps({"num_workers": -1}), r"'num_workers' must be an integer >= 0"),
    "amp_string": (json.dumps({"amp": "yes"}), r"'amp' must be true or false"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_files_name_the_file(tmp_path, capsys, case):
    text, pattern = CONFIG_CASES[case]
    path = tmp_path / "cfg.json"
    path.write_text(text)
    code, _, err = run_main(["train", "--config", str(path), "--root", str(tmp_path), "--out",
                             str(tmp_path / "run"), "--quiet"], capsys)
    line = one_line(err)
    assert code == 2 and line.startswith(f"error: {path}: ") and re.search(pattern, line), line


@pytest.mark.parametrize("case", ["unknown_stage", "negative_width", "unknown_encoder_option"])
def test_bad_method_and_encoder_options_are_one_line(synth_tiny, tmp_path, capsys, case):
    sets = {"unknown_stage": ["stages.0.name=warmup"], "negative_width": ["encoder_config.image_width=-3"],
            "unknown_encoder_option": ["encoder_config.bogus=1"]}[case]
    argv = ["train", "--method", "sum", "--root", str(synth_tiny), "--out", str(tmp_path / "run"), "--quiet",
            "--set", "max_steps_per_epoch=1"]
    for s in sets:
        argv += ["--set", s]
    code, _, err = run_main(argv, capsys)
    line = one_line(err)
    assert code == 2 and re.search(r"stages|tiny encoder", line), line


# ---- HTTP API ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def api(tmp_path_factory):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from composed_retrieval.index.build import build_index
    from composed_retrieval.index.search import Searcher
    from composed_retrieval.service.app import Limits, create_app

    root = tmp_path_factory.mktemp("api")
    gallery = root / "gallery"
    names = make_gallery(gallery, n=6)
    model, method = saved_model(root / "model")
    build_index(root / "idx", gallery, model, method=method, progress=False, num_workers=0, log=lambda s: None)
    (root / "secret.txt").write_text("top secret")
    Image.new("RGB", (8, 8)).save(root / "secret.png")
    # an indexed file replaced by a symlink that leaves the gallery after indexing
    victim = gallery / names[-1]
    victim.unlink()
    victim.symlink_to(root / "secret.png")
    searcher = Searcher.open(root / "idx")
    client = TestClient(create_app(searcher, Limits(max_text_chars=200, max_upload_bytes=300_000)))
    return {"client": client, "names": names, "root": root, "linked": names[-1]}


def assert_json_4xx(response, pattern: str) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str), body
    assert "\n" not in body["detail"] and "Traceback" not in body["detail"]
    assert re.search(pattern, body["detail"], re.I), body["detail"]


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_api_bad_upload_is_a_4xx_json_error(api, corpus, name):
    data = corpus[name].read_bytes()
    r = api["client"].post("/search", data={"text": "add a circle"}, files={"image": (name, data, "image/png")})
    if not data:
        assert_json_4xx(r, "empty")
    elif len(data) > 300_000:
        assert_json_4xx(r, "limit")
    else:
        assert_json_4xx(r, re.escape(name) + r".*(not a readable|corrupt|above the limit|too large)")


@pytest.mark.parametrize("name", sorted(ODD_IMAGES))
def test_api_odd_mode_upload_is_searched(api, corpus, name):
    r = api["client"].post("/search", data={"text": "add a circle", "k": "3"},
                           files={"image": (name, corpus[name].read_bytes(), "application/octet-stream")})
    assert r.status_code == 200, r.text
    assert len(r.json()["results"]) == 3


API_NAME_CASES = {
    "dotdot": ("../secret.txt", 400, r"contains '\.\.'"),
    "dotdot_nested": ("sub/../../secret.txt", 400, r"contains '\.\.'"),
    "absolute": ("/etc/passwd", 400, r"absolute path"),
    "backslash": ("..\\secret.txt", 400, r"backslash"),
    "nul": ("img01.png\x00.txt", 400, r"NUL"),
    "unknown": ("no-such.png", 404, r"no image named"),
}


@pytest.mark.parametrize("case", sorted(API_NAME_CASES))
def test_api_reference_names_cannot_leave_the_gallery(api, case):
    name, status, pattern = API_NAME_CASES[case]
    r = api["client"].post("/search", data={"text": "add a circle", "name": name})
    assert r.status_code == status
    assert_json_4xx(r, pattern)


@pytest.mark.parametrize("path", ["/images/..%2F..%2Fsecret.txt", "/images/%2Fetc%2Fpasswd",
                                  "/thumbnails/..%2Fsecret.png", "/images/sub%2F..%2F..%2Fsecret.txt"])
def test_api_file_routes_refuse_traversal(api, path):
    r = api["client"].get(path)
    assert r.status_code in (400, 404) and "top secret" not in r.text
    assert r.headers["content-type"].startswith("application/json")


def test_api_symlink_swapped_in_after_indexing_is_refused(api):
    for r in (api["client"].get(f"/images/{api['linked']}"),
              api["client"].post("/search", data={"text": "x", "name": api["linked"]})):
        assert_json_4xx(r, "resolves outside the gallery folder")


API_FORM_CASES = {
    "missing_text": ({"name": "img01.png"}, r"field 'text' is required"),
    "empty_text": ({"text": "   ", "name": "img01.png"}, r"'text' is empty"),
    "text_too_long": ({"text": "x" * 201, "name": "img01.png"}, r"above the limit of 200"),
    "text_1mb": ({"text": "make it red " * 87_382, "name": "img01.png"}, r"maximum size|above the (upload )?limit"),
    "k_not_int": ({"text": "x", "name": "img01.png", "k": "ten"}, r"field 'k'"),
    "k_zero": ({"text": "x", "name": "img01.png", "k": "0"}, r"k must be between"),
    "no_reference": ({"text": "x"}, r"give a reference"),
}


@pytest.mark.parametrize("case", sorted(API_FORM_CASES))
def test_api_malformed_forms_are_4xx_json(api, case):
    data, pattern = API_FORM_CASES[case]
    assert_json_4xx(api["client"].post("/search", data=data), pattern)


def test_api_non_utf8_form_text_is_not_a_500(api):
    boundary = "xyzBOUNDARY"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\n").encode() + b"caf\xe9 \xff\xfe" + \
        (f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nimg01.png\r\n--{boundary}--\r\n").encode()
    r = api["client"].post("/search", content=body,
                           headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 200 or 400 <= r.status_code < 500, r.text
    assert r.headers["content-type"].startswith("application/json")


def test_api_malformed_multipart_and_json_bodies(api):
    c = api["client"]
    assert_json_4xx(c.post("/search", content=b"--nope\r\n\r\n", headers={"content-type": "multipart/form-data; boundary=zz"}),
                    r"multipart|text")
    assert_json_4xx(c.post("/search", content=b'{"text": "x"}', headers={"content-type": "application/json"}), r"text")
    assert_json_4xx(c.get("/gallery", params={"offset": "-1"}), r"offset")


# ---- the real `cir` in subprocesses: one line on stderr, exit 2 (index: skipped and listed, 0) --
def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env


def test_cli_subprocesses_report_bad_input_in_one_line(synth_tiny, tmp_path, corpus, capsys):
    from composed_retrieval.methods.baselines import Sum  # noqa: F401  (model below is a Sum)
    from composed_retrieval.train import checkpoint as ckpt

    # a model, a gallery with every bad and odd image, a tampered copy of the model
    model, method = saved_model(tmp_path / "model")
    gallery = tmp_path / "gallery"
    good = make_gallery(gallery, n=4)
    write_corpus(gallery)
    tampered = tmp_path / "tampered"
    ckpt.save_method(method, tampered)
    weights = bytearray((tampered / "model.safetensors").read_bytes())
    weights[-3] ^= 0xFF
    (tampered / "model.safetensors").write_bytes(bytes(weights))
    truncated_pred = tmp_path / "pred.json"
    truncated_pred.write_text('{"version": "rc2", "metric": "recall", "1": ["a"')
    wrong_typed = tmp_path / "sub.json"
    wrong_typed.write_text(json.dumps({"version": "rc2", "metric": "recall", "1": "not a list"}))
    bad_cfg = tmp_path / "cfg.json"
    bad_cfg.write_text(json.dumps({"method": "sum", "stages": [{"name": "main", "epochs": "two"}]}))
    # a run folder whose resume state is a malicious pickle
    evil_run = tmp_path / "evil_run"
    cfg_path = tmp_path / "evil_cfg.json"
    cfg_path.write_text(json.dumps({"method": "sum", "stages": [{"name": "main", "epochs": 1}]}))
    cfg = load_config(cfg_path, [], {"root": str(synth_tiny)})
    evil_run.mkdir()
    (evil_run / "config.json").write_text(json.dumps(cfg))
    ckpt.save_method(method, evil_run / "last")
    marker = tmp_path / "PWNED"
    _write_evil_pickle(evil_run / "last" / "state.pt", marker)

    # in-process (the same main() `cir` runs): a missing root, a malicious resume state
    for argv, name, pattern in (
            (["train", "--method", "sum", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r1"),
              "--quiet"], str(tmp_path / "nowhere"), r"not found"),
            (["train", "--config", str(cfg_path), "--root", str(synth_tiny), "--out", str(evil_run), "--quiet"],
             "state.pt", r"refused.*nothing was executed")):
        code, _, err = run_main(argv, capsys)
        line = one_line(err)
        assert code == 2 and name in line and re.search(pattern, line), line

    idx = tmp_path / "idx"
    cir = [PY, "-m", "composed_retrieval"]
    jobs = {
        "score": (cir + ["score", "--dataset", "cirr", "--root", str(synth_tiny), "--split", "val",
                         "--predictions", str(truncated_pred), "--subset-predictions", str(truncated_pred)],
                  2, str(truncated_pred), r"malformed"),
        "validate": (cir + ["validate-submission", "--dataset", "cirr", "--root", str(synth_tiny), "--split", "val",
                            str(wrong_typed), str(wrong_typed)], 2, str(wrong_typed), r"."),
        "train_config": (cir + ["train", "--config", str(bad_cfg), "--root", str(synth_tiny), "--out",
                                str(tmp_path / "r2"), "--quiet"], 2, str(bad_cfg), r"stages\[0\]\.epochs"),
        "eval_tampered": (cir + ["eval", "--run", str(tampered), "--root", str(synth_tiny), "--device", "cpu",
                                 "--quiet"], 2, "model.safetensors", r"do not match the hash"),
        "index": (cir + ["index", "--gallery", str(gallery), "--model", str(model), "--out", str(idx), "--quiet",
                         "--num-workers", "0"], 0, None, None),
    }
    results = _run_parallel(jobs)
    for key, (argv, code, name, pattern) in jobs.items():
        rc, out, err = results[key]
        assert rc == code, (key, rc, err[-2000:])
        if code == 2:
            line = one_line(err)
            assert line.startswith("error: ") and name in line and re.search(pattern, line), (key, line)
    assert not marker.exists()  # the pickle's payload never ran

    # cir index: every bad file is skipped and listed by name, every valid one is indexed
    rc, out, err = results["index"]
    skipped = set(re.findall(r"^skipped (\S+): ", out, re.M))
    assert skipped == set(BAD_IMAGES), out
    index_names = json.loads(next(idx.glob("items-*.json")).read_text())
    assert {it["name"] for it in index_names} == set(good) | set(ODD_IMAGES)

    # cir search with a bad reference image, and with text that is not UTF-8
    search = {
        "search_bomb": (cir + ["search", "--index", str(idx), "--image", str(corpus["bomb.png"]), "--text", "x"],
                        2, "bomb.png", r"too large"),
        "search_non_utf8": (cir + ["search", "--index", str(idx), "--image", good[0], "--text",
                                   os.fsdecode(b"caf\xe9")], 2, "", r"not valid UTF-8"),
    }
    results = _run_parallel(search)
    for key, (argv, code, name, pattern) in search.items():
        rc, out, err = results[key]
        line = one_line(err)
        assert rc == code and name in line and re.search(pattern, line), (key, line)


def _write_evil_pickle(path: Path, marker: Path) -> None:
    """A pickle whose __reduce__ creates ``marker`` when unpickled by a permissive loader."""
    import pickle
    payload = f"open({str(marker)!r}, 'w').write('pwned')"

    class Evil:
        def __reduce__(self):
            return (exec, (payload,))

    path.write_bytes(pickle.dumps({"optimizer": Evil(), "global_epoch": 1}))


def _run_parallel(jobs: dict, limit: int = 120) -> dict[str, tuple[int, str, str]]:
    procs = {k: subprocess.Popen(v[0], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                                 cwd=ROOT) for k, v in jobs.items()}
    out = {}
    for k, p in procs.items():
        try:
            stdout, stderr = p.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            p.kill()
            raise AssertionError(f"`cir {jobs[k][0][3]}` hung")
        out[k] = (p.returncode, stdout, stderr)
    return out


def test_corpus_size_is_reported():
    """The count of bad-input cases this file checks (printed with -s; asserted to stay large)."""
    count = (2 * len(BAD_IMAGES) + 2 * len(ODD_IMAGES) + len(CIRR_CASES) + 4 + 4 + 5 + 1 + 1
             + len(CONFIG_CASES) + 3 + len(API_NAME_CASES) + 4 + 1 + len(API_FORM_CASES) + 2 + 10 + 2)
    print(f"bad-input cases: {count}")
    assert count >= 100
    assert len(bomb_png()) < 200 and png_bytes(0)[:8] == b"\x89PNG\r\n\x1a\n"
