"""Speed/memory options that must not change results: gradient checkpointing of open_clip
towers, and the throughput record of every training epoch."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from composed_retrieval.config import load_config
from composed_retrieval.train.loop import Trainer

TINY_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_vit_name(tmp_path_factory) -> str:
    """A two-block open_clip ViT registered from a config file (the real open_clip code)."""
    import open_clip

    folder = tmp_path_factory.mktemp("open_clip_cfg")
    (folder / "cir-test-tiny-vit.json").write_text(json.dumps(TINY_VIT))
    open_clip.add_model_config(folder)
    return "cir-test-tiny-vit"


def _grads(encoder, pixels, ids):
    """(loss, gradients, elements of the tensors autograd kept for backward)."""
    encoder.zero_grad(set_to_none=True)
    kept = [0]

    def pack(t):
        kept[0] += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        img, txt = encoder.encode_image(pixels), encoder.encode_text(ids)
        loss = (img.pooled * txt.pooled).sum() + img.tokens.square().mean() + txt.tokens.square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads, kept[0]


def test_grad_checkpointing_keeps_less_and_gives_the_same_gradients(tiny_vit_name):
    from composed_retrieval.encoders.registry import build_encoder

    torch.manual_seed(0)
    plain = build_encoder(f"open_clip:{tiny_vit_name}", random_weights=True).train()
    torch.manual_seed(0)
    ckpt = build_encoder(f"open_clip:{tiny_vit_name}", grad_checkpointing=True, random_weights=True).train()
    assert ckpt.config["kwargs"]["grad_checkpointing"] is True
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = plain.tokenize(["a red cube", "two blue balls", "$ on grass"])

    loss_a, grads_a, kept_a = _grads(plain, pixels, ids)
    loss_b, grads_b, kept_b = _grads(ckpt, pixels, ids)
    # the blocks' activations are not kept (recomputed in backward): far less saved for backward
    assert kept_b < 0.5 * kept_a
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], rtol=1e-5, atol=1e-6, msg=n)


def test_metrics_jsonl_records_epoch_throughput(synth_tiny: Path, tmp_path: Path):
    cfg = load_config(None, [], {
        "method": "combiner", "encoder": "tiny", "dataset": "cirr", "root": str(synth_tiny),
        "encoder_config": {"image_width": 32, "text_width": 64, "embed_dim": 64},
        "batch_size": 8, "seed": 0, "device": "cpu", "max_steps_per_epoch": 3,
        "stages": [{"name": "finetune", "epochs": 2, "lr": 1e-3, "train_image_tower": True}]})
    Trainer(cfg, tmp_path / "run", progress=False).run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:
        speed = r["speed"]
        assert speed["train_seconds"] > 0 and speed["train_seconds"] <= r["seconds"]
        assert speed["steps_per_s"] == pytest.approx(r["steps"] / speed["train_seconds"], rel=0.01)
        assert speed["samples_per_s"] == pytest.approx(8 * speed["steps_per_s"], rel=0.01)
