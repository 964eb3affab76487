"""CLIP-style contrastive pre-training of the tiny towers on image-caption pairs.

Zero-shot methods need a vision-language pair that already aligns images and captions (CLIP's
role); for the synthetic benchmark the tiny towers are trained here, from the benchmark's
``pairs/train.tsv`` only (no triplets). Loss: ``losses.symmetric_contrastive`` with a learnable
temperature (CLIP: logit scale initialised to 1/0.07, clamped at 100).

Output folder: ``encoder.safetensors`` (the encoder's state dict, loadable with
``build_encoder("tiny", checkpoint=...)`` / config ``encoder_checkpoint``) and
``pretrain.json`` (settings, per-epoch loss, caption->image R@1 on the validation pairs).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..fileio import atomic_write, atomic_write_json
from ..losses import symmetric_contrastive

WEIGHTS = "encoder.safetensors"


@torch.no_grad()
def caption_to_image_recall(encoder: Any, pixels: torch.Tensor, captions: list[str], batch: int = 512) -> float:
    """R@1 (%) of each caption retrieving its own image among the given ones (a sanity check;
    repeated captions count as a hit only for their own image)."""
    encoder.eval()
    img = torch.cat([F.normalize(encoder.encode_image(pixels[s:s + batch]).pooled.float(), dim=-1)
                     for s in range(0, len(pixels), batch)])
    txt = torch.cat([F.normalize(encoder.encode_texts(captions[s:s + batch]).pooled.float(), dim=-1)
                     for s in range(0, len(captions), batch)])
    hits = (txt @ img.t()).argmax(dim=1) == torch.arange(len(captions))
    return round(100.0 * hits.float().mean().item(), 2)


def _pixel_source(pairs: Any, encoder: Any) -> tuple[Any, list[str]]:
    """Decoded once, kept as uint8; batches are normalised on the fly (4x less memory)."""
    from ..data.pixels import PixelSource

    names = [str(p) for p in pairs.paths]
    return PixelSource(names, Path, encoder.image_transform("targetpad"), progress=False), names


def pretrain_tiny(pairs_file: str | Path, out: str | Path, epochs: int = 4, batch_size: int = 128,
                  lr: float = 2e-3, seed: int = 0, val_pairs: str | Path | None = None,
                  image_root: str | Path | None = None, max_pairs: int | None = None,
                  encoder_config: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    from safetensors.torch import save_file

    from ..data.pairs import read_pairs
    from ..encoders.registry import build_encoder

    if epochs < 1 or batch_size < 2:
        raise ConfigError("pretraining needs epochs >= 1 and batch size >= 2")
    torch.manual_seed(seed)
    encoder = build_encoder("tiny", **(encoder_config or {}))
    pairs = read_pairs(pairs_file, image_root=image_root, limit=max_pairs)
    t0 = time.time()
    src, names = _pixel_source(pairs, encoder)
    tokens = encoder.tokenize(pairs.captions)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = list(encoder.parameters()) + [log_scale]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    steps_per_epoch = max(1, len(pairs) // batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.1)
    history = []
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        encoder.train()
        order = torch.randperm(len(pairs), generator=gen)
        running = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * batch_size:(step + 1) * batch_size]
            x = torch.stack([src(names[i]) for i in idx.tolist()])
            img = F.normalize(encoder.encode_image(x).pooled, dim=-1)
            txt = F.normalize(encoder.encode_text(tokens[idx]).pooled, dim=-1)
            # the learnable scale enters as a tensor, so it gets a gradient
            loss = symmetric_contrastive(img, txt, log_scale.exp().clamp(max=100.0))  # type: ignore[arg-type]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += float(loss.detach())
        history.append({"epoch": epoch + 1, "loss": round(running / steps_per_epoch, 4),
                        "logit_scale": round(float(log_scale.detach().exp()), 2)})
        if progress:
            print(history[-1], flush=True)
    result: dict[str, Any] = {"pairs": str(pairs.source), "n_pairs": len(pairs), "epochs": epochs,
                              "batch_size": batch_size, "lr": lr, "seed": seed, "history": history,
                              "encoder": encoder.config}
    if val_pairs is not None:
        vp = read_pairs(val_pairs, image_root=image_root, limit=1000)
        vsrc, vnames = _pixel_source(vp, encoder)
        result["val_caption_to_image_r1"] = caption_to_image_recall(
            encoder, torch.stack([vsrc(n) for n in vnames]), vp.captions)
    result["seconds"] = round(time.time() - t0, 1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    atomic_write(out / WEIGHTS, lambda p: save_file(state, str(p)))
    result["checkpoint"] = str((out / WEIGHTS).resolve())
    atomic_write_json(out / "pretrain.json", result)
    return result
