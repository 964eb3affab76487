"""Encoder backends: tiny, open_clip (random weights), registry, checkpoints, embedding."""
from __future__ import annotations

import zlib

import pytest
import torch
from PIL import Image

from composed_retrieval.encoders.base import replace_slots
from composed_retrieval.encoders.embed import embed_images, embed_texts
from composed_retrieval.encoders.registry import build_encoder, encoder_from_config
from composed_retrieval.encoders.tiny import TinyEncoder
from composed_retrieval.encoders.tokenizer import BOS_ID, EOS_ID, PAD_ID, SLOT_ID, HashTokenizer
from composed_retrieval.errors import CheckpointError, ConfigError, DataError


@pytest.fixture(scope="module")
def tiny() -> TinyEncoder:
    torch.manual_seed(0)
    return TinyEncoder().eval()


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return build_encoder("open_clip:ViT-B-32").eval()


@pytest.fixture(scope="module")
def rn50x4():
    torch.manual_seed(0)
    return build_encoder("open_clip:RN50x4").eval()


# --- tokenizer ------------------------------------------------------------------------------
def test_tokenizer_ids_are_stable_crc32_buckets_with_specials():
    tok = HashTokenizer(n_buckets=4096, context_length=8)
    ids = tok(["A red, $"])[0].tolist()
    word = lambda w: 4 + zlib.crc32(w.encode()) % 4096  # noqa: E731
    assert ids == [BOS_ID, word("a"), word("red"), word(","), SLOT_ID, EOS_ID, PAD_ID, PAD_ID]
    assert torch.equal(tok(["A red, $"]), HashTokenizer(4096, 8)(["a RED , $"]))


def test_tokenizer_truncates_but_keeps_eos():
    tok = HashTokenizer(context_length=32)
    ids = tok([" ".join(["word"] * 100)])[0]
    assert ids.shape == (32,) and ids[0] == BOS_ID and ids[-1] == EOS_ID and (ids != PAD_ID).all()


# --- tiny encoder -----------------------------------------------------------------------------
def test_tiny_shapes_and_mask(tiny):
    f = tiny.encode_image(torch.randn(3, 3, 64, 64))
    assert f.pooled.shape == (3, 256) and f.tokens.shape == (3, 64, 128) and f.mask is None
    ids = tiny.tokenize(["a red circle", "remove the small blue square at the top"])
    t = tiny.encode_text(ids)
    assert t.pooled.shape == (2, 256) and t.tokens.shape == (2, 32, 128)
    assert t.mask.tolist() == (ids != PAD_ID).tolist()
    assert t.mask[0].sum() == 5 and t.mask[1].sum() == 10
    assert isinstance(tiny.image_transform("squarepad")(Image.new("RGB", (80, 50))), torch.Tensor)
    assert tiny.image_transform()(Image.new("RGB", (80, 50))).shape == (3, 64, 64)


