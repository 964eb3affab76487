"""The README's "Use a pretrained model" section, run as written: its `cir` commands and its
Python example, on random-weight models saved in the real layouts and the synthetic benchmark.

Two substitutions keep it quick on a CPU: the benchmark is the session's tiny one (the README
generates size small), and ``open_clip:ViT-B-32`` becomes a small ViT registered with open_clip's
own ``add_model_config`` (the same code path: a model name plus a weights file).
"""
from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_run import run_main
from pretrained_fixtures import OPEN_CLIP_CFG, write_hf_clip, write_open_clip_file

README = Path(__file__).resolve().parents[1] / "README.md"


def _section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("## Use a pretrained model")
    return text[start:text.index("\n## ", start + 10)]


def _blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", _section(), flags=re.S)


@pytest.fixture()
def workdir(tmp_path, synth_tiny, monkeypatch) -> Path:
    (tmp_path / "data").mkdir()
    os.symlink(synth_tiny, tmp_path / "data" / "synth")
    write_hf_clip(tmp_path / "models" / "clip-vit-base-patch32")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_section_comes_first_in_the_usage_docs():
    text = README.read_text(encoding="utf-8")
    assert text.index("## Use a pretrained model") < text.index("## The command line")


def test_readme_commands_run(workdir, capsys):
    import open_clip

    configs = workdir / "open_clip_configs"
    configs.mkdir()
    (configs / "cir-test-vit.json").write_text(json.dumps(OPEN_CLIP_CFG))
    open_clip.add_model_config(configs / "cir-test-vit.json")
    write_open_clip_file(workdir / "models" / "ViT-B-32.safetensors", model_name="cir-test-vit")
    g = torch.Generator().manual_seed(0)
    torch.save({"Phi": {"layers.0.weight": torch.randn(64, 16, generator=g), "layers.0.bias": torch.zeros(64),
                        "layers.3.weight": torch.randn(64, 64, generator=g) * 0.1, "layers.3.bias": torch.zeros(64),
                        "layers.6.weight": torch.randn(32, 64, generator=g) * 0.1, "layers.6.bias": torch.zeros(32)}},
               workdir / "SEARLE_ViT-B32.pt")
    lines = [l for block in _blocks("bash") for l in block.splitlines() if l.startswith("cir ")]
    assert sum(l.startswith("cir eval ") for l in lines) == 2 and any(l.startswith("cir index ") for l in lines)
    outputs = {}
    for line in lines:
        if line.startswith("cir synth "):
            continue                                     # the session's tiny benchmark is in place
        argv = shlex.split(line.replace("open_clip:ViT-B-32", "open_clip:cir-test-vit"))[1:]
        if argv[0] in ("eval", "index", "zeroshot-eval"):
            argv.append("--quiet")
        code, out, err = run_main(argv, capsys)
        assert code == 0, (line, err)
        outputs.setdefault(argv[0], []).append(out)
    for out in outputs["eval"]:                          # CIRR-protocol metrics, model and gallery named
        res = json.loads(out)
        assert {"recall@1", "recall@5", "recall@50", "recall_subset@1", "avg"} <= set(res)
        assert res["gallery"]["protocol"] == "cirr" and res["gallery"]["reference_removed"] is True
        assert res["model"]["method"] == "sum"
        kinds = {k.split("/")[1] for k in res if k.startswith("edit_type/")}   # synthetic data: per-type R@1
        assert len(kinds) >= 3 and kinds <= {"add", "remove", "color", "size", "shape", "two-step"}
    hf, oc = (json.loads(o)["model"]["encoder"]["name"] for o in outputs["eval"])
    assert hf.startswith("hf_clip:") and oc == "open_clip:cir-test-vit"
    assert json.loads((workdir / "runs" / "clip-index" / "index.json").read_text())["model_spec"]["method"] == "sum"
    assert "rank" in outputs["search"][0] and len(outputs["search"][0].strip().splitlines()) == 6   # header + 5
    zs = json.loads(outputs["zeroshot-eval"][0])
    assert zs["model"]["phi"]["layout"] == "searle" and "recall@1" in zs


def test_readme_python_example_runs(workdir, capsys):
    (code,) = _blocks("python")
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 + 5 and printed[0].split()[0].replace(".", "", 1).isdigit()

    from composed_retrieval import Index, evaluate, load_model
    index = Index.open("runs/clip-index-py")
    ref = "data/synth/dev/dev-0-0-img0.png"
    by_path = index.search(ref, "make it blue", k=4)
    from PIL import Image
    pil = Image.open(ref).convert("RGB")
    by_pil = index.search(pil, "make it blue", k=5)
    by_array = index.search(np.asarray(pil), "make it blue", k=5)
    by_float = index.search(np.asarray(pil).astype(np.float32) / 255, "make it blue", k=5)
    assert [h.name for h in by_pil] == [h.name for h in by_array] == [h.name for h in by_float]
    assert "dev-0-0-img0.png" not in [h.name for h in by_path]          # the reference is left out
    assert [h.name for h in by_pil if h.name != "dev-0-0-img0.png"][:4] == [h.name for h in by_path]
    # the API's evaluate is the command's: same numbers as `cir eval`
    model = load_model("hf_clip:models/clip-vit-base-patch32", method="image_only")
    api = evaluate(model, "cirr", "data/synth")
    code, out, err = run_main(["eval", "--encoder", "hf_clip:models/clip-vit-base-patch32", "--method",
                               "image_only", "--root", "data/synth", "--device", "cpu", "--quiet"], capsys)
    assert code == 0, err
    assert json.loads(out) == json.loads(json.dumps(api))
    from composed_retrieval.errors import DataError
    with pytest.raises(DataError, match="HxW"):
        index.search(np.zeros((4, 4, 2), np.uint8), "x")
