"""Pretrained models without training: hf_clip / open_clip folders and files, model specs on
every command, no silent random weights, imported inversion networks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cli_run import run_main
from pretrained_fixtures import (OPEN_CLIP_PREPROCESS, clip_tokenizer, write_hf_clip, write_hf_siglip,
                                 write_open_clip_folder)

from composed_retrieval.encoders.registry import build_encoder
from composed_retrieval.errors import CheckpointError, ConfigError


def _pooled(out):  # transformers 5 returns an output object, older versions a tensor
    return out.pooler_output if hasattr(out, "pooler_output") else out


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer()


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory, tokenizer) -> Path:
    return write_hf_clip(tmp_path_factory.mktemp("hf") / "clip", tokenizer=tokenizer)


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory) -> Path:
    return write_hf_siglip(tmp_path_factory.mktemp("hf") / "siglip")


@pytest.fixture(scope="module")
def open_clip_dir(tmp_path_factory) -> Path:
    return write_open_clip_folder(tmp_path_factory.mktemp("oc") / "folder")


# --- hf_clip backend ------------------------------------------------------------------------
def test_hf_clip_features_equal_transformers(hf_clip_dir, tokenizer):
    enc = build_encoder(f"hf_clip:{hf_clip_dir}").eval()
    torch.manual_seed(1)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        img = enc.encode_image(pixels)
        ref = _pooled(enc.model.get_image_features(pixel_values=pixels))
        texts = ["a photo of a red circle", "make it blue", "a much longer caption " * 3]
        ids = enc.tokenize(texts)
        txt = enc.encode_text(ids)
        hf_ids = tokenizer(texts, padding=True, return_tensors="pt")
        ref_txt = _pooled(enc.model.get_text_features(**hf_ids))
    assert img.pooled.shape == (3, 16) and img.tokens.shape == (3, 16, 32)   # 4x4 patches, width 32
    assert (img.pooled - ref).abs().max() < 1e-5
    assert (txt.pooled - ref_txt).abs().max() < 1e-5          # our padding = the HF tokenizer's own
    eos = (ids == 49407).int().argmax(1)
    assert txt.mask.sum(1).tolist() == (eos + 1).tolist() and txt.tokens.shape == (3, 77, 32)
    assert enc.embed_dim == 16 and enc.text_token_dim == 32 and enc.image_size == 32


def test_hf_clip_slot_injection_equals_the_word_it_replaces(hf_clip_dir):
    enc = build_encoder(f"hf_clip:{hf_clip_dir}").eval()
    ids_slot = enc.tokenize(["a photo of $ that is red"])
    ids_word = enc.tokenize(["a photo of dog that is red"])
    assert int((ids_slot == enc.slot_token_id).sum()) == 1
    dog = enc.model.text_model.embeddings.token_embedding.weight[int(ids_word[0, 4])][None]
    with torch.no_grad():
        injected = enc.encode_text(ids_slot, slot_embeddings=dog).pooled
        plain = enc.encode_text(ids_word).pooled
        other = enc.encode_text(ids_slot).pooled
    assert (injected - plain).abs().max() < 1e-5 and (other - plain).abs().max() > 1e-4


def test_hf_clip_pads_like_open_clip_so_prompts_splice(hf_clip_dir):
    """textual_inversion splices "a photo of $ that" before the caption at the id level."""
    from composed_retrieval.methods.textual_inversion import splice_prompt

    enc = build_encoder(f"hf_clip:{hf_clip_dir}")
    ids = enc.tokenize(["is red", "a photo of $ that is red"])
    assert int(ids[0, 3]) == 49407 and not ids[0, 4:].any()            # BOS is red EOS, then zeros
    assert torch.equal(splice_prompt(enc, "a photo of $ that", ids[:1]), ids[1:])


def test_hf_siglip_features_equal_transformers(siglip_dir):
    enc = build_encoder(f"hf_clip:{siglip_dir}").eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        img = enc.encode_image(pixels)
        ref = _pooled(enc.model.get_image_features(pixel_values=pixels))
        ids = enc.tokenize(["a photo of $ that is red", "make it blue"])
        txt = enc.encode_text(ids)
        ref_txt = _pooled(enc.model.get_text_features(input_ids=ids))
        slot = torch.randn(2, 32)
    assert (img.pooled - ref).abs().max() < 1e-5 and img.tokens.shape == (2, 16, 32)
    assert (txt.pooled - ref_txt).abs().max() < 1e-5
    assert txt.mask.sum(1).tolist() == [8, 4]                 # words + </s>; padding after it
    prep = enc.image_transform("targetpad")
    assert (prep.resize_mode, prep.interpolation, prep.mean) == ("squash", "bilinear", (0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="no pseudo-word slot"):
        enc.encode_text(ids, slot_embeddings=slot)            # "make it blue" has no "$"


def test_hf_folder_without_weights_is_refused_unless_asked(tmp_path, tokenizer):
    folder = write_hf_clip(tmp_path / "noweights", tokenizer=tokenizer, weights=False)
    with pytest.raises(ConfigError, match="no weights .*--random-weights"):
        build_encoder(f"hf_clip:{folder}")
    a = build_encoder(f"hf_clip:{folder}", random_weights=True)
    b = build_encoder(f"hf_clip:{folder}", random_weights=True)
    assert a.config["kwargs"] == {"random_weights": True}
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))  # seeded
    with pytest.raises(ConfigError, match="not a Hugging Face model folder"):
        build_encoder(f"hf_clip:{tmp_path / 'missing'}")


# --- open_clip folders and the random-weights rule ------------------------------------------
def test_open_clip_folder_loads_offline_with_its_preprocessing(open_clip_dir, tmp_path):
    import open_clip

    enc = build_encoder(f"open_clip:{open_clip_dir}").eval()
    ref = open_clip.create_model(f"local-dir:{open_clip_dir}", load_weights=False)
    from safetensors.torch import load_file
    ref.load_state_dict(load_file(str(open_clip_dir / "open_clip_model.safetensors")))
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (enc.encode_image(pixels).pooled - ref.encode_image(pixels)).abs().max() < 1e-5
    prep = enc.image_transform("targetpad")
    assert prep.mean == tuple(OPEN_CLIP_PREPROCESS["mean"]) and prep.std == tuple(OPEN_CLIP_PREPROCESS["std"])
    assert (prep.resize_mode, prep.interpolation) == ("squash", "bilinear")
    from PIL import Image
    assert prep.pil(Image.new("RGB", (50, 20))).size == (32, 32)
    binary = write_open_clip_folder(tmp_path / "bin", fmt="bin")       # the .bin layout, same weights
    enc_bin = build_encoder(f"open_clip:{binary}")
    assert all(torch.equal(x, y) for x, y in zip(enc.state_dict().values(), enc_bin.state_dict().values()))
    empty = write_open_clip_folder(tmp_path / "empty", fmt="none")
    with pytest.raises(ConfigError, match="has no weights"):
        build_encoder(f"open_clip:{empty}")


def test_open_clip_without_weights_is_refused_unless_asked():
    with pytest.raises(ConfigError, match="open_clip:ViT-S-32 has no weights.*--random-weights"):
        build_encoder("open_clip:ViT-S-32")


# --- model specs on the commands ------------------------------------------------------------
def _json(argv, capsys):
    code, out, err = run_main(argv, capsys)
    assert code == 0, err
    return json.loads(out)


def test_cir_eval_and_index_with_an_hf_clip_folder(hf_clip_dir, synth_tiny, tmp_path, capsys):
    """The README commands: CIRR-protocol metrics and an index from a folder, no run."""
    out = _json(["eval", "--encoder", f"hf_clip:{hf_clip_dir}", "--method", "sum", "--dataset", "cirr",
                 "--root", str(synth_tiny), "--device", "cpu", "--quiet"], capsys)
    assert {"recall@1", "recall@5", "recall_subset@1", "avg"} <= set(out)
    assert out["model"]["method"] == "sum" and out["model"]["encoder"]["name"] == f"hf_clip:{hf_clip_dir.resolve()}"
    assert out["model"]["spec"]["encoder"] == f"hf_clip:{hf_clip_dir.resolve()}"
    assert out["model"]["method_options"]["fusion"] == "normalized"      # the default, recorded
    raw = _json(["eval", "--encoder", f"hf_clip:{hf_clip_dir}", "--method-config", '{"fusion": "raw"}',
                 "--root", str(synth_tiny), "--device", "cpu", "--quiet"], capsys)
    assert raw["model"]["method_options"]["fusion"] == "raw" and raw["model"]["spec"]["method_config"] == {"fusion": "raw"}
    from composed_retrieval.data.registry import load_splits
    split = load_splits("cirr", synth_tiny, "val")[0]
    assert out["gallery"] == {"dataset": "cirr", "split": "val", "protocol": "cirr", "images": len(split.gallery),
                              "queries": len(split.queries), "reference_removed": True}
    text = _json(["eval", "--encoder", f"hf_clip:{hf_clip_dir}", "--method", "text_only", "--root", str(synth_tiny),
                  "--device", "cpu", "--quiet"], capsys)
    assert text["model"]["method"] == "text_only" and text["gallery"] == out["gallery"]

    gallery = synth_tiny / "dev"
    idx = tmp_path / "idx"
    code, printed, err = run_main(["index", "--gallery", str(gallery), "--encoder", f"hf_clip:{hf_clip_dir}",
                                   "--method", "sum", "--out", str(idx), "--quiet"], capsys)
    assert code == 0, err
    meta = json.loads((idx / "index.json").read_text())
    assert meta["model"] is None and meta["model_spec"]["method"] == "sum"
    assert meta["model_description"]["encoder"]["name"].startswith("hf_clip:")
    name = sorted(p.name for p in gallery.iterdir())[0]
    res = _json(["search", "--index", str(idx), "--image", name, "--text", "make it blue", "-k", "3", "--json"], capsys)
    assert len(res["results"]) == 3 and name not in [r["name"] for r in res["results"]]
    # the query is encoded by the spec's model: the top score equals composing by hand
    from composed_retrieval.data.images import load_image
    from composed_retrieval.index.store import read_index
    from composed_retrieval.train.models import load_model
    method = load_model(f"hf_clip:{hf_clip_dir}")
    data = read_index(idx)
    with torch.no_grad():
        pix = method.encoder.image_transform("targetpad")(load_image(gallery / name))[None]
        q = method.compose(method.image_features(pix), method.text_features(method.encoder.tokenize(["make it blue"])))
    top = res["results"][0]
    row = torch.from_numpy(data.vectors[data.names.index(top["name"])]).float()
    assert abs(float(q[0] @ row) - top["score"]) < 1e-4


def test_spec_option_errors_are_one_line(hf_clip_dir, synth_tiny, capsys):
    cases = [
        (["eval", "--root", str(synth_tiny)], "give --run FOLDER"),
        (["eval", "--encoder", f"hf_clip:{hf_clip_dir}", "--method", "combiner", "--root", str(synth_tiny)],
         "has trained parts"),
        (["eval", "--encoder", f"hf_clip:{hf_clip_dir}"], "--root"),
        (["eval", "--encoder", "open_clip:ViT-S-32", "--root", str(synth_tiny)], "has no weights"),
        (["eval", "--encoder", f"hf_clip:{hf_clip_dir}", "--method-config", "[1]", "--root", str(synth_tiny)],
         "JSON object"),
        (["index", "--gallery", str(synth_tiny), "--out", "x"], "--gallery and a model"),
        (["eval", "--encoder", "tiny", "--root", str(synth_tiny)], "untrained random model"),
    ]
    for argv, message in cases:
        code, _, err = run_main(argv + ["--device", "cpu"] if argv[0] == "eval" else argv, capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_zeroshot_eval_with_a_spec_records_model_and_gallery(hf_clip_dir, synth_tiny, capsys):
    out = _json(["zeroshot-eval", "--encoder", f"hf_clip:{hf_clip_dir}", "--method", "image_only", "--dataset",
                 "cirr", "--root", str(synth_tiny), "--device", "cpu", "--quiet"], capsys)
    assert out["model"]["method"] == "image_only" and out["gallery"]["reference_removed"] is True


# --- imported inversion networks ------------------------------------------------------------
def _searle_reference(x, sd):
    """SEARLE / LinCIR Phi (src/phi.py): Linear-GELU-Dropout-Linear-GELU-Dropout-Linear, eval mode."""
    h = F.gelu(F.linear(x, sd["layers.0.weight"], sd["layers.0.bias"]))
    h = F.gelu(F.linear(h, sd["layers.3.weight"], sd["layers.3.bias"]))
    return F.linear(h, sd["layers.6.weight"], sd["layers.6.bias"])


def _pic2word_reference(x, sd):
    """Pic2Word IM2TEXT: per layer Linear -> Dropout -> ReLU, then fc_out (keys without module.)."""
    i = 0
    while f"layers.{i}.0.weight" in sd:
        x = F.relu(F.linear(x, sd[f"layers.{i}.0.weight"], sd[f"layers.{i}.0.bias"]))
        i += 1
    return F.linear(x, sd["fc_out.weight"], sd["fc_out.bias"])


def _write_layout(path: Path, layout: str, dim: int, out: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    if layout == "pic2word":
        sd = {"layers.0.0.weight": r(24, dim), "layers.0.0.bias": r(24), "layers.1.0.weight": r(24, 24),
              "layers.1.0.bias": r(24), "fc_out.weight": r(out, 24), "fc_out.bias": r(out)}
        torch.save({"epoch": 3, "state_dict_img2text": {f"module.{k}": v for k, v in sd.items()}}, path)
    else:
        sd = {"layers.0.weight": r(4 * dim, dim), "layers.0.bias": r(4 * dim), "layers.3.weight": r(4 * dim, 4 * dim),
              "layers.3.bias": r(4 * dim), "layers.6.weight": r(out, 4 * dim), "layers.6.bias": r(out)}
        torch.save({"Phi": sd} if layout == "searle" else {"Phi": sd, "epoch": 5}, path)
    return sd


@pytest.mark.parametrize("layout", ["searle", "lincir", "pic2word"])
def test_imported_phi_matches_the_published_architecture(layout, hf_clip_dir, tmp_path):
    from composed_retrieval.methods.registry import build_method
    from composed_retrieval.zeroshot.importers import import_phi

    enc = build_encoder(f"hf_clip:{hf_clip_dir}")
    method = build_method("textual_inversion", enc).eval()
    sd = _write_layout(tmp_path / f"{layout}.pt", layout, enc.embed_dim, enc.text_token_dim, seed=3)
    found = import_phi(method, tmp_path / f"{layout}.pt", layout if layout != "searle" else "auto")
    assert found == layout
    x = torch.randn(5, enc.embed_dim)
    ref = _pic2word_reference(x, sd) if layout == "pic2word" else _searle_reference(x, sd)
    with torch.no_grad():
        assert (method.phi(x) - ref).abs().max() < 1e-5
    bad = tmp_path / "bad.pt"
    _write_layout(bad, layout, enc.embed_dim + 1, enc.text_token_dim, seed=0)
    with pytest.raises(CheckpointError, match="image features"):
        import_phi(method, bad, layout)


def test_imported_phi_refuses_pickled_code(tmp_path):
    from composed_retrieval.zeroshot.importers import read_inversion

    path = tmp_path / "evil.pt"
    torch.save({"Phi": {"layers.0.weight": torch.zeros(1)}, "obj": Path("x")}, path)
    with pytest.raises(CheckpointError, match="nothing was executed"):
        read_inversion(path)


@pytest.mark.parametrize("layout", ["searle", "lincir", "pic2word"])
def test_zeroshot_eval_with_an_imported_phi(layout, hf_clip_dir, synth_tiny, tmp_path, capsys):
    path = tmp_path / f"{layout}.pt"
    _write_layout(path, layout, 16, 32, seed=1)
    out = _json(["zeroshot-eval", "--encoder", f"hf_clip:{hf_clip_dir}", "--phi", str(path), "--phi-layout",
                 layout, "--dataset", "cirr", "--root", str(synth_tiny), "--device", "cpu", "--quiet"], capsys)
    assert {"recall@1", "recall_subset@1"} <= set(out)
    assert out["model"]["method"] == "textual_inversion" and out["model"]["phi"]["layout"] == layout


def test_predict_and_search_take_a_spec_too(hf_clip_dir, synth_tiny, tmp_path, capsys):
    sub = tmp_path / "sub"
    out = _json(["predict", "--encoder", f"hf_clip:{hf_clip_dir}", "--root", str(synth_tiny), "--out", str(sub),
                 "--device", "cpu", "--quiet"], capsys)
    assert len(out["written"]) == 2 and out["model"]["method"] == "sum" and out["gallery"]["split"] == "test1"
    code, _, err = run_main(["validate-submission", "--dataset", "cirr", "--root", str(synth_tiny), "--split", "test1",
                             *out["written"]], capsys)
    assert code == 0, err
    gallery = tmp_path / "g"
    gallery.mkdir()
    import shutil
    for p in sorted((synth_tiny / "dev").iterdir())[:6]:
        shutil.copy(p, gallery / p.name)
    idx = str(tmp_path / "idx")
    assert run_main(["index", "--gallery", str(gallery), "--encoder", f"hf_clip:{hf_clip_dir}", "--method",
                     "image_only", "--out", idx, "--quiet"], capsys)[0] == 0
    first = sorted(p.name for p in gallery.iterdir())[0]
    stored = _json(["search", "--index", idx, "--image", first, "--text", "make it blue", "--json"], capsys)
    # image_only ignores the text; text_only ignores the image: the --encoder override is what ranks
    other = _json(["search", "--index", idx, "--image", first, "--text", "make it blue", "--json",
                   "--encoder", f"hf_clip:{hf_clip_dir}", "--method", "text_only"], capsys)
    again = _json(["search", "--index", idx, "--image", sorted(p.name for p in gallery.iterdir())[1], "--text",
                   "make it blue", "--json", "--encoder", f"hf_clip:{hf_clip_dir}", "--method", "text_only"], capsys)
    assert [r["score"] for r in stored["results"]] != [r["score"] for r in other["results"]]
    scores = lambda res: {r["name"]: r["score"] for r in res["results"]}  # noqa: E731
    common = set(scores(other)) & set(scores(again))
    assert common and all(abs(scores(other)[n] - scores(again)[n]) < 1e-5 for n in common)
    code, _, err = run_main(["index", "--add", "--out", idx, "--encoder", f"hf_clip:{hf_clip_dir}", "--method", "sum",
                             "--quiet"], capsys)
    assert code == 2 and "differs from the model" in err
