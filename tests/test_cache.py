"""Feature cache: build once, reuse, key changes, damaged entries, weights hash memo."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from composed_retrieval.cache import FeatureCache, weights_hash
from composed_retrieval.data.preprocess import Preprocess
from composed_retrieval.encoders.tiny import TinyEncoder
from composed_retrieval.errors import ConfigError, DataError


class CountingTiny(TinyEncoder):
    """Counts images encoded, to see whether the cache re-embedded."""

    def __init__(self) -> None:
        super().__init__(embed_dim=32, image_width=32, text_width=32, text_layers=1, n_buckets=64)
        self.images_seen = 0

    def encode_image(self, pixels):
        self.images_seen += pixels.shape[0]
        return super().encode_image(pixels)


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    names = []
    for i in range(5):
        arr = (torch.rand(48, 64, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"n{i}.png")
        names.append(f"n{i}")
    return names, (lambda n: folder / f"{n}.png")


@pytest.fixture()
def encoder():
    torch.manual_seed(0)
    return CountingTiny().eval()


def _build(cache, enc, names, path_of, **kw):
    kw.setdefault("transform", Preprocess("targetpad", 64))
    return cache.get_or_build(enc, "toy/val", names, path_of, batch_size=2, num_workers=0, progress=False, **kw)


def test_build_then_reuse_without_reembedding(tmp_path, images, encoder):
    names, path_of = images
    cache = FeatureCache(tmp_path / "cache")
    first = _build(cache, encoder, names, path_of)
    assert encoder.images_seen == 5
    assert first.pooled.shape == (5, 32) and first.tokens.shape == (5, 64, 32)
    assert first.pooled.dtype == torch.float16
    second = _build(cache, encoder, names, path_of)
    assert encoder.images_seen == 5  # loaded from disk
    assert torch.equal(first.pooled, second.pooled) and torch.equal(first.tokens, second.tokens)
    assert second.names == names
    # the stored values are the encoder's (up to float16 storage)
    with torch.no_grad():
        ref = encoder.encode_image(torch.stack([Preprocess("targetpad", 64)(Image.open(path_of("n3")))]))
    torch.testing.assert_close(second.lookup("n3").pooled, ref.pooled[0], atol=2e-3, rtol=2e-3)
    assert second.lookup("n3").pooled.shape == (32,) and second.lookup("n3").tokens.shape == (64, 32)
    batch = second.features(["n4", "n0"])
    assert batch.pooled.dtype == torch.float32 and torch.equal(batch.pooled, second.features([4, 0]).pooled)
    assert second.index("n2") == 2
    with pytest.raises(DataError, match="'nope'"):
        second.index("nope")


def test_key_changes_with_preprocessing_weights_split_and_names(tmp_path, images, encoder):
    names, path_of = images
    cache = FeatureCache(tmp_path / "cache")
    _build(cache, encoder, names, path_of)
    _build(cache, encoder, names, path_of, transform=Preprocess("squarepad", 64))
    assert encoder.images_seen == 10
    _build(cache, encoder, names[:3], path_of)
    assert encoder.images_seen == 13
    cache.get_or_build(encoder, "toy/test", names, path_of, Preprocess("targetpad", 64), batch_size=2,
                       num_workers=0, progress=False)
    assert encoder.images_seen == 18
    with torch.no_grad():
        encoder.visual.proj[-1].bias.add_(1.0)  # new weights: in-place edit invalidates the memo
    _build(cache, encoder, names, path_of)
    assert encoder.images_seen == 23
    _build(cache, encoder, names, path_of, store_tokens=False)
    assert encoder.images_seen == 28
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 6
    with pytest.raises(ConfigError, match="Preprocess"):
        _build(cache, encoder, names, path_of, transform=lambda im: im)


def test_weights_hash_is_memoised_and_tracks_changes():
    torch.manual_seed(0)
    a = CountingTiny()
    h1 = weights_hash(a)
    assert weights_hash(a) == h1
    b = CountingTiny()
    b.load_state_dict(a.state_dict())
    assert weights_hash(b) == h1
    with torch.no_grad():
        b.text.proj.weight[0, 0] += 1
    assert weights_hash(b) != h1
    b.text.proj.weight = torch.nn.Parameter(a.text.proj.weight.detach().clone())
    assert weights_hash(b) == h1


def test_image_feature_key_ignores_the_text_tower_only():
    """A trained text tower (CaLa/DRA/SPN recipes) keeps the image cache; any image-side change
    (weights, buffers) gives a new key."""
    from composed_retrieval.cache import image_weights_hash

    torch.manual_seed(0)
    a = CountingTiny()
    h = image_weights_hash(a)
    with torch.no_grad():
        a.text.proj.weight[0, 0] += 1
    assert image_weights_hash(a) == h and weights_hash(a) != h
    with torch.no_grad():
        next(iter(a.visual.parameters())).view(-1)[0] += 1
    assert image_weights_hash(a) != h
    h2 = image_weights_hash(a)
    a.visual.register_buffer("stat", torch.zeros(1))
    assert image_weights_hash(a) != h2


@pytest.mark.parametrize("damage", ["truncate", "flip", "meta"])
def test_damaged_entry_is_rebuilt_with_a_warning(tmp_path, images, encoder, damage):
    names, path_of = images
    cache = FeatureCache(tmp_path / "cache")
    good = _build(cache, encoder, names, path_of)
    data = next((tmp_path / "cache").rglob("*.safetensors"))
    meta = data.with_suffix(".json")
    raw = data.read_bytes()
    if damage == "truncate":
        data.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
        data.write_bytes(raw[:-10] + bytes([raw[-10] ^ 0xFF]) + raw[-9:])
    else:
        meta.write_text("{not json")
    with pytest.warns(RuntimeWarning, match="rebuilding") as rec:
        again = _build(cache, encoder, names, path_of)
    assert str(data) in str(rec[0].message) or str(meta) in str(rec[0].message)
    assert encoder.images_seen == 10
    assert torch.equal(again.pooled, good.pooled)
    assert json.loads(meta.read_text())["file_size"] == data.stat().st_size
    _build(cache, encoder, names, path_of)  # and the rebuilt entry is reused
    assert encoder.images_seen == 10


def test_skip_bad_images_recorded_in_the_entry(tmp_path, images, encoder):
    names, path_of = images
    path_of("n1").write_bytes(b"broken")
    cache = FeatureCache(tmp_path / "cache")
    with pytest.raises(DataError, match="n1.png"):
        _build(cache, encoder, names, path_of)
    got = _build(cache, encoder, names, path_of, skip_bad=True)
    assert got.names == ["n0", "n2", "n3", "n4"] and [e[0] for e in got.errors] == ["n1"]
    again = _build(cache, encoder, names, path_of, skip_bad=True)
    assert again.errors == got.errors and encoder.images_seen == 4
    with pytest.raises(DataError, match="n1.png"):  # a strict caller is not served the gap
        _build(cache, encoder, names, path_of)
