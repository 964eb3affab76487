"""BLIP-2 backend (encoders/blip2.py) and CaLa-BLIP-2 (methods/cala_blip2.py) on tiny random models.

The references are transformers' own BLIP-2 classes (Blip2ForImageTextRetrieval, CLIPVisionModel,
Blip2QFormerModel) run on the same weights and inputs; the LAVIS checkpoints are written here from
LAVIS's key names (lavis/models/blip2_models/blip2_qformer.py, Qformer.py, eva_vit.py, clip_vit.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from composed_retrieval.encoders.base import MissingCapability
from composed_retrieval.encoders.blip2 import (PRESETS, Blip2Encoder, load_tokenizer, max_over_queries,
                                               save_random_folder, write_vocab)
from composed_retrieval.encoders.registry import build_encoder
from composed_retrieval.errors import CheckpointError, ConfigError

TOL = 1e-5
WORDS = ["red", "blue", "cube", "circle", "make", "the", "it", "add", "a"]
TEXTS = ["make the cube red", "add a blue circle", "it $ the cube"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_folder(tmp_path_factory.mktemp("blip2") / "hf", "tiny", WORDS, seed=1)


@pytest.fixture(scope="module")
def hf_model(hf_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import Blip2ForImageTextRetrieval
    return Blip2ForImageTextRetrieval.from_pretrained(str(hf_dir), local_files_only=True).eval()


def _pixels(n: int = 3, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < TOL


# ---- weights: Hugging Face folder -----------------------------------------------------------------
@torch.no_grad()
def test_hf_folder_features_equal_transformers(hf_dir: Path, hf_model) -> None:  # type: ignore[no-untyped-def]
    hidden = Blip2Encoder(hf_dir).eval()
    projected = Blip2Encoder(hf_dir, space="projected").eval()
    x = _pixels()
    ids = hidden.tokenize(TEXTS)
    mask = (ids != 0).long()
    itc = hf_model(pixel_values=x, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
    itm = hf_model(pixel_values=x, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
    q = hf_model.config.num_query_tokens
    vision = hf_model.vision_model(pixel_values=x).last_hidden_state
    query_hidden = hf_model.qformer(query_embeds=hf_model.query_tokens.expand(3, -1, -1),
                                    encoder_hidden_states=vision).last_hidden_state

    named = hidden.named_image_features(x)
    _close(named["query_tokens"], query_hidden)
    _close(named["projected_tokens"], itc.image_embeds)                  # BLIP-2 retrieval tokens [B, Q, 256]
    image = hidden.encode_image(x)
    _close(image.pooled, query_hidden[:, 0])                              # CaLa: query 0, un-projected
    _close(image.tokens, query_hidden)
    _close(projected.encode_image(x).tokens, itc.image_embeds)
    text = hidden.encode_text(ids)
    _close(text.tokens, itc.text_model_output.last_hidden_state)
    assert text.mask.tolist() == mask.bool().tolist()
    _close(projected.encode_text(ids).pooled, itc.text_embeds)
    _close(max_over_queries(named["projected_tokens"], projected.encode_text(ids).pooled), itc.logits_per_image)
    multi = hidden.encode_multimodal(x, ids)                              # query + text, cross-attending
    _close(multi.tokens, itm.text_model_output.last_hidden_state[:, :q])
    _close(multi.pooled, itm.text_model_output.last_hidden_state[:, 0])


def test_registry_spec_and_refusals(hf_dir: Path, tmp_path: Path) -> None:
    enc = build_encoder(f"blip2:{hf_dir}")
    assert enc.config["name"] == f"blip2:{hf_dir.resolve()}" and enc.embed_dim == 64 and enc.supports_multimodal
    with pytest.raises(ConfigError, match="needs weights"):
        build_encoder("blip2")
    opt = tmp_path / "opt"
    opt.mkdir()
    (opt / "config.json").write_text(json.dumps({"model_type": "blip-2", "architectures": ["Blip2Model"],
                                                 "qformer_config": {"use_qformer_text_input": False}}))
    with pytest.raises(CheckpointError, match="no text input") as info:
        build_encoder(f"blip2:{opt}")
    assert "\n" not in str(info.value)
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"query_tokens": torch.zeros(1)}, "hook": nn.Linear(1, 1)}, evil)
    with pytest.raises(CheckpointError, match="refused"):
        build_encoder(f"blip2:{evil}", tokenizer=str(hf_dir))
    with pytest.raises(CheckpointError, match="not found"):
        build_encoder(f"blip2:{tmp_path / 'missing'}")
    tiny = build_encoder("tiny")
    with pytest.raises(MissingCapability, match="multimodal"):
        from composed_retrieval.methods.registry import build_method
        build_method("cala_blip2", tiny)


# ---- weights: LAVIS checkpoints -------------------------------------------------------------------
def _lavis_qformer(model) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """LAVIS Blip2Qformer names of a transformers Blip2ForImageTextRetrieval's Q-Former side."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    out = {"query_tokens": sd["query_tokens"],
           "Qformer.bert.embeddings.word_embeddings.weight": sd["embeddings.word_embeddings.weight"],
           "Qformer.bert.embeddings.position_embeddings.weight": sd["embeddings.position_embeddings.weight"],
           "Qformer.bert.embeddings.position_ids": torch.arange(sd["embeddings.position_embeddings.weight"].shape[0])[None],
           "Qformer.bert.embeddings.LayerNorm.weight": sd["qformer.layernorm.weight"],
           "Qformer.bert.embeddings.LayerNorm.bias": sd["qformer.layernorm.bias"],
           "Qformer.cls.predictions.bias": torch.zeros(3), "temp": torch.tensor(0.07),
           "itm_head.weight": sd["itm_head.weight"], "itm_head.bias": sd["itm_head.bias"]}
    for k, v in sd.items():
        if k.startswith("qformer.encoder."):
            out["Qformer.bert." + k[len("qformer."):].replace(".attention.attention.", ".attention.self.")
                .replace(".crossattention.attention.", ".crossattention.self.")] = v
    for a, b in (("vision_proj", "vision_projection"), ("text_proj", "text_projection")):
        for w in ("weight", "bias"):
            out[f"{a}.{w}"] = sd[f"{b}.{w}"]
    return out


