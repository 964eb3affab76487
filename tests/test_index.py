"""Gallery index: build, exact search, resume after an interruption, --add, skipped files,
approximate engines and their measured recall, and the `cir index` / `cir search` commands."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import composed_retrieval.encoders.embed as embed_module
from composed_retrieval.cli import main
from composed_retrieval.data.images import load_image
from composed_retrieval.encoders.tiny import TinyEncoder
from composed_retrieval.errors import CheckpointError, ConfigError, DataError
from composed_retrieval.index import faiss_index
from composed_retrieval.index.build import build_index
from composed_retrieval.index.search import Searcher
from composed_retrieval.index.store import PartialBuild, read_index
from composed_retrieval.methods.baselines import Sum
from composed_retrieval.train.checkpoint import save_method


# ---- fixtures shared with test_service.py and test_browser.py ------------------------------
def tiny_method(seed: int = 0) -> Sum:
    torch.manual_seed(seed)
    enc = TinyEncoder(embed_dim=32, image_size=32, image_width=32, text_width=32, text_layers=1,
                      text_heads=2, n_buckets=256, context_length=16)
    return Sum(enc, {}).eval()


def write_image(path: Path, seed: int, size: tuple[int, int] = (48, 40)) -> Path:
    """A distinct image per seed: a coloured rectangle on a noisy background."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 60, (size[1], size[0], 3), dtype=np.uint8)
    y, x = rng.integers(0, size[1] // 2), rng.integers(0, size[0] // 2)
    arr[y:y + size[1] // 2, x:x + size[0] // 2] = rng.integers(80, 255, 3, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def make_gallery(folder: Path, n: int = 12, seed: int = 0) -> list[str]:
    """n images, every third in a sub-folder; returns their sorted names."""
    names = [f"{'sub/' if i % 3 == 0 else ''}img{i:02d}.png" for i in range(n)]
    for i, name in enumerate(names):
        write_image(folder / name, seed * 1000 + i)
    return sorted(names)


def saved_model(folder: Path, seed: int = 0) -> tuple[Path, Sum]:
    method = tiny_method(seed)
    save_method(method, folder)
    return folder, method


def expected_vectors(method: Sum, gallery: Path, names: list[str]) -> np.ndarray:
    """Gallery vectors computed directly, one image at a time (independent of the index code)."""
    transform = method.encoder.image_transform("targetpad")
    out = []
    with torch.no_grad():
        for n in names:
            pixels = transform(load_image(gallery / n))[None]
            out.append(method.gallery_embedding(method.encoder.encode_image(pixels))[0].numpy())
    return np.stack(out)


def _quiet(**kw):
    return dict(progress=False, num_workers=0, log=lambda s: None, **kw)


# ---- build and exact search -----------------------------------------------------------------
def test_build_stores_vectors_names_hashes_and_model(tmp_path):
    gallery = tmp_path / "gallery"
    names = make_gallery(gallery)
    model, method = saved_model(tmp_path / "model")
    report = build_index(tmp_path / "idx", gallery, model, **_quiet(chunk_size=5))
    assert (report.count, report.embedded, report.reused, report.kind) == (12, 12, 0, "flat")
    data = read_index(tmp_path / "idx")
    assert data.names == names
    assert [it["sha256"] for it in data.items] == [hashlib.sha256((gallery / n).read_bytes()).hexdigest()
                                                   for n in names]
    np.testing.assert_allclose(data.vectors, expected_vectors(method, gallery, names), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(data.vectors, axis=1), 1.0, atol=1e-5)
    assert data.model_path() == model.absolute() and data.gallery_path() == gallery.absolute()
    assert not (tmp_path / "idx" / "partial").exists()


def test_search_matches_brute_force_and_leaves_reference_out(tmp_path):
    gallery = tmp_path / "gallery"
    names = make_gallery(gallery)
    model, method = saved_model(tmp_path / "model")
    build_index(tmp_path / "idx", gallery, model, **_quiet())
    searcher = Searcher.open(tmp_path / "idx")            # the model comes from the index
    ref = names[4]
    hits = searcher.search(searcher.reference(ref), "make it red", k=5)

    vectors = expected_vectors(method, gallery, names)
    transform = method.encoder.image_transform("targetpad")
    with torch.no_grad():
        q = method.compose(method.encoder.encode_image(transform(load_image(gallery / ref))[None]),
                           method.encoder.encode_text(method.encoder.tokenize(["make it red"])))[0].numpy()
    scores = vectors @ q
    scores[names.index(ref)] = -np.inf
    order = np.argsort(-scores)[:5]
    assert [h.name for h in hits] == [names[i] for i in order]
    np.testing.assert_allclose([h.score for h in hits], scores[order], atol=1e-4)
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]

    # an uploaded copy of a gallery file is left out by content hash
    copy = tmp_path / "copy.png"
    copy.write_bytes((gallery / ref).read_bytes())
    assert ref not in [h.name for h in searcher.search(searcher.reference(copy), "make it red", k=11)]
    with pytest.raises(DataError, match="neither an image file nor a gallery image"):
        searcher.reference("nope.png")
    with pytest.raises(DataError, match="contains '..'"):
        searcher.reference("../gallery/img01.png")


def test_unreadable_files_are_skipped_and_listed(tmp_path, capsys):
    gallery = tmp_path / "gallery"
    names = make_gallery(gallery, n=6)
    (gallery / "broken.png").write_bytes(b"not an image at all")
    good = (gallery / names[0]).read_bytes()
    (gallery / "sub" / "truncated.png").write_bytes(good[: len(good) // 2])
    model, _ = saved_model(tmp_path / "model")
    assert main(["index", "--gallery", str(gallery), "--model", str(model), "--out", str(tmp_path / "idx"),
                 "--quiet", "--num-workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "skipped broken.png:" in out and "skipped sub/truncated.png:" in out
    data = read_index(tmp_path / "idx")
    assert data.names == names
    assert [s["name"] for s in data.meta["skipped"]] == ["broken.png", "sub/truncated.png"]
    assert all(s["error"] for s in data.meta["skipped"])


# ---- resume ----------------------------------------------------------------------------------
def test_interrupted_build_resumes_and_equals_uninterrupted(tmp_path, monkeypatch):
    gallery = tmp_path / "gallery"
    names = make_gallery(gallery, n=14)
    (gallery / "broken.png").write_bytes(b"junk")
    model, _ = saved_model(tmp_path / "model")
    build_index(tmp_path / "clean", gallery, model, **_quiet(chunk_size=3))

    real = embed_module.embed_images
    calls: list[list[str]] = []

    def failing(encoder, chunk, *a, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user pressed Ctrl-C during the third chunk
        calls.append(list(chunk))
        return real(encoder, chunk, *a, **kw)

    monkeypatch.setattr(embed_module, "embed_images", failing)
    with pytest.raises(KeyboardInterrupt):
        build_index(tmp_path / "idx", gallery, model, **_quiet(chunk_size=3))
    assert not (tmp_path / "idx" / "index.json").exists()
    assert len(PartialBuild(tmp_path / "idx").chunks()) == 2

    resumed: list[str] = []

    def counting(encoder, chunk, *a, **kw):
        resumed.extend(chunk)
        return real(encoder, chunk, *a, **kw)

    monkeypatch.setattr(embed_module, "embed_images", counting)
    report = build_index(tmp_path / "idx", gallery, model, **_quiet(chunk_size=3))
    done_before = {n for c in calls for n in c}
    assert len(done_before) == 6 and not done_before & set(resumed)
    assert sorted(done_before | set(resumed)) == sorted(names + ["broken.png"])
    assert report.reused == len([n for n in done_before if n != "broken.png"])
    a, b = read_index(tmp_path / "clean"), read_index(tmp_path / "idx")
    assert a.names == b.names == names and a.items == b.items
    np.testing.assert_array_equal(a.vectors, b.vectors)
    assert a.meta["skipped"] == b.meta["skipped"] and [s["name"] for s in b.meta["skipped"]] == ["broken.png"]
    assert not (tmp_path / "idx" / "partial").exists()


def test_resume_with_another_model_is_refused(tmp_path, monkeypatch):
    gallery = tmp_path / "gallery"
    make_gallery(gallery, n=6)
    model, _ = saved_model(tmp_path / "model")
    other, _ = saved_model(tmp_path / "other", seed=1)

    def boom(*a, **kw):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(embed_module, "embed_images", boom)
    with pytest.raises(RuntimeError):
        build_index(tmp_path / "idx", gallery, model, **_quiet())
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="interrupted build with another model"):
        build_index(tmp_path / "idx", gallery, other, **_quiet())


# ---- --add -------------------------------------------------------------------------------------
def test_add_embeds_only_new_and_changed_images(tmp_path, monkeypatch):
    gallery = tmp_path / "gallery"
    names = make_gallery(gallery, n=9)
    model, method = saved_model(tmp_path / "model")
    build_index(tmp_path / "idx", gallery, model, **_quiet())
    before = read_index(tmp_path / "idx")

    write_image(gallery / "new" / "extra.png", 777)
    write_image(gallery / names[2], 555)                 # same name, new content
    (gallery / names[5]).unlink()                        # deleted from the gallery
    real = embed_module.embed_images
    embedded: list[str] = []

    def counting(encoder, chunk, *a, **kw):
        embedded.extend(chunk)
        return real(encoder, chunk, *a, **kw)

    monkeypatch.setattr(embed_module, "embed_images", counting)
    with pytest.raises(ConfigError, match="--add"):
        build_index(tmp_path / "idx", gallery, model, **_quiet())
    report = build_index(tmp_path / "idx", add=True, **_quiet())   # gallery and model from the index
    assert sorted(embedded) == sorted(["new/extra.png", names[2]])
    assert report.removed == [names[5]] and report.changed == [names[2]]
    assert (report.embedded, report.reused, report.count) == (2, 7, 9)

    after = read_index(tmp_path / "idx")
    expected_names = sorted(set(names) - {names[5]} | {"new/extra.png"})
    assert after.names == expected_names
    for n in expected_names:
        if n not in ("new/extra.png", names[2]):
            np.testing.assert_array_equal(after.vectors[after.names.index(n)], before.vectors[before.names.index(n)])
    fresh = expected_vectors(method, gallery, ["new/extra.png", names[2]])
    np.testing.assert_allclose(after.vectors[[after.names.index("new/extra.png"), after.names.index(names[2])]],
                               fresh, atol=1e-5)
    # only the current generation's files remain
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == sorted(
        ["index.json", *after.meta["files"].values()])


def test_add_needs_an_index_and_the_same_model(tmp_path):
    gallery = tmp_path / "gallery"
    make_gallery(gallery, n=4)
    model, _ = saved_model(tmp_path / "model")
    other, _ = saved_model(tmp_path / "other", seed=1)
    with pytest.raises(ConfigError, match="no index to add to"):
        build_index(tmp_path / "idx", gallery, model, add=True, **_quiet())
    build_index(tmp_path / "idx", gallery, model, **_quiet())
    with pytest.raises(ConfigError, match="differs from the model"):
        build_index(tmp_path / "idx", gallery, other, add=True, **_quiet())
    with pytest.raises(DataError, match="gallery folder not found"):
        build_index(tmp_path / "idx2", tmp_path / "missing", model, **_quiet())
    with pytest.raises(ConfigError, match="unknown index kind"):
        build_index(tmp_path / "idx3", gallery, model, kind="lsh", **_quiet())


def test_search_refuses_a_retrained_model(tmp_path):
    gallery = tmp_path / "gallery"
    make_gallery(gallery, n=4)
    model, _ = saved_model(tmp_path / "model")
    build_index(tmp_path / "idx", gallery, model, **_quiet())
    save_method(tiny_method(seed=5), model)              # the checkpoint is overwritten later
    with pytest.raises(CheckpointError, match="changed since this index was built"):
        Searcher.open(tmp_path / "idx")


# ---- approximate engines ------------------------------------------------------------------------
def test_recall_at_k_matches_a_hand_computation():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((2000, 16)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    engine = faiss_index.build_engine(v, "ivf", {"nlist": 64, "nprobe": 1})
    got = faiss_index.recall_at_k(engine, v, k=10, sample=200, seed=3)
    rows = np.sort(np.random.default_rng(3).choice(2000, 200, replace=False))
    exact = np.argsort(-(v[rows] @ v.T), axis=1)[:, :10]
    _, approx = engine.search(v[rows], 10)
    manual = np.mean([len(set(exact[i]) & set(approx[i])) / 10 for i in range(200)])
    assert got == pytest.approx(manual, abs=1e-9)
    assert 0.0 < got < 1.0                                 # one list of 64 misses neighbours
    engine.nprobe = 64                                      # visiting every list is exact search
    assert faiss_index.recall_at_k(engine, v, k=10, sample=200, seed=3) == 1.0
    engine.nprobe = 1
    nprobe, recall = faiss_index.tune_nprobe(engine, v, target=0.9, sample=200, seed=3)
    assert recall >= 0.9 and engine.nprobe == nprobe and nprobe in (2, 4, 8, 16, 32, 64)
    engine.nprobe = nprobe // 2                             # the ladder stops at the first that reaches it
    assert faiss_index.recall_at_k(engine, v, k=10, sample=200, seed=3) < 0.9
    assert faiss_index.choose_kind(49_999) == "flat" and faiss_index.choose_kind(50_000) == "ivf"


def test_hnsw_ef_search_is_tuned_to_the_recall_target():
    rng = np.random.default_rng(1)
    v = rng.standard_normal((3000, 32)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    # a sparse graph searched with the smallest beam misses neighbours: the ladder must climb
    engine = faiss_index.build_engine(v, "hnsw", {"M": 4, "ef_construction": 16, "ef_search": 1})
    start = faiss_index.recall_at_k(engine, v, k=10, sample=200, seed=2)
    assert start < 0.9
    ef, recall = faiss_index.tune_ef_search(engine, v, target=0.9, sample=200, seed=2)
    assert recall >= 0.9 and engine.hnsw.efSearch == ef and ef in (10, 20, 40, 80, 160, 320, 640, 1024)
    engine.hnsw.efSearch = ef // 2                          # the first rung that reaches it
    assert ef == 10 or faiss_index.recall_at_k(engine, v, k=10, sample=200, seed=2) < 0.9
    engine.hnsw.efSearch = 10
    ef, recall = faiss_index.tune_ef_search(engine, v, target=1.01, sample=200, seed=2, limit=64)
    assert ef == 64                                         # an unreachable target stops at the limit


def test_ivf_nprobe_is_tuned_to_the_recall_target(tmp_path):
    gallery = tmp_path / "gallery"
    make_gallery(gallery, n=12)
    model, _ = saved_model(tmp_path / "model")
    report = build_index(tmp_path / "idx", gallery, model, kind="ivf", params={"nlist": 4}, recall_target=0.99,
                         **_quiet())
    params = read_index(tmp_path / "idx").meta["params"]
    assert params["nlist"] == 4 and 1 <= params["nprobe"] <= 4
    assert report.recall_at_10 >= 0.99 or params["nprobe"] == 4
    engine = Searcher.open(tmp_path / "idx").index.engine
    assert faiss_index.faiss.extract_index_ivf(engine).nprobe == params["nprobe"]


@pytest.mark.parametrize("kind,params", [("ivf", {"nlist": 3, "nprobe": 3}), ("hnsw", {})])
def test_approximate_index_reports_recall_and_searches(tmp_path, kind, params):
    gallery = tmp_path / "gallery"
    names = make_gallery(gallery, n=12)
    model, _ = saved_model(tmp_path / "model")
    logs: list[str] = []
    report = build_index(tmp_path / "idx", gallery, model, kind=kind, params=params,
                         progress=False, num_workers=0, log=logs.append)
    assert report.kind == kind and report.recall_at_10 == 1.0   # exhaustive settings: exact
    assert any("recall@10" in line for line in logs)
    data = read_index(tmp_path / "idx")
    assert data.meta["recall_at_10"] == 1.0 and data.engine_path.is_file()
    if kind == "hnsw":   # the tuned efSearch (the ladder's first rung here) is stored and applied
        assert data.meta["params"]["ef_search"] == 64
        assert Searcher.open(tmp_path / "idx").index.engine.hnsw.efSearch == 64
    flat = build_index(tmp_path / "flat", gallery, model, **_quiet())
    assert flat.recall_at_10 is None
    a, b = Searcher.open(tmp_path / "idx"), Searcher.open(tmp_path / "flat")
    ref = a.reference(names[1])
    assert [h.name for h in a.search(ref, "add a square", 5)] == [h.name for h in b.search(ref, "add a square", 5)]


# ---- the commands ------------------------------------------------------------------------------
def test_cli_search_table_json_and_batch(tmp_path, capsys):
    gallery = tmp_path / "gallery"
    names = make_gallery(gallery, n=8)
    model, _ = saved_model(tmp_path / "model")
    idx = str(tmp_path / "idx")
    assert main(["index", "--gallery", str(gallery), "--model", str(model), "--out", idx, "--quiet",
                 "--num-workers", "0"]) == 0
    assert "8 images (8 embedded, 0 reused" in capsys.readouterr().out

    assert main(["search", "--index", idx, "--image", names[0], "--text", "make it blue", "-k", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in result["results"]] == [1, 2, 3]
    assert names[0] not in [r["name"] for r in result["results"]]

    assert main(["search", "--index", idx, "--image", str(gallery / names[1]), "--text", "make it blue", "-k", "2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["rank", "score", "name"] and len(table) == 3
    assert table[1].split()[0] == "1" and table[1].split()[2] in names

    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"image": names[2], "text": "bigger"}) + "\n"
                       + json.dumps({"image": str(gallery / names[3]), "text": "smaller"}) + "\n")
    assert main(["search", "--index", idx, "--queries", str(queries), "--out", str(tmp_path / "r.jsonl"), "-k", "4"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["bigger", "smaller"] and all(len(r["results"]) == 4 for r in rows)
    searcher = Searcher.open(idx)
    single = searcher.search(searcher.reference(names[2]), "bigger", 4)
    assert [r["name"] for r in rows[0]["results"]] == [h.name for h in single]


@pytest.mark.parametrize("argv,message", [
    (["--image", "missing.png", "--text", "x"], "neither an image file nor a gallery image"),
    (["--image", "IMG"], "give --image and --text"),
    (["--image", "IMG", "--text", "x", "-k", "0"], "-k must be at least 1"),
    (["--queries", "Q"], "--queries needs --out"),
])
def test_cli_search_errors_are_one_line(tmp_path, capsys, argv, message):
    gallery = tmp_path / "gallery"
    names = make_gallery(gallery, n=3)
    model, method = saved_model(tmp_path / "model")
    build_index(tmp_path / "idx", gallery, model, method=method, **_quiet())
    argv = [a.replace("IMG", names[0]) for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(["search", "--index", str(tmp_path / "idx"), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_cli_batch_answers_the_good_lines_and_lists_the_bad_ones(tmp_path, capsys):
    gallery = tmp_path / "gallery"
    make_gallery(gallery, n=3)
    model, method = saved_model(tmp_path / "model")
    build_index(tmp_path / "idx", gallery, model, method=method, **_quiet())
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"image": "img01.png", "text": "x"}\n{"image": "img01.png"}\n{"image": "nope.png", "text": "y"}\n'
                       '{"image": "img02.png", "text": "z", "txet": 1}\n{not json\n{"image": "img02.png", "text": "w"}\n')
    assert main(["search", "--index", str(tmp_path / "idx"), "--queries", str(queries), "--out", str(tmp_path / "o.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "skipped line 2: must be an object with string fields 'image' and 'text'" in out
    assert "skipped line 3: " in out and "neither an image file nor a gallery image" in out
    assert "skipped line 4: unknown key 'txet'" in out and "skipped line 5: malformed JSON" in out
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [(r["line"], r["text"]) for r in rows] == [(1, "x"), (6, "w")]
    # nothing answerable: one line, exit 2, no file
    queries.write_text('{"image": "img01.png"}\n')
    with pytest.raises(SystemExit) as exc:
        main(["search", "--index", str(tmp_path / "idx"), "--queries", str(queries), "--out", str(tmp_path / "o2.jsonl")])
    assert exc.value.code == 2 and "no query could be answered" in capsys.readouterr().err
    assert not (tmp_path / "o2.jsonl").exists()


def test_a_replaced_faiss_file_is_refused_by_its_hash(tmp_path):
    """Another build's engine with the same vector count passes the count check; the sha256
    recorded in index.json catches it."""
    from composed_retrieval.errors import CheckpointError

    gallery = tmp_path / "gallery"
    make_gallery(gallery, n=12)
    for seed in (0, 1):
        model, _ = saved_model(tmp_path / f"model{seed}", seed=seed)
        build_index(tmp_path / f"idx{seed}", gallery, model, kind="hnsw", **_quiet())
    ours, other = read_index(tmp_path / "idx0"), read_index(tmp_path / "idx1")
    assert len(ours.meta["engine_sha256"]) == 64
    Searcher.open(tmp_path / "idx0")                     # intact: opens
    ours.engine_path.write_bytes(other.engine_path.read_bytes())
    with pytest.raises(CheckpointError, match="sha256"):
        Searcher.open(tmp_path / "idx0")
