"""TAC, HCA, DRA and CaLa on a small fake encoder: masking, determinism, gradients, switches."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from composed_retrieval.encoders.base import Features
from composed_retrieval.errors import ConfigError
from composed_retrieval.methods.cala import CaLa
from composed_retrieval.methods.dra import DRA
from composed_retrieval.methods.hca import HingeCrossAttention
from composed_retrieval.methods.registry import build_method
from composed_retrieval.methods.tac import TwinAttentionCompositor
from fake_encoder import FakeEncoder as BaseFakeEncoder

B, D, D_IMG, D_TXT, L_TXT = 4, 16, 12, 10, 7


def FakeEncoder() -> BaseFakeEncoder:
    """Image: 8x8 pixels -> 4x4 map of D_IMG-wide tokens; text: masked mean of its embeddings."""
    return BaseFakeEncoder(D, D_IMG, D_TXT)


def make_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(4, 50, (B, L_TXT), generator=g)
    for b, length in enumerate([7, 5, 3, 4]):     # trailing padding, different per text
        text[b, length:] = 0
    return {"reference": torch.randn(B, 3, 8, 8, generator=g), "target": torch.randn(B, 3, 8, 8, generator=g),
            "text": text}


def build(cls, **config):
    torch.manual_seed(0)
    return cls(FakeEncoder(), config)


def grads_of(module: nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]


def has_grad(module: nn.Module) -> bool:
    return any(g is not None and bool(g.abs().sum() > 0) for g in grads_of(module))


def all_params_have_grad(module: nn.Module) -> bool:
    return all(g is not None and bool(g.abs().sum() > 0) for g in grads_of(module))


def no_grad(module: nn.Module) -> bool:
    return all(g is None or bool(g.abs().sum() == 0) for g in grads_of(module))


# ---------------------------------------------------------------- TAC
def test_tac_cls_tokens_are_parameters_and_eval_is_deterministic():
    torch.manual_seed(0)
    tac = TwinAttentionCompositor(D_IMG, D, num_layers=3, num_heads=2, dropout=0.1)
    params = dict(tac.named_parameters())
    assert "cls_reference" in params and "cls_target" in params
    ref, tgt = torch.randn(B, 9, D_IMG), torch.randn(B, 6, D_IMG)
    tac.eval()
    first, second = tac(ref, tgt), tac(ref, tgt)
    assert first.shape == (B, D)
    assert torch.equal(first, second)


def test_tac_layers_shared_or_separate():
    shared = TwinAttentionCompositor(D_IMG, D, num_layers=4, share_layers=True)
    separate = TwinAttentionCompositor(D_IMG, D, num_layers=4)
    assert len(shared.reference_attention) == 1 and len(separate.reference_attention) == 4
    attention = sum(p.numel() for p in shared.reference_attention.parameters())
    assert (sum(p.numel() for p in separate.parameters()) - sum(p.numel() for p in shared.parameters())
            == 2 * 3 * attention)


def test_tac_ignores_padded_tokens():
    torch.manual_seed(0)
    tac = TwinAttentionCompositor(D_IMG, D, num_layers=2).eval()
    ref, tgt = torch.randn(B, 9, D_IMG), torch.randn(B, 6, D_IMG)
    ref_mask = torch.ones(B, 9, dtype=torch.bool)
    ref_mask[:, 7:] = False
    changed = ref.clone()
    changed[:, 7:] = 1e4
    out = tac(ref, tgt, ref_mask, None)
    assert torch.allclose(out, tac(changed, tgt, ref_mask, None), atol=1e-6)
    assert not torch.allclose(out, tac(changed, tgt, None, None), atol=1e-3)


def test_tac_rejects_bad_heads():
    with pytest.raises(ConfigError, match="num_heads"):
        TwinAttentionCompositor(D_IMG, D, num_heads=3)


# ---------------------------------------------------------------- HCA
def hca_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ref, tgt = torch.randn(B, 9, D_IMG, generator=g), torch.randn(B, 9, D_IMG, generator=g)
    text = torch.randn(B, L_TXT, D_TXT, generator=g)
    mask = torch.ones(B, L_TXT, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, 5:] = False
    return ref, text, tgt, mask


def test_hca_padding_text_tokens_have_no_influence():
    torch.manual_seed(0)
    hca = HingeCrossAttention(D_IMG, D_TXT, D).eval()
    ref, text, tgt, mask = hca_inputs()
    out, weights = hca(ref, text, tgt, text_mask=mask, return_weights=True)
    pad = ~mask
    # every path through a padded text token carries zero weight
    assert torch.all(weights["A"].squeeze(1)[pad] == 0)
    assert torch.all(weights["B"][pad] == 0)
    assert weights["W"].shape == (B, 1, 9)
    # arbitrary values (even NaN) at padded positions leave the output bitwise unchanged
    for junk in (1e6, float("nan")):
        changed = text.clone()
        changed[pad] = junk
        assert torch.equal(out, hca(ref, changed, tgt, text_mask=mask))
    # without the mask the padded tokens do change it: the test above is not vacuous
    changed = text.clone()
    changed[pad] = 3.0
    assert not torch.allclose(hca(ref, text, tgt), hca(ref, changed, tgt))


def test_hca_masks_padded_target_tokens():
    torch.manual_seed(0)
    hca = HingeCrossAttention(D_IMG, D_TXT, D).eval()
    ref, text, tgt, mask = hca_inputs()
    tgt_mask = torch.ones(B, 9, dtype=torch.bool)
    tgt_mask[:, 6:] = False
    out, weights = hca(ref, text, tgt, text_mask=mask, target_mask=tgt_mask, return_weights=True)
    assert torch.all(weights["W"][..., 6:] == 0)
    assert torch.allclose(weights["W"].sum(-1), torch.ones(B, 1))
    changed = tgt.clone()
    changed[:, 6:] = -50.0
    assert torch.equal(out, hca(ref, text, changed, text_mask=mask, target_mask=tgt_mask))


def test_hca_matches_formula_by_hand():
    torch.manual_seed(0)
    hca = HingeCrossAttention(D_IMG, D_TXT, D, query="first").eval()
    ref, text, tgt, _ = hca_inputs()
    r = hca.image_projection(ref)
    t = hca.image_projection(tgt)
    a = hca.query_reference(r) @ hca.key_text(text).transpose(1, 2) / D ** 0.5
    b = hca.key_text(text) @ hca.key_target(t).transpose(1, 2) / D ** 0.5
    expected = ((a @ b).softmax(-1) @ hca.value_target(t))[:, 0]
    assert torch.allclose(hca(ref, text, tgt), expected, atol=1e-5)


def test_hca_rejects_unknown_query():
    with pytest.raises(ConfigError, match="query"):
        HingeCrossAttention(D_IMG, D_TXT, D, query="cls")


# ---------------------------------------------------------------- DRA
def backward(method, stage: str | None = None, **batch_kw) -> dict:
    if stage:
        method.set_stage(stage)
    method.train()
    method.zero_grad()
    losses = method(make_batch(**batch_kw))
    losses["loss"].backward()
    return losses


def test_dra_main_stage_every_module_gets_gradient():
    dra = build(DRA)
    losses = backward(dra, "main")
    assert {"loss", "match", "implicit"} <= set(losses)
    assert all(not v.requires_grad for k, v in losses.items() if k != "loss")
    assert all_params_have_grad(dra.tac.input_projection)
    assert has_grad(dra.tac.reference_attention) and has_grad(dra.tac.target_attention)
    assert dra.tac.cls_reference.grad is not None and dra.tac.cls_target.grad is not None
    assert all_params_have_grad(dra.align_head)
    assert has_grad(dra.combiner)
    assert no_grad(dra.encoder)   # towers frozen by default


def test_dra_loss_switches_remove_gradients():
    no_implicit = build(DRA, implicit=False)
    losses = backward(no_implicit, "main")
    assert "implicit" not in losses
    # Fv compensates the text with a stop-gradient: without the implicit term nothing trains TAC
    assert no_grad(no_implicit.align_head) and no_grad(no_implicit.tac)
    assert not {id(p) for p in no_implicit.tac.parameters()} & {id(p) for p in no_implicit.trainable_parameters()}
    assert all(p.grad is None for p in no_implicit.align_head.parameters())
    literal = build(DRA, implicit=False, compensation="target")
    backward(literal, "main")
    assert has_grad(literal.tac)   # the leaky literal reading trains TAC through Fc + Fv

    no_explicit = build(DRA, explicit=False)
    backward(no_explicit, "main")
    assert has_grad(no_explicit.tac) and has_grad(no_explicit.align_head)   # implicit only

    neither = build(DRA, explicit=False, implicit=False)
    backward(neither, "main")
    assert no_grad(neither.tac) and no_grad(neither.align_head) and has_grad(neither.combiner)
    tac_ids = {id(p) for p in neither.tac.parameters()}
    assert not tac_ids & {id(p) for p in neither.trainable_parameters()}

    weight_zero = build(DRA, w_implicit=0.0)
    assert "implicit" not in backward(weight_zero, "main")


def test_dra_explicit_switch_adds_fv_to_the_text_only_when_on():
    batch = make_batch()
    for explicit in (True, False):
        dra = build(DRA, explicit=explicit, compensation="target", dropout=0.0)
        dra.set_stage("main")
        dra.eval()
        enc = dra.encoder
        ref, tgt = enc.encode_image(batch["reference"]), enc.encode_image(batch["target"])
        txt = enc.encode_text(batch["text"])
        fc = txt.pooled + dra.visual_relation(ref, tgt) if explicit else txt.pooled
        query = F.normalize(dra.combiner(ref.pooled, fc), dim=-1)
        expected = F.cross_entropy(100 * query @ F.normalize(tgt.pooled, dim=-1).t(), torch.arange(B))
        assert torch.allclose(dra(batch)["match"], expected, atol=1e-5), explicit


def test_dra_implicit_weight_scales_its_term():
    one, two = build(DRA), build(DRA, w_implicit=2.0)
    for m in (one, two):
        m.set_stage("main")
        m.eval()   # no dropout, so both see the same numbers
    l1, l2 = one(make_batch()), two(make_batch())
    assert torch.allclose(l2["loss"] - l1["loss"], l1["implicit"], atol=1e-5)


def test_dra_stages_switch_what_trains():
    dra = build(DRA, train_text_tower=True)
    backward(dra, "warmup")
    assert no_grad(dra.combiner)
    assert has_grad(dra.tac) and has_grad(dra.encoder.text_pool)
    combiner_ids = {id(p) for p in dra.combiner.parameters()}
    assert not combiner_ids & {id(p) for p in dra.trainable_parameters()}
    assert {id(p) for p in dra.encoder.text_parameters()} <= {id(p) for p in dra.trainable_parameters()}
    backward(dra, "main")
    assert has_grad(dra.combiner)
    assert combiner_ids <= {id(p) for p in dra.trainable_parameters()}
    with pytest.raises(ValueError):
        dra.set_stage("stage3")


def test_dra_compose_needs_no_target_and_follows_the_trained_compositor():
    dra = build(DRA).eval()
    enc = dra.encoder
    batch = make_batch()
    ref, txt = enc.encode_image(batch["reference"]), enc.encode_text(batch["text"])
    warm = dra.compose(ref, txt)
    assert warm.shape == (B, D)
    assert torch.allclose(warm.norm(dim=-1), torch.ones(B), atol=1e-5)
    expected_sum = F.normalize(F.normalize(ref.pooled, dim=-1) + F.normalize(txt.pooled, dim=-1), dim=-1)
    assert torch.allclose(warm, expected_sum, atol=1e-6)
    dra.set_stage("main")
    main = dra.compose(ref, txt)
    assert torch.allclose(main, F.normalize(dra.combiner(ref.pooled, txt.pooled), dim=-1))
    # the choice travels with the weights
    fresh = build(DRA).eval()
    fresh.load_state_dict(dra.state_dict())
    assert torch.allclose(fresh.compose(ref, txt), main)


def test_dra_accepts_cached_features_and_rejects_missing_tokens():
    dra = build(DRA)
    dra.set_stage("main")
    batch = make_batch()
    enc = dra.encoder
    with torch.no_grad():
        cached = {"reference": enc.encode_image(batch["reference"]), "target": enc.encode_image(batch["target"]),
                  "text": batch["text"]}
    dra.eval()
    assert torch.allclose(dra(cached)["loss"], dra(batch)["loss"])
    empty = Features(cached["reference"].pooled, cached["reference"].tokens[:, :0])
    with pytest.raises(ConfigError, match="tokens"):
        dra({**cached, "reference": empty})


def test_dra_config_errors():
    with pytest.raises(ConfigError, match="w_implcit"):
        build(DRA, w_implcit=1.0)
    with pytest.raises(ConfigError, match="implicit"):
        build(DRA, implicit="yes")
    with pytest.raises(ConfigError, match="w_match"):
        build(DRA, w_match=0.0)
    build(DRA, _comment="ignored")


# ---------------------------------------------------------------- CaLa
def test_cala_every_module_gets_gradient():
    cala = build(CaLa)
    losses = backward(cala)
    assert {"loss", "contrastive", "reasoning", "match", "align"} <= set(losses)
    assert all(not v.requires_grad for k, v in losses.items() if k != "loss")
    assert has_grad(cala.combiner)
    assert all_params_have_grad(cala.tac.input_projection)
    assert has_grad(cala.tac.reference_attention) and has_grad(cala.tac.target_attention)
    for name in ("image_projection", "query_reference", "key_text", "key_target", "value_target"):
        assert all_params_have_grad(getattr(cala.hca, name)), name


def test_cala_total_loss_formula():
    cala = build(CaLa, w_tac=0.3, w_hca=0.2).eval()
    batch = make_batch()
    losses = cala(batch)
    assert torch.allclose(losses["loss"], 0.2 * losses["reasoning"] + 0.8 * losses["contrastive"])
    enc = cala.encoder
    ref, tgt = enc.encode_image(batch["reference"]), enc.encode_image(batch["target"])
    txt = enc.encode_text(batch["text"])
    match = 100 * cala.compose(ref, txt) @ F.normalize(tgt.pooled, dim=-1).t()
    align = 10 * F.normalize(txt.pooled, dim=-1) @ F.normalize(cala.tac(ref.tokens, tgt.tokens), dim=-1).t()
    labels = torch.arange(B)
    assert torch.allclose(losses["contrastive"], F.cross_entropy(0.3 * align + 0.7 * match, labels), atol=1e-5)
    pseudo = cala.hca(ref.tokens, txt.tokens, tgt.tokens, None, txt.mask, None)
    reason = 10 * F.normalize(pseudo, dim=-1) @ F.normalize(ref.pooled, dim=-1).t()
    assert torch.allclose(losses["reasoning"], F.cross_entropy(reason, labels), atol=1e-5)


def test_cala_switches_remove_gradients():
    no_hca = build(CaLa, hca=False)
    losses = backward(no_hca)
    assert "reasoning" not in losses
    assert all(p.grad is None for p in no_hca.hca.parameters())
    assert has_grad(no_hca.tac)
    assert not {id(p) for p in no_hca.hca.parameters()} & {id(p) for p in no_hca.trainable_parameters()}
    assert torch.allclose(losses["loss"], losses["contrastive"])

    no_tac = build(CaLa, tac=False)
    losses = backward(no_tac)
    assert "align" not in losses
    assert all(p.grad is None for p in no_tac.tac.parameters())
    assert has_grad(no_tac.hca) and has_grad(no_tac.combiner)

    assert "reasoning" not in backward(build(CaLa, w_hca=0.0))


def test_cala_padding_text_does_not_change_the_loss():
    cala = build(CaLa).eval()
    batch = make_batch()
    enc = cala.encoder
    with torch.no_grad():
        txt = enc.encode_text(batch["text"])
        cached = {"reference": enc.encode_image(batch["reference"]), "target": enc.encode_image(batch["target"])}
    changed = Features(txt.pooled, txt.tokens.clone(), txt.mask)
    changed.tokens[~txt.mask] = 123.0
    cala.text_features = lambda ids, slot_embeddings=None: txt          # feed the features directly
    before = cala({**cached, "text": batch["text"]})
    cala.text_features = lambda ids, slot_embeddings=None: changed
    after = cala({**cached, "text": batch["text"]})
    assert torch.equal(before["reasoning"], after["reasoning"])


def test_cala_compose_without_target_and_sum_variant():
    for compositor in ("combiner", "sum"):
        cala = build(CaLa, compositor=compositor).eval()
        batch = make_batch()
        enc = cala.encoder
        q = cala.compose(enc.encode_image(batch["reference"]), enc.encode_text(batch["text"]))
        assert q.shape == (B, D)
        assert torch.allclose(q.norm(dim=-1), torch.ones(B), atol=1e-5)
    assert build(CaLa, compositor="sum").combiner is None


def test_cala_config_errors():
    with pytest.raises(ConfigError, match="w_tac"):
        build(CaLa, w_tac=1.0)
    with pytest.raises(ConfigError, match="w_hca"):
        build(CaLa, w_hca=-0.1)
    with pytest.raises(ConfigError, match="compositor"):
        build(CaLa, compositor="qformer")
    with pytest.raises(ConfigError, match="tac_layer"):
        build(CaLa, tac_layer=2)


def test_registry_builds_both():
    for name, cls in (("dra", DRA), ("cala", CaLa)):
        assert isinstance(build_method(name, FakeEncoder(), {}), cls)


def test_a_few_steps_reduce_the_loss():
    """Sanity: both methods can fit a fixed batch (the losses are wired to the parameters)."""
    for cls, stage in ((DRA, "main"), (CaLa, None)):
        method = build(cls, dropout=0.0)
        if stage:
            method.set_stage(stage)
        opt = torch.optim.Adam(method.trainable_parameters(), lr=1e-2)
        batch = make_batch()
        method.train()
        first = method(batch)["loss"].item()
        for _ in range(20):
            opt.zero_grad()
            loss = method(batch)["loss"]
            loss.backward()
            opt.step()
        assert loss.item() < 0.7 * first, cls.__name__


def test_both_run_on_the_tiny_encoder():
    from composed_retrieval.encoders.tiny import TinyEncoder

    torch.manual_seed(0)
    encoder = TinyEncoder(embed_dim=32, image_size=16, image_width=16, text_width=16, text_layers=1,
                          text_heads=2, n_buckets=64, context_length=12)
    batch = {"reference": torch.randn(3, 3, 16, 16), "target": torch.randn(3, 3, 16, 16),
             "text": encoder.tokenize(["add a red circle", "make it big", "remove the square on the left"])}
    for name in ("dra", "cala"):
        method = build_method(name, encoder, {})
        method.set_stage(method.stages[-1])
        losses = method(batch)
        losses["loss"].backward()
        assert torch.isfinite(losses["loss"])
        with torch.no_grad():
            q = method.eval().compose(encoder.encode_image(batch["reference"]), encoder.encode_text(batch["text"]))
        assert q.shape == (3, 32)


def test_cala_paper_optimizer_twice_the_lr_and_cosine_on_the_text_tower_only():
    """CaLa's public recipe as config: TAC and HCA at 2x lr, the base group (text tower) on a
    per-epoch cosine (cosine_lr_schedule, onlyGroup0), the module groups constant."""
    import importlib.resources as res
    import json
    import math

    from composed_retrieval.encoders.registry import build_encoder

    from composed_retrieval.config import load_config
    from composed_retrieval.train.optim import build_optimizer, set_epoch_lr

    cfg = json.loads(res.files("composed_retrieval").joinpath("configs", "cala_paper.json").read_text())
    stage = cfg["stages"][0]
    method = build_method("cala", build_encoder("tiny", embed_dim=32, image_width=16, text_width=32),
                          {k: v for k, v in cfg["method_config"].items() if k not in ("tac_layers",)})
    method.train_text_tower = True
    opt = build_optimizer(method, method.trainable_parameters(), stage, 0.05)
    by_module = {g["module"]: g for g in opt.param_groups}
    assert set(by_module) == {"base", "tac", "hca"}
    assert by_module["tac"]["lr"] == by_module["hca"]["lr"] == 2 * stage["lr"] == 2 * by_module["base"]["lr"]
    text_ids = {id(p) for p in method.encoder.text_parameters()}
    assert text_ids <= {id(p) for p in by_module["base"]["params"]}
    for epoch in (0, 5, 15):
        lr = set_epoch_lr(opt, stage, epoch)
        assert lr == pytest.approx(stage["lr"] * 0.5 * (1 + math.cos(math.pi * epoch / 15)))
        assert by_module["tac"]["lr"] == by_module["hca"]["lr"] == 2 * stage["lr"]
    assert set_epoch_lr(opt, stage, 15) == pytest.approx(0.0)
    with pytest.raises(ConfigError, match="lr_mult names 'tca'"):
        build_optimizer(method, method.trainable_parameters(), {**stage, "lr_mult": {"tca": 2.0}}, 0.0)
    with pytest.raises(ConfigError, match=r"stages\[0\]\.schedule"):
        load_config(None, [], {"method": "cala", "stages": [{"name": "main", "schedule": {"name": "step"}}]})