def _lavis_eva(model) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    sd = model.vision_model.state_dict()
    out = {"cls_token": sd["embeddings.class_embedding"], "pos_embed": sd["embeddings.position_embedding"],
           "patch_embed.proj.weight": sd["embeddings.patch_embedding.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embedding.bias"]}
    for i in range(model.config.vision_config.num_hidden_layers):
        s, d = f"encoder.layers.{i}.", f"blocks.{i}."
        for a, b in (("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("self_attn.projection", "attn.proj"),
                     ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            for w in ("weight", "bias"):
                out[f"{d}{b}.{w}"] = sd[f"{s}{a}.{w}"]
        out[f"{d}attn.qkv.weight"] = sd[f"{s}self_attn.qkv.weight"]
        q, _, v = sd[f"{s}self_attn.qkv.bias"].chunk(3)
        out[f"{d}attn.q_bias"], out[f"{d}attn.v_bias"] = q, v
    return out


@torch.no_grad()
def test_lavis_vit_g_checkpoint_equals_transformers(hf_dir: Path, hf_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    state = _lavis_qformer(hf_model)
    state.update({"visual_encoder." + k: v for k, v in _lavis_eva(hf_model).items()})
    state["ln_vision.weight"] = hf_model.vision_model.post_layernorm.weight.clone()
    state["ln_vision.bias"] = hf_model.vision_model.post_layernorm.bias.clone()
    path = tmp_path / "blip2_pretrained.pth"
    torch.save({"model": state, "epoch": 3}, path)
    enc = Blip2Encoder(path, tokenizer=hf_dir, preset="tiny").eval()
    assert enc.vision_kind == "eva_vit_g"
    x = _pixels()
    ref = hf_model.vision_model
    ref.post_layernorm.eps = 1e-5          # LAVIS's ln_vision eps (the encoder keeps it, see its docstring)
    try:
        vision = ref(pixel_values=x).last_hidden_state
    finally:
        ref.post_layernorm.eps = 1e-6
    hidden = hf_model.qformer(query_embeds=hf_model.query_tokens.expand(3, -1, -1),
                              encoder_hidden_states=vision).last_hidden_state
    _close(enc.vision_states(x), vision)
    _close(enc.encode_image(x).tokens, hidden)
    ids = enc.tokenize(TEXTS)
    text = hf_model.qformer(query_embeds=hf_model.embeddings(input_ids=ids), query_length=0,
                            attention_mask=(ids != 0).long()).last_hidden_state
    _close(enc.encode_text(ids).tokens, text)
    # the ViT in its own file (LAVIS's eva_vit_g.pth layout), one block more than BLIP-2 keeps
    qf = tmp_path / "qformer_only.pth"
    torch.save({"model": _lavis_qformer(hf_model) | {"ln_vision.weight": state["ln_vision.weight"],
                                                      "ln_vision.bias": state["ln_vision.bias"]}}, qf)
    eva = _lavis_eva(hf_model)
    n = hf_model.config.vision_config.num_hidden_layers
    eva.update({k.replace("blocks.0.", f"blocks.{n}."): v for k, v in eva.items() if k.startswith("blocks.0.")})
    torch.save(eva, tmp_path / "eva_vit_g.pth")
    with pytest.raises(CheckpointError, match="vit_checkpoint"):
        Blip2Encoder(qf, tokenizer=hf_dir, preset="tiny")
    split = Blip2Encoder(qf, tokenizer=hf_dir, preset="tiny", vit_checkpoint=tmp_path / "eva_vit_g.pth",
                         vit_layers=n).eval()
    _close(split.encode_image(x).tokens, hidden)


@torch.no_grad()
def test_lavis_vit_l_checkpoint_equals_transformers(hf_dir: Path, hf_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from transformers import CLIPVisionConfig, CLIPVisionModel

    vc = PRESETS["tiny_vit_l"]["vision_config"]
    torch.manual_seed(3)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_act="quick_gelu", layer_norm_eps=1e-5, **vc)).eval()
    ln_vision = nn.LayerNorm(vc["hidden_size"], eps=1e-5)
    nn.init.normal_(ln_vision.weight, 1.0, 0.1)
    sd = clip.state_dict()
    vit = {"conv1.weight": sd["embeddings.patch_embedding.weight"], "class_embedding": sd["embeddings.class_embedding"],
           "positional_embedding": sd["embeddings.position_embedding.weight"],
           "ln_pre.weight": sd["pre_layrnorm.weight"], "ln_pre.bias": sd["pre_layrnorm.bias"]}
    for i in range(vc["num_hidden_layers"]):
        s, d = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        vit[f"{d}attn.in_proj_weight"] = torch.cat([sd[f"{s}self_attn.{p}_proj.weight"] for p in "qkv"])
        vit[f"{d}attn.in_proj_bias"] = torch.cat([sd[f"{s}self_attn.{p}_proj.bias"] for p in "qkv"])
        for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                     ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            for w in ("weight", "bias"):
                vit[f"{d}{b}.{w}"] = sd[f"{s}{a}.{w}"]
    state = _lavis_qformer(hf_model) | {"visual_encoder." + k: v for k, v in vit.items()}
    state |= {"ln_vision.weight": ln_vision.weight.detach(), "ln_vision.bias": ln_vision.bias.detach()}
    path = tmp_path / "blip2_pretrained_vitL.pth"
    torch.save({"model": state}, path)
    enc = Blip2Encoder(path, tokenizer=hf_dir, preset="tiny_vit_l").eval()
    assert enc.vision_kind == "clip_vit_l"
    x = _pixels()
    vision = ln_vision(clip(pixel_values=x).last_hidden_state)
    hidden = hf_model.qformer(query_embeds=hf_model.query_tokens.expand(3, -1, -1),
                              encoder_hidden_states=vision).last_hidden_state
    _close(enc.vision_states(x), vision)
    _close(enc.encode_image(x).tokens, hidden)


# ---- pseudo-word slots, multimodal, the ViT cache ------------------------------------------------
@torch.no_grad()
def test_slot_embedding_in_text_and_multimodal_paths(hf_dir: Path) -> None:
    enc = Blip2Encoder(hf_dir).eval()
    x = _pixels(2)
    with_word = enc.tokenize(["make the cube red", "make the circle red"])
    with_slot = enc.tokenize(["make the $ red", "make the $ red"])
    word_ids = with_word[:, 3]
    slots = enc.role("textual").embeddings.word_embeddings(word_ids)
    _close(enc.encode_text(with_slot, slots).tokens, enc.encode_text(with_word).tokens)
    _close(enc.encode_multimodal(x, with_slot, slots).tokens, enc.encode_multimodal(x, with_word).tokens)
    other = enc.encode_multimodal(x, with_slot, torch.randn(slots.shape, generator=torch.Generator().manual_seed(0))).pooled
    assert (other - enc.encode_multimodal(x, with_word).pooled).abs().max() > 1e-3   # the slot is used
    with pytest.raises(ValueError, match="no pseudo-word slot"):
        enc.encode_multimodal(x, with_word, slots)


@torch.no_grad()
def test_vit_cache_is_keyed_by_content_and_exact(hf_dir: Path, tmp_path: Path) -> None:
    plain = Blip2Encoder(hf_dir).eval()
    cached = Blip2Encoder(hf_dir, vit_cache_items=8, vit_cache_dir=str(tmp_path / "vit"), vit_cache_dtype="float32").eval()
    x = _pixels(3)
    _close(cached.encode_image(x).tokens, plain.encode_image(x).tokens)
    assert (cached.vit_cache.hits, cached.vit_cache.misses) == (0, 3)
    cached.encode_image(x[:2])
    assert (cached.vit_cache.hits, cached.vit_cache.misses) == (2, 3)
    assert len(list((tmp_path / "vit").rglob("*.safetensors"))) == 3
    fresh = Blip2Encoder(hf_dir, vit_cache_dir=str(tmp_path / "vit"), vit_cache_dtype="float32").eval()
    _close(fresh.encode_image(x).tokens, plain.encode_image(x).tokens)          # read back from disk
    assert fresh.vit_cache.hits == 3
    y = x.clone()
    y[0, 0, 0, 0] += 0.5
    fresh.encode_image(y)
    assert fresh.vit_cache.misses == 1                                      # one changed pixel: a miss


# ---- CaLa-BLIP-2 --------------------------------------------------------------------------------
def test_cala_blip2_roles_and_what_trains(hf_dir: Path) -> None:
    from composed_retrieval.methods.registry import build_method

    method = build_method("cala_blip2", Blip2Encoder(hf_dir))
    enc = method.encoder
    assert enc.config["kwargs"]["qformer_roles"] == "separate"
    roles = [enc.role(r) for r in ("visual", "textual", "multimodal")]
    assert len({id(r) for r in roles}) == 3
    vit = {id(p) for p in enc.vit.parameters()}
    method.train_text_tower, method.train_image_tower = True, False
    ids = {id(p) for p in method.trainable_parameters()}
    assert not ids & vit
    assert {id(p) for p in enc.text_parameters() + enc.multimodal_parameters()} <= ids
    assert {id(p) for p in roles[1].qformer.parameters()} | {id(p) for p in roles[2].qformer.parameters()} <= ids
    assert id(roles[2].query_tokens) in ids and id(roles[1].query_tokens) not in ids
    assert not {id(p) for p in roles[0].parameters()} & ids
    method.train_image_tower = True
    assert {id(p) for p in enc.image_parameters()} <= {id(p) for p in method.trainable_parameters()}
    shared = build_method("cala_blip2", Blip2Encoder(hf_dir), {"share_qformer": True})
    shared.train_text_tower = shared.train_image_tower = True
    params = shared.trainable_parameters()
    assert len(params) == len({id(p) for p in params})
    split_size = sum(p.numel() for p in method.parameters())
    assert split_size - sum(p.numel() for p in shared.parameters()) == 2 * sum(p.numel() for p in roles[0].parameters())


def test_cala_blip2_loss_matches_public_formula(hf_dir: Path) -> None:
    """The mixed loss written out here from CaLa's blip_fine_tune.py (normalised logits, as in cala.py)."""
    from composed_retrieval.methods.registry import build_method

    torch.manual_seed(0)
    method = build_method("cala_blip2", Blip2Encoder(hf_dir), {"hca_dropout": 0.0}).eval()
    enc = method.encoder
    x_ref, x_tgt = _pixels(3, seed=1), _pixels(3, seed=2)
    ids = enc.tokenize(TEXTS[:2] + ["make it red"])
    out = method({"reference": x_ref, "target": x_tgt, "text": ids})
    with torch.no_grad():
        text = enc.encode_text(ids)
        ref, tgt = enc.encode_image(x_ref), enc.encode_image(x_tgt)
        mm = enc.encode_multimodal(x_ref, ids)
        text_feats, reference_feats = text.pooled, mm.pooled
        target_feats = F.normalize(tgt.pooled, dim=-1)
        matching = 100 * F.normalize(reference_feats + text_feats, dim=-1) @ target_feats.T
        aligning = 10 * F.normalize(text_feats, dim=-1) @ F.normalize(method.tac(ref.tokens, tgt.tokens), dim=-1).T
        psudo_t = method.hca(mm.tokens, text.tokens, tgt.tokens, None, text.mask, None)
        reasoning = 10 * F.normalize(psudo_t, dim=-1) @ F.normalize(reference_feats, dim=-1).T
        gt = torch.arange(3)
        contrastive = F.cross_entropy(0.45 * aligning + 0.55 * matching, gt)
        expected = 0.1 * F.cross_entropy(reasoning, gt) + 0.9 * contrastive
    assert abs(out["loss"].item() - expected.item()) < TOL


@pytest.fixture(autouse=True)
def one_thread():  # type: ignore[no-untyped-def]
    """The tiny Q-Former is thousands of small ops: on a loaded 2-core machine two OpenMP threads
    wait on each other far longer than they compute (a 40 s run took 400 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _train(argv_extra: list[str], root: Path, out: Path) -> dict:
    from composed_retrieval.cli import main
    argv = ["train", "--config", str(Path(__file__).parents[1] / "src/composed_retrieval/configs/cala_blip2_tiny.json"),
            "--root", str(root), "--out", str(out), "--device", "cpu", "--quiet", *argv_extra]
    assert main(argv) == 0
    return json.loads((out / "results.json").read_text())


def test_cala_blip2_tiny_trains_improves_and_reloads(synth_tiny: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from composed_retrieval.cli import main

    run = tmp_path / "run"
    result = _train(["--set", "batch_size=8", "--set", "stages.0.epochs=5", "--set", "extra_eval_splits=[]"],
                    synth_tiny, run)
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and rows[-1]["loss"] < rows[0]["loss"]
    assert max(r["headline"] for r in rows[1:]) > rows[0]["headline"]     # val recall beats epoch 1
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--device", "cpu", "--quiet"]) == 0  # rebuilt from the run folder
    got = json.loads(capsys.readouterr().out)
    assert {k: got[k] for k in result["val"]} == result["val"]     # eval adds its gallery and model


def test_cir_train_on_a_blip2_folder(synth_tiny: Path, tmp_path: Path) -> None:
    words = json.loads((Path(__file__).parents[1] / "src/composed_retrieval/configs/cala_blip2_tiny.json")
                       .read_text())["encoder_config"]["vocab_words"]
    folder = save_random_folder(tmp_path / "blip2", "tiny", words)
    run = tmp_path / "run"
    result = _train(["--encoder", f"blip2:{folder}", "--set", "encoder_config={}", "--set", "batch_size=8",
                     "--set", "stages.0.epochs=1", "--set", "max_steps_per_epoch=2", "--set", "extra_eval_splits=[]"],
                    synth_tiny, run)
    meta = json.loads((run / "best" / "checkpoint.json").read_text())
    assert meta["method"] == "cala_blip2" and meta["encoder_config"]["name"] == f"blip2:{folder.resolve()}"
    assert meta["encoder_config"]["kwargs"]["qformer_roles"] == "separate"
    assert 0.0 <= result["val"]["recall@50"] <= 100.0


def test_spn_generated_positives_and_static_negatives_on_blip2(synth_tiny: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """SPN unchanged on this encoder: positives ranked with it, and a static-negative stage whose
    bank rows are the method's gallery embeddings of the BLIP-2 image features."""
    import shutil

    from safetensors.torch import load_file

    from composed_retrieval.cli import main
    from composed_retrieval.config import load_config
    from composed_retrieval.data.images import load_image
    from composed_retrieval.data.registry import load_splits
    from composed_retrieval.train.checkpoint import load_method
    from composed_retrieval.train.loop import Trainer

    root = tmp_path / "data"
    shutil.copytree(synth_tiny, root)
    words = json.loads((Path(__file__).parents[1] / "src/composed_retrieval/configs/cala_blip2_tiny.json")
                       .read_text())["encoder_config"]["vocab_words"]
    folder = save_random_folder(tmp_path / "blip2", "tiny", words)
    assert main(["spn", "generate", "--dataset", "cirr", "--root", str(root), "--encoder", f"blip2:{folder}",
                 "--captioner", "scenes", "--window", "5,40", "--device", "cpu", "--quiet"]) == 0
    capsys.readouterr()
    cfg = load_config(None, [], {
        "method": "combiner", "encoder": f"blip2:{folder}", "dataset": "cirr", "root": str(root), "batch_size": 8,
        "seed": 0, "device": "cpu", "max_steps_per_epoch": 2, "extra_train_splits": ["spn"],
        "stages": [{"name": "combiner", "epochs": 1, "lr": 1e-3, "spn_negatives": {"tau": 0.05}}]})
    run = tmp_path / "run"
    Trainer(cfg, run, progress=False).run()
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["steps"] == 2 and rows[0]["spn_negatives"] > 0
    meta = json.loads((run / "spn_bank" / "stage0.json").read_text())
    vectors = load_file(str(run / "spn_bank" / "stage0.safetensors"))["vectors"]
    train = load_splits("cirr", str(root), "train")[0]
    assert meta["shape"][0] == len(train.all_image_names()) - len(meta["aliases"])
    method = load_method(run / "last", "cpu").eval()
    enc = method.encoder
    names = meta["names"][:3]
    x = torch.stack([enc.image_transform("targetpad")(load_image(train.image_path(n))) for n in names])
    with torch.no_grad():
        expected = method.gallery_embedding(enc.encode_image(x))
    assert (vectors[:3] - expected).abs().max() < 1e-2     # the cache stores float16 features


def test_cir_eval_off_the_shelf_blip2_folder(hf_dir: Path, synth_tiny: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """`cir eval --encoder blip2:DIR --method sum` with no run folder (the encoder-spec path of `cir eval`)."""
    from composed_retrieval.cli import main

    assert main(["eval", "--encoder", f"blip2:{hf_dir}", "--method", "sum", "--dataset", "cirr",
                 "--root", str(synth_tiny), "--device", "cpu", "--quiet"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"recall@1", "recall@5", "recall_subset@1", "avg"} <= set(metrics)
    assert 0.0 <= metrics["recall@50"] <= 100.0


def test_gradient_checkpointing_gives_the_same_gradients(hf_dir: Path) -> None:
    from composed_retrieval.methods.registry import build_method

    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)     # the same TAC/HCA initialisation
        method = build_method("cala_blip2", Blip2Encoder(hf_dir, gradient_checkpointing=checkpointing),
                              {"hca_dropout": 0.0}).train()
        for m in method.modules():    # training mode (checkpointing is on) without dropout: identical runs
            if isinstance(m, nn.Dropout):
                m.p = 0.0
            if isinstance(getattr(m, "attention_dropout", None), float):
                m.attention_dropout = 0.0
        method.train_text_tower = method.train_image_tower = True
        ids = method.encoder.tokenize(TEXTS)
        out = method({"reference": _pixels(3, seed=4), "target": _pixels(3, seed=5), "text": ids})
        params = method.trainable_parameters()
        grads.append(torch.autograd.grad(out["loss"], params, allow_unused=True))
    for a, b in zip(*grads):
        if a is not None:
            _close(a, b)
