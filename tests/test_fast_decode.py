"""The fast gallery data path (simplejpeg / torchvision decode, tensor resize) against the
Pillow path: same pixels within one grey level, same embeddings within fp tolerance, same
rankings; unusual files (alpha, palette, 16-bit, CMYK, EXIF-rotated, corrupt) keep Pillow's rules."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from composed_retrieval.data import fast_images
from composed_retrieval.data.images import load_image
from composed_retrieval.data.preprocess import Preprocess
from composed_retrieval.encoders.embed import embed_images
from composed_retrieval.encoders.registry import build_encoder


def _photo(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = (rng.random((h, w, 3)) * 60).astype(np.uint8)
    arr[h // 4: h // 2, w // 5: w // 2] = rng.integers(0, 256, 3)
    arr[h // 2:, w // 2:, 1] = 220
    return Image.fromarray(arr)


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _gallery(folder) -> list[str]:
    """Plain JPEGs/PNGs of several sizes, plus every kind of file the fast path hands to Pillow."""
    names = []
    sizes = [(400, 300), (300, 400), (256, 256), (640, 200), (120, 90), (333, 500)]
    for i, (w, h) in enumerate(sizes):
        _photo(w, h, i).save(folder / f"j{i}.jpg", quality=90)
        _photo(w, h, 10 + i).save(folder / f"p{i}.png")
        names += [f"j{i}.jpg", f"p{i}.png"]
    _photo(200, 150, 20).convert("L").save(folder / "grey.jpg")
    _photo(200, 150, 21).convert("L").save(folder / "grey.png")
    _photo(200, 150, 22).convert("CMYK").save(folder / "cmyk.jpg")
    rgba = _photo(200, 150, 23).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((200, 150)))
    rgba.save(folder / "alpha.png")
    _photo(200, 150, 24).convert("P", palette=Image.ADAPTIVE).save(folder / "palette.png")
    Image.fromarray((np.arange(150 * 200).reshape(150, 200) * 2).astype(np.uint16)).save(folder / "deep.png")
    _photo(300, 200, 25).save(folder / "rotated.jpg", exif=_exif(6))
    names += ["grey.jpg", "grey.png", "cmyk.jpg", "alpha.png", "palette.png", "deep.png", "rotated.jpg"]
    return names


def test_decode_file_equals_pillow(tmp_path):
    for name in _gallery(tmp_path):
        fast = fast_images.decode_file(tmp_path / name)
        ref = torch.from_numpy(np.asarray(load_image(tmp_path / name)).copy()).permute(2, 0, 1)
        assert fast.shape == ref.shape and fast.dtype == torch.uint8, name
        assert int((fast.int() - ref.int()).abs().max()) == 0, name


@pytest.mark.parametrize("kind,resize_mode,interpolation", [
    ("targetpad", "shortest", "bicubic"), ("squarepad", "shortest", "bicubic"), ("resize", "shortest", "bicubic"),
    ("resize", "squash", "bilinear"), ("resize", "squash", "bicubic"), ("targetpad", "longest", "bicubic"),
    ("resize", "longest", "bilinear"), ("resize", "shortest", "bilinear")])
def test_tensor_preprocess_close_to_pil(kind, resize_mode, interpolation):
    # Pillow rounds to 8 bits between its horizontal and vertical passes, torchvision does not:
    # nearly all pixels agree within one level, a few near hard edges by up to 3. Every resize
    # mode and filter (SigLIP squashes with bilinear) is the fast gallery path's too
    p = Preprocess(kind, 64, resize_mode=resize_mode, interpolation=interpolation)
    for i, (w, h) in enumerate([(400, 300), (90, 200), (64, 64), (500, 80), (50, 40)]):
        im = _photo(w, h, i)
        ref = torch.from_numpy(np.asarray(p.pil(im)).copy()).permute(2, 0, 1).int()
        out = p.tensor(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
        assert out.shape == ref.shape
        diff = (out.int() - ref).abs()
        assert int(diff.max()) <= 3 and float((diff > 1).float().mean()) < 0.01, (w, h)
        assert float(diff.float().mean()) < 0.25, (w, h)


def test_fast_embeddings_and_rankings_equal_pillow_path(tmp_path):
    names = _gallery(tmp_path)
    torch.manual_seed(0)
    enc = build_encoder("tiny", embed_dim=32, image_size=64, image_width=16, text_width=32)
    kw = dict(batch_size=8, num_workers=0, progress=False)
    fast, kept, err = embed_images(enc, names, lambda n: tmp_path / n, decoder="fast", **kw)
    slow, kept2, err2 = embed_images(enc, names, lambda n: tmp_path / n, decoder="pillow", **kw)
    assert kept == kept2 == names and not err and not err2
    assert torch.allclose(fast.pooled, slow.pooled, atol=1e-3, rtol=1e-3)
    assert torch.allclose(fast.tokens, slow.tokens, atol=1e-3, rtol=1e-3)
    q = torch.randn(20, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal((q @ fast.pooled.T).argsort(dim=1, descending=True),
                       (q @ slow.pooled.T).argsort(dim=1, descending=True))


def test_fast_path_errors_are_pillow_errors(tmp_path):
    _photo(100, 80, 0).save(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    enc = build_encoder("tiny", embed_dim=32, image_size=64, image_width=16, text_width=32)
    kw = dict(batch_size=4, num_workers=0, progress=False, skip_bad=True)
    path_of = lambda n: tmp_path / n  # noqa: E731
    names = ["ok.jpg", "cut.jpg", "junk.png", "gone.jpg"]
    _, kept, errors = embed_images(enc, names, path_of, decoder="fast", **kw)
    _, kept2, errors2 = embed_images(enc, names, path_of, decoder="pillow", **kw)
    assert kept == kept2 == ["ok.jpg"] and errors == errors2 and len(errors) == 3


def test_jpeg_orientation_and_tensor_orient_match_exif_transpose():
    im = _photo(60, 40, 3)
    for o in range(1, 9):
        buf = io.BytesIO()
        im.save(buf, "JPEG", exif=_exif(o))
        data = buf.getvalue()
        assert fast_images.jpeg_orientation(data) == o
        tagged = Image.open(io.BytesIO(data))
        upright = torch.from_numpy(np.asarray(ImageOps.exif_transpose(tagged).convert("RGB")).copy()).permute(2, 0, 1)
        raw = torch.from_numpy(np.asarray(tagged.convert("RGB")).copy()).permute(2, 0, 1)
        assert torch.equal(fast_images.orient(raw, o), upright), o
    buf = io.BytesIO()
    im.save(buf, "JPEG")
    assert fast_images.jpeg_orientation(buf.getvalue()) == 1


def test_gpu_jpeg_branch_assembles_batches_in_name_order(tmp_path):
    """The CUDA branch (JPEG bytes from workers, decoded and preprocessed in the main process,
    placed among the worker-decoded pixels) run with torchvision's CPU decoder."""
    from composed_retrieval.encoders import embed

    names = _gallery(tmp_path)
    p = Preprocess("targetpad", 64)
    cpu = torch.device("cpu")
    ref = embed._collate_fast([embed._FileDataset(names, lambda n: tmp_path / n, embed._FastPixels(p))[i]
                               for i in range(len(names))])
    ds = embed._FileDataset(names, lambda n: tmp_path / n, embed._FastPixels(p, gpu_jpeg=True))
    chunk = embed._collate_fast([ds[i] for i in range(len(names))])
    assert chunk["jpeg_pos"] and chunk["pix_pos"]          # both kinds in one batch
    ((_, pixels),) = list(embed._on_device(iter([chunk]), p, cpu))
    assert pixels.shape == ref["image"].shape
    assert int((pixels.int() - ref["image"].int()).abs().max()) <= 1


def test_uint8_pixel_batches_normalised_per_batch_equal_the_per_image_transform(tmp_path):
    # the training loop batches PixelSource.uint8 images and normalises each batch where the
    # model runs; the floats must be the per-image transform's, bit for bit, preloaded or not
    from composed_retrieval.data.pixels import PixelSource

    names = [f"j{i}.jpg" for i in range(4)]
    for i, name in enumerate(names):
        _photo(300 + 20 * i, 200, i).save(tmp_path / name, quality=90)
    p = Preprocess("targetpad", 64, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    ref = torch.stack([p(load_image(tmp_path / n)) for n in names])
    for preload_mb in (2048, 0):
        src = PixelSource(names, lambda n: tmp_path / n, p, preload_max_mb=preload_mb, progress=False)
        assert (src.pixels is None) == (preload_mb == 0)
        batch = torch.stack([src.uint8(n) for n in names])
        assert batch.dtype == torch.uint8
        assert torch.equal(p.normalise(batch), ref)
        assert torch.equal(torch.stack([src(n) for n in names]), ref)
