"""Gradient reachability: for every shipped config and each of its stages, which loss terms send
non-zero gradient to the modules that inference uses.

A loss term that reaches no trainable inference module cannot change retrieval: with frozen
towers, for instance, CaLa's HCA term trains only HCA, which inference never runs. Every
method's terms go through ``losses.batch_contrastive`` / ``losses.diagonal_cross_entropy``;
the script records each call's (undetached) output, names it by the logged term it equals, and
differentiates it with respect to each trainable parameter of the stage. Inference modules are
found the same way: whatever gets gradient from ``compose`` (the query) or
``gallery_embedding`` (the gallery side).

The towers are the tiny encoder at a small width (the ``*_paper.json`` configs name
open_clip:RN50x4, whose weights are not shipped; which modules train depends on the stage
flags and the method options, not on the backbone). Zero-shot (pairs) configs are skipped, and
so are the CaLa-BLIP-2 configs (the tiny towers have no multimodal path).

    python benchmarks/grad_report.py --out docs/grad_report.md
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from composed_retrieval import losses  # noqa: E402

CONFIGS = ROOT / "src" / "composed_retrieval" / "configs"
CAPTIONS = ["add a red circle", "make it big", "remove the square on the left", "turn the blue one green"]
EPS = 1e-12


def reached(term: torch.Tensor, params: dict[str, list[torch.nn.Parameter]]) -> list[str]:
    flat = [(group, p) for group, ps in params.items() for p in ps]
    if not term.requires_grad or not flat:
        return []
    grads = torch.autograd.grad(term, [p for _, p in flat], retain_graph=True, allow_unused=True)
    hit = {group for (group, _), g in zip(flat, grads) if g is not None and float(g.abs().sum()) > EPS}
    return sorted(hit)


class Recorder:
    """Wraps the two shared loss functions in every method module that imported them."""

    def __init__(self) -> None:
        self.terms: list[torch.Tensor] = []
        self.patched: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> "Recorder":
        import importlib
        for mod_name in ("composed_retrieval.methods.baselines", "composed_retrieval.methods.combiner",
                         "composed_retrieval.methods.dra", "composed_retrieval.methods.cala",
                         "composed_retrieval.spn.bank"):
            mod = importlib.import_module(mod_name)
            for fn in ("batch_contrastive", "diagonal_cross_entropy"):
                original = getattr(mod, fn, None)
                if original is None:
                    continue

                def wrapped(*args: Any, _original: Any = original, **kwargs: Any) -> torch.Tensor:
                    out = _original(*args, **kwargs)
                    self.terms.append(out)
                    return out
                setattr(mod, fn, wrapped)
                self.patched.append((mod, fn, original))
        return self

    def __exit__(self, *exc: Any) -> None:
        for mod, fn, original in self.patched:
            setattr(mod, fn, original)


def stage_report(cfg: dict[str, Any], stage: dict[str, Any]) -> list[dict[str, Any]]:
    from composed_retrieval.encoders.registry import build_encoder
    from composed_retrieval.methods.registry import build_method

    torch.manual_seed(0)
    encoder = build_encoder("tiny", embed_dim=32, image_width=16, text_width=32)
    method = build_method(cfg["method"], encoder, cfg.get("method_config") or {})
    method.set_stage(stage["name"])
    method.train_image_tower = bool(stage.get("train_image_tower", False))
    method.train_text_tower = bool(stage.get("train_text_tower", False))
    for p in method.parameters():
        p.requires_grad_(False)
    trainable = method.trainable_parameters()
    for p in trainable:
        p.requires_grad_(True)
    group_of = method.module_groups()
    groups: dict[str, list[torch.nn.Parameter]] = {}
    for p in trainable:
        groups.setdefault(group_of[id(p)], []).append(p)

    g = torch.Generator().manual_seed(0)
    size = encoder.image_size
    batch = {"reference": torch.randn(4, 3, size, size, generator=g),
             "target": torch.randn(4, 3, size, size, generator=g), "text": encoder.tokenize(CAPTIONS)}
    method.train()   # training mode (trainable towers run with gradient) without dropout, so a
    for m in method.modules():   # zero gradient is structural, not a dropped unit
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(m, torch.nn.MultiheadAttention):
            m.dropout = 0.0
    # the inference modules: what gets gradient from the query and from the gallery side
    everything = {n: [p] for n, p in method.named_parameters()}
    for p in method.parameters():
        p.requires_grad_(True)
    with torch.enable_grad():
        ref = method.encoder.encode_image(batch["reference"])
        txt = method.encoder.encode_text(batch["text"])
        side = method.compose(ref, txt).sum() + method.gallery_embedding(method.encoder.encode_image(batch["target"])).sum()
        used = set(reached(side, everything))
    inference_groups = {group_of[id(everything[n][0])] for n in used}
    for p in method.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)

    with Recorder() as rec:
        out = method(batch)
    rows = []
    named = {k: v for k, v in out.items() if k != "loss" and torch.is_tensor(v) and v.dim() == 0}
    for term in rec.terms:
        label = next((k for k, v in named.items() if abs(float(v) - float(term.detach())) < 1e-7), "(unnamed)")
        hit = reached(term, groups)
        rows.append({"term": label, "inference": [h for h in hit if h in inference_groups],
                     "training_only": [h for h in hit if h not in inference_groups],
                     "requires_grad": bool(term.requires_grad)})
    total = reached(out["loss"], groups)
    rows.append({"term": "loss (total)", "inference": [h for h in total if h in inference_groups],
                 "training_only": [h for h in total if h not in inference_groups], "requires_grad": True})
    return [{"trains": sorted(groups), "inference_modules": sorted(inference_groups), **r} for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "grad_report.md"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    lines = ["# Gradient reachability (`python benchmarks/grad_report.py`)", "",
             "For each shipped config and stage: the modules that train, the modules inference uses",
             "(query and gallery side), and for each loss term the trainable modules it sends non-zero",
             "gradient to. A term whose *reaches (inference)* column is empty cannot change retrieval",
             "in that stage. Terms computed without gradient (logged only) are marked *logged only*.",
             "Tiny towers stand in for RN50x4 in the `*_paper.json` rows.", ""]
    for path in sorted(CONFIGS.glob("*.json")):
        cfg = json.loads(path.read_text())
        if cfg.get("method") in ("textual_inversion", "cala_blip2"):
            continue   # pairs, not triplets; CaLa-BLIP-2 needs a BLIP-2 encoder (its multimodal path)
        from composed_retrieval.config import DEFAULTS, merge
        cfg = merge(DEFAULTS, cfg)
        lines += [f"## {path.name} (`{cfg['method']}`)", "",
                  "| stage | trains | inference uses | loss term | reaches (inference) | reaches (training only) |",
                  "|---|---|---|---|---|---|"]
        for stage in cfg["stages"]:
            for r in stage_report(cfg, stage):
                inf = ", ".join(r["inference"]) or ("*logged only*" if not r["requires_grad"] else "**none**")
                lines.append(f"| {stage['name']} | {', '.join(r['trains'])} | {', '.join(r['inference_modules'])} | "
                             f"{r['term']} | {inf} | {', '.join(r['training_only']) or '-'} |")
        lines.append("")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