def test_tiny_gradients_reach_every_parameter():
    torch.manual_seed(1)
    enc = TinyEncoder().train()
    img = enc.encode_image(torch.randn(4, 3, 64, 64))
    txt = enc.encode_texts(["a $ circle", "a blue $", "$ here", "big $"], slot_embeddings=torch.randn(4, 128))
    loss = (img.pooled @ txt.pooled.T).logsumexp(1).mean() + img.tokens.square().mean() + txt.tokens.square().mean()
    loss.backward()
    image_ids = {id(p) for p in enc.image_parameters()}
    text_ids = {id(p) for p in enc.text_parameters()}
    assert not image_ids & text_ids and image_ids | text_ids == {id(p) for p in enc.parameters()}
    no_grad = [n for n, p in enc.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    # padding_idx row of the embedding is the only thing allowed to stay without gradient
    assert no_grad == [], no_grad


def test_tiny_slot_embedding_equals_the_word_it_replaces(tiny):
    word_id = tiny.tokenizer.word_id("red")
    with_slot = tiny.encode_text(tiny.tokenize(["a $ circle"]),
                                 slot_embeddings=tiny.text.token_embedding.weight[word_id][None])
    plain = tiny.encode_text(tiny.tokenize(["a red circle"]))
    torch.testing.assert_close(with_slot.pooled, plain.pooled)
    other = tiny.encode_text(tiny.tokenize(["a $ circle"]), slot_embeddings=torch.randn(1, 128))
    assert not torch.allclose(other.pooled, plain.pooled)


def test_replace_slots_only_touches_slot_positions():
    words = torch.randn(2, 5, 4)
    ids = torch.tensor([[1, 3, 7, 3, 2], [1, 9, 3, 2, 0]])
    slots = torch.randn(2, 4)
    out = replace_slots(words, ids, 3, slots)
    for b in range(2):
        for i in range(5):
            expected = slots[b] if ids[b, i] == 3 else words[b, i]
            assert torch.equal(out[b, i], expected)
    with pytest.raises(ValueError, match="no pseudo-word slot"):
        replace_slots(words, torch.tensor([[1, 3, 2, 0, 0], [1, 5, 2, 0, 0]]), 3, slots)


# --- open_clip ----------------------------------------------------------------------------------
def test_open_clip_slot_token_is_dollar(vit):
    ids = vit.tokenize(["$"])[0]
    assert ids[:3].tolist() == [ids[0].item(), vit.slot_token_id, ids.max().item()]
    assert (vit.tokenize(["a photo of $ that is red"])[0] == vit.slot_token_id).sum() == 1


def test_vit_b32_token_shapes_and_text_path(vit):
    with torch.no_grad():
        pixels = torch.randn(1, 3, 224, 224)
        f = vit.encode_image(pixels)
        assert f.pooled.shape == (1, 512) and f.tokens.shape == (1, 49, 768)
        assert (vit.embed_dim, vit.image_token_dim, vit.text_token_dim, vit.image_size) == (512, 768, 512, 224)
        # the hooked tokens are the ln_post patch outputs: recompute them by hand
        v = vit.model.visual
        x = v.ln_post(v.transformer(v._embeds(pixels)))
        torch.testing.assert_close(f.tokens, x[:, 1:])
        torch.testing.assert_close(f.pooled, x[:, 0] @ v.proj)
        torch.testing.assert_close(f.pooled, vit.model.encode_image(pixels))
        ids = vit.tokenize(["a photo of a cat", "remove the dog and make it sunny outside"])
        t = vit.encode_text(ids)
        assert torch.equal(t.pooled, vit.model.encode_text(ids))
        assert t.tokens.shape == (2, 77, 512)
        eot = ids.argmax(-1)
        assert t.mask.sum(1).tolist() == (eot + 1).tolist() and not t.mask[0, eot[0] + 1:].any()


def test_open_clip_slot_embedding_equals_the_word_it_replaces(vit):
    red = vit.tokenize(["red"])[0][1]
    with torch.no_grad():
        slot = vit.encode_text(vit.tokenize(["a photo of $ car"]), vit.model.token_embedding.weight[red][None])
        plain = vit.encode_text(vit.tokenize(["a photo of red car"]))
    torch.testing.assert_close(slot.pooled, plain.pooled)


def test_rn50x4_token_shapes_and_text_path(rn50x4):
    with torch.no_grad():
        f = rn50x4.encode_image(torch.randn(1, 3, 288, 288))
        assert f.pooled.shape == (1, 640) and f.tokens.shape == (1, 81, 2560)
        assert (rn50x4.embed_dim, rn50x4.image_token_dim, rn50x4.text_token_dim, rn50x4.image_size) == (640, 2560, 640, 288)
        ids = rn50x4.tokenize(["a dog"])
        assert torch.equal(rn50x4.encode_text(ids).pooled, rn50x4.model.encode_text(ids))


def test_open_clip_parameter_split(rn50x4):
    img, txt = rn50x4.image_parameters(), rn50x4.text_parameters()
    ids_img, ids_txt = {id(p) for p in img}, {id(p) for p in txt}
    assert not ids_img & ids_txt
    rest = {id(p) for p in rn50x4.parameters()} - ids_img - ids_txt
    assert rest == {id(rn50x4.model.logit_scale)}
    assert ids_img == {id(p) for p in rn50x4.model.visual.parameters()}


def test_open_clip_checkpoint_round_trip_and_corruption(vit, tmp_path):
    path = tmp_path / "vit.pt"
    torch.save(vit.model.state_dict(), path)
    torch.manual_seed(123)  # a different random init, so only the loaded weights can match
    loaded = build_encoder("open_clip:ViT-B-32", checkpoint=path).eval()
    x = torch.randn(1, 3, 224, 224)
    ids = vit.tokenize(["a dog"])
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x).pooled, vit.encode_image(x).pooled)
        assert torch.equal(loaded.encode_text(ids).tokens, vit.encode_text(ids).tokens)
    assert loaded.config["checkpoint"] == str(path.resolve())
    assert encoder_from_config(loaded.config).config == loaded.config

    bad = tmp_path / "truncated.pt"
    with open(path, "rb") as fh:
        bad.write_bytes(fh.read(1 << 20))
    with pytest.raises(CheckpointError, match="truncated.pt") as err:
        build_encoder("open_clip:ViT-B-32", checkpoint=bad)
    assert "\n" not in str(err.value)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found") as err:
        build_encoder("tiny", checkpoint=tmp_path / "missing.safetensors")
    assert "missing.safetensors" in str(err.value)
    with pytest.raises(CheckpointError, match="missing.pt"):
        build_encoder("open_clip:ViT-B-32", checkpoint=tmp_path / "missing.pt")
    # a pickle that would build an arbitrary object is refused, not executed
    evil = tmp_path / "evil.pt"
    torch.save({"x": HashTokenizer()}, evil)
    with pytest.raises(CheckpointError, match="evil.pt"):
        build_encoder("tiny", checkpoint=evil)
    # weights of another architecture: a one-line mismatch error
    other = tmp_path / "other.pt"
    torch.save(TinyEncoder(embed_dim=64).state_dict(), other)
    with pytest.raises(CheckpointError, match="does not fit") as err:
        build_encoder("tiny", checkpoint=other)
    assert "\n" not in str(err.value)


def test_registry_names_and_tiny_checkpoint(tmp_path, tiny):
    with pytest.raises(ConfigError, match="tiny, open_clip:<model>"):
        build_encoder("resnet")
    with pytest.raises(ConfigError, match="unknown open_clip model"):
        build_encoder("open_clip:NoSuchNet")
    with pytest.raises(ConfigError, match="bad options"):
        build_encoder("tiny", widht=3)
    from safetensors.torch import save_file
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(path))
    torch.manual_seed(7)
    loaded = encoder_from_config({**tiny.config, "checkpoint": str(path)}).eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(loaded.encode_image(x).pooled, tiny.encode_image(x).pooled)


# --- embedding --------------------------------------------------------------------------------
def _write_images(folder, n, size=(70, 56)):
    gen = torch.Generator().manual_seed(0)
    names = []
    for i in range(n):
        arr = (torch.rand(size[1], size[0], 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"im{i}.png")
        names.append(f"im{i}")
    return names


@pytest.mark.parametrize("workers", [0, 2])  # 2 workers: chunks of 2 joined into batches of 3
def test_embed_images_matches_direct_encoding(tmp_path, tiny, workers):
    names = _write_images(tmp_path, 5)
    path_of = lambda n: tmp_path / f"{n}.png"  # noqa: E731
    tf = tiny.image_transform("targetpad")
    # the Pillow decoder is the exact reference; the fast decoder is compared in test_fast_decode.py
    feats, kept, errors = embed_images(tiny, names, path_of, tf, batch_size=3, num_workers=workers, progress=False,
                                       decoder="pillow")
    assert kept == names and errors == []
    from composed_retrieval.data.images import load_image
    with torch.no_grad():
        direct = tiny.encode_image(torch.stack([tf(load_image(path_of(n))) for n in names]))
    torch.testing.assert_close(feats.pooled, direct.pooled)
    torch.testing.assert_close(feats.tokens, direct.tokens)


def test_embed_images_bad_files(tmp_path, tiny):
    names = _write_images(tmp_path, 3)
    (tmp_path / "im1.png").write_bytes(b"not a png")
    path_of = lambda n: tmp_path / f"{n}.png"  # noqa: E731
    with pytest.raises(DataError, match="im1.png") as err:
        embed_images(tiny, names, path_of, batch_size=2, num_workers=1, progress=False)
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)
    feats, kept, errors = embed_images(tiny, names, path_of, batch_size=2, num_workers=0,
                                       progress=False, skip_bad=True, tokens=False)
    assert kept == ["im0", "im2"] and [e[0] for e in errors] == ["im1"]
    assert feats.pooled.shape == (2, 256) and feats.tokens.shape == (2, 0, 128)


def test_worker_chunks():
    from composed_retrieval.encoders.embed import worker_chunk
    assert worker_chunk(256, 0) == 256 and worker_chunk(256, 1) == 256
    assert worker_chunk(256, 15) == 18 and worker_chunk(3, 8) == 1


def test_embed_texts_matches_encode_texts(tiny):
    texts = [f"text number {i} with a $ slot" for i in range(5)]
    slots = torch.randn(5, 128)
    out = embed_texts(tiny, texts, batch_size=2, slot_embeddings=slots)
    with torch.no_grad():
        ref = tiny.encode_texts(texts, slots)
    torch.testing.assert_close(out.pooled, ref.pooled)
    assert torch.equal(out.mask, ref.mask) and out.tokens.shape == (5, 32, 128)
