"""Modules pinned to the public code and the papers: each reference below is written here from
the public code's math (CaLa: github.com/Chiangsonw/CaLa ``src/twin_attention_compositor_clip.py``,
``src/hinge_based_cross_attention_clip.py``, ``src/blip_fine_tune.py`` CLIP branch,
``src/utils.py``; CLIP4Cir: github.com/ABaldrati/CLIP4Cir ``src/combiner.py``, ``src/utils.py``),
run on the same weights and inputs as ours, and must agree to < 1e-5. Each test prints its
max |difference| (``pytest -s`` shows them).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from composed_retrieval.encoders.base import EncoderPair, Features
from composed_retrieval.errors import ConfigError
from composed_retrieval.methods.cala import CaLa
from composed_retrieval.methods.combiner import CombinerNet
from composed_retrieval.methods.dra import DRA
from composed_retrieval.methods.hca import HingeCrossAttention
from composed_retrieval.methods.tac import TwinAttentionCompositor
from fake_encoder import FakeEncoder as BaseFakeEncoder

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "composed_retrieval" / "configs"
TOL = 1e-5


def report(name: str, diff: float) -> None:
    print(f"\n[faithfulness] {name}: max |diff| = {diff:.3g}")


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# ------------------------------------------------------------------ public-code references
def attention(module: nn.MultiheadAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One-head ``nn.MultiheadAttention(640, 1)`` written out: in-projections, softmax of
    ``Q K^T / sqrt(d)``, out-projection (what the public TAC calls four times per stack)."""
    d = q.shape[-1]
    wq, wk, wv = module.in_proj_weight.split(d)
    bq, bk, bv = module.in_proj_bias.split(d)
    scores = (q @ wq.t() + bq) @ (k @ wk.t() + bk).transpose(1, 2) / math.sqrt(d)
    return module.out_proj(scores.softmax(-1) @ (v @ wv.t() + bv))


def public_tac(fc: nn.Linear, ref_attention: nn.MultiheadAttention, tgt_attention: nn.MultiheadAttention,
               cls: torch.Tensor, reference: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CaLa ``TwinAttentionCompositorCLIP.forward`` from the tokens on: ONE cls token prepended to
    both images' tokens (so it is a key of layer 1 too), each stack applies its one attention
    module 4 times with the original tokens as queries, mean of the two CLS outputs."""
    r, t = F.relu(fc(reference)), F.relu(fc(target))
    c = cls.expand(r.shape[0], -1, -1)
    r, t = torch.cat([c, r], 1), torch.cat([c, t], 1)
    out1 = attention(ref_attention, r, t, t)
    for _ in range(3):
        out1 = attention(ref_attention, r, out1, out1)
    out2 = attention(tgt_attention, t, r, r)
    for _ in range(3):
        out2 = attention(tgt_attention, t, out2, out2)
    return (out1[:, 0] + out2[:, 0]) / 2


def public_hca(hca: HingeCrossAttention, reference: torch.Tensor, caption: torch.Tensor,
               target: torch.Tensor) -> torch.Tensor:
    """CaLa ``HingebasedCrossAttentionCLIP.hca_T_share_text`` (eval mode, no dropout): one shared
    ``relu(fc1(.))`` on both images, A = Q_r(R) K_c(C)^T / sqrt(640), B = K_c(C) K_t(T)^T / sqrt(640),
    softmax(A B) @ V(T), row 0; no text mask."""
    width = hca.query_reference.out_features     # 640 in the public code
    r = F.relu(hca.image_projection[0](reference))
    t = F.relu(hca.image_projection[0](target))
    key_text = caption @ hca.key_text.weight.t() + hca.key_text.bias
    a = (r @ hca.query_reference.weight.t() + hca.query_reference.bias) @ key_text.transpose(1, 2) / math.sqrt(width)
    b = key_text @ (t @ hca.key_target.weight.t() + hca.key_target.bias).transpose(1, 2) / math.sqrt(width)
    w = (a @ b).softmax(-1)
    return (w @ (t @ hca.value_target.weight.t() + hca.value_target.bias))[:, 0]


def public_element_wise_sum(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """CLIP4Cir / CaLa ``utils.element_wise_sum``: ``F.normalize(image + text)`` on raw features."""
    return F.normalize(image + text, dim=-1)


def public_combine_features(net: CombinerNet, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """CLIP4Cir ``Combiner.combine_features`` (eval mode): projections, concat [text; image],
    combiner layer, dynamic scalar, residual mix of the RAW inputs, normalised."""
    tp = F.relu(text @ net.text_projection.weight.t() + net.text_projection.bias)
    ip = F.relu(image @ net.image_projection.weight.t() + net.image_projection.bias)
    raw = torch.cat([tp, ip], -1)
    combined = F.relu(raw @ net.combiner_layer.weight.t() + net.combiner_layer.bias)
    lam = net.dynamic_scalar(raw)
    out = combined @ net.output_layer.weight.t() + net.output_layer.bias + lam * text + (1 - lam) * image
    return F.normalize(out, dim=-1)


def public_cala_clip_loss(w_tac: float, w_hca: float, reference_feats: torch.Tensor, text_feats: torch.Tensor,
                          target_feats: torch.Tensor, visual_gap: torch.Tensor, pseudo_target: torch.Tensor
                          ) -> torch.Tensor:
    """CaLa ``blip_fine_tune.py``, CLIP branch, ``cir_frame == "sum"``: matching 100 * sum @
    normalize(T).T, aligning 10 * text @ TAC.T and reasoning 10 * HCA @ R.T on raw features,
    loss = w_hca CE(reasoning) + (1 - w_hca) CE(w_tac aligning + (1 - w_tac) matching)."""
    labels = torch.arange(reference_feats.shape[0])
    matching = 100 * public_element_wise_sum(reference_feats, text_feats) @ F.normalize(target_feats).t()
    aligning = 10 * text_feats @ visual_gap.t()
    reasoning = 10 * pseudo_target @ reference_feats.t()
    contrastive = F.cross_entropy(w_tac * aligning + (1 - w_tac) * matching, labels)
    return w_hca * F.cross_entropy(reasoning, labels) + (1 - w_hca) * contrastive


def public_cosine_lr(group_lrs: list[float], epoch: int, max_epoch: int, init_lr: float, min_lr: float) -> list[float]:
    """CaLa ``utils.cosine_lr_schedule(..., onlyGroup0=True)``: only the first group changes."""
    lr = (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / max_epoch)) + min_lr
    return [lr] + group_lrs[1:]


# ------------------------------------------------------------------ TAC and HCA
B, LTOK, DTOK, WIDTH, LTXT = 3, 81, 2560, 640, 12   # CaLa's CLIP RN50x4 sizes


def clip_like_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, LTOK, DTOK, generator=g), torch.randn(B, LTOK, DTOK, generator=g),
            torch.randn(B, LTXT, WIDTH, generator=g))


def test_tac_matches_cala_public_layout():
    torch.manual_seed(0)
    tac = TwinAttentionCompositor(DTOK, WIDTH, num_layers=4, num_heads=1, shared_cls=True, share_layers=True).eval()
    with torch.no_grad():
        tac.cls.normal_()            # the public code's CLS is a standard normal draw
    ref, tgt, _ = clip_like_inputs()
    with torch.no_grad():
        ours = tac(ref, tgt)
        theirs = public_tac(tac.input_projection[0], tac.reference_attention[0], tac.target_attention[0],
                            tac.cls, ref, tgt)
    diff = max_diff(ours, theirs)
    report("TAC (shared_cls, share_layers) vs CaLa TwinAttentionCompositorCLIP", diff)
    assert ours.shape == (B, WIDTH) and diff < TOL


def test_tac_default_layout_is_documented_as_different():
    """The default (a CLS per stack, none among the keys, a module per layer) is our layout; with
    the public weights copied in it gives a different output, so the paper configs must ask for
    the public one."""
    torch.manual_seed(0)
    public = TwinAttentionCompositor(DTOK, WIDTH, shared_cls=True, share_layers=True).eval()
    ours = TwinAttentionCompositor(DTOK, WIDTH, share_layers=True).eval()
    state = public.state_dict()
    cls = state.pop("cls")
    ours.load_state_dict({**state, "cls_reference": cls, "cls_target": cls})
    ref, tgt, _ = clip_like_inputs()
    with torch.no_grad():
        diff = max_diff(ours(ref, tgt), public(ref, tgt))
    report("TAC default layout vs public layout (expected to differ)", diff)
    assert diff > 1e-4
    for name in ("cala_paper.json", "dra_paper.json"):
        cfg = json.loads((CONFIGS / name).read_text())["method_config"]
        assert cfg["tac_shared_cls"] is True and cfg["tac_share_layers"] is True, name


def test_hca_first_query_without_text_mask_matches_public_code():
    torch.manual_seed(0)
    hca = HingeCrossAttention(DTOK, WIDTH, WIDTH, query="first").eval()
    ref, tgt, caption = clip_like_inputs(1)
    with torch.no_grad():
        ours = hca(ref, caption, tgt)
        theirs = public_hca(hca, ref, caption, tgt)
    diff = max_diff(ours, theirs)
    report("HCA (query=first, no text mask) vs CaLa hca_T_share_text", diff)
    assert ours.shape == (B, WIDTH) and diff < TOL


# ------------------------------------------------------------------ CaLa's loss and schedule
D, D_IMG, D_TXT = 16, 24, 16


def FakeEncoder() -> BaseFakeEncoder:
    """4x4 map of D_IMG-wide tokens from 8x8 pixels, text the plain mean of its embeddings;
    raw features, not unit-norm (image x3, text x0.5), as CaLa's loss sees them."""
    return BaseFakeEncoder(D, D_IMG, D_TXT, masked_mean=False, image_scale=3.0, text_scale=0.5)


def fake_batch(n: int = 6, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(4, 50, (n, 7), generator=g)
    text[::2, 4:] = 0
    return {"reference": torch.randn(n, 3, 8, 8, generator=g), "target": torch.randn(n, 3, 8, 8, generator=g),
            "text": text}


def paper_method_config() -> dict:
    return json.loads((CONFIGS / "cala_paper.json").read_text())["method_config"]


def test_cala_paper_config_loss_matches_public_clip_branch():
    torch.manual_seed(0)
    cala = CaLa(FakeEncoder(), paper_method_config()).eval()
    with torch.no_grad():
        cala.tac.cls.normal_()
    batch = fake_batch()
    enc = cala.encoder
    with torch.no_grad():
        ours = cala(batch)["loss"]
        ref, tgt, txt = enc.encode_image(batch["reference"]), enc.encode_image(batch["target"]), enc.encode_text(batch["text"])
        gap = public_tac(cala.tac.input_projection[0], cala.tac.reference_attention[0], cala.tac.target_attention[0],
                         cala.tac.cls, ref.tokens, tgt.tokens)
        pseudo = public_hca(cala.hca, ref.tokens, txt.tokens, tgt.tokens)
        theirs = public_cala_clip_loss(0.45, 0.1, ref.pooled, txt.pooled, tgt.pooled, gap, pseudo)
    diff = max_diff(ours, theirs)
    report("CaLa loss (cala_paper.json) vs blip_fine_tune.py CLIP branch", diff)
    assert diff < TOL
    # our default (normalised features in the align/reason logits, per-side normalised sum) differs
    default = CaLa(FakeEncoder(), {**paper_method_config(), "align_features": "normalized", "fusion": "normalized"})
    default.load_state_dict(cala.state_dict())
    with torch.no_grad():
        assert abs(float(default.eval()(batch)["loss"]) - float(theirs)) > 1e-3


def test_cala_paper_schedule_matches_public_cosine_on_group0_for_30_epochs():
    from composed_retrieval.encoders.registry import build_encoder
    from composed_retrieval.train.optim import build_optimizer, set_epoch_lr

    cfg = json.loads((CONFIGS / "cala_paper.json").read_text())
    stage = cfg["stages"][0]
    method = CaLa(build_encoder("tiny", embed_dim=32, image_width=16, text_width=32),
                  {k: v for k, v in cfg["method_config"].items() if k != "tac_layers"})
    method.train_text_tower = stage["train_text_tower"]
    opt = build_optimizer(method, method.trainable_parameters(), stage,
                          float(stage.get("weight_decay", cfg["weight_decay"])))
    # the public CLIP groups: [text side, tac, hca] at lr, 2 lr, 2 lr, weight decay 0.05 each
    assert [g["module"] for g in opt.param_groups] == ["base", "tac", "hca"]
    assert all(g["weight_decay"] == 0.05 for g in opt.param_groups)
    assert {id(p) for p in method.encoder.text_parameters()} <= {id(p) for p in opt.param_groups[0]["params"]}
    assert not {id(p) for p in method.encoder.image_parameters()} & {id(p) for g in opt.param_groups for p in g["params"]}
    lr, sched = stage["lr"], stage["schedule"]
    public = [lr, 2 * lr, 2 * lr]
    worst = 0.0
    for epoch in range(stage["epochs"]):          # 0..29; max_epoch 15, so the cosine climbs again after 15
        public = public_cosine_lr(public, epoch, sched["max_epochs"], lr, sched["min_lr"])
        set_epoch_lr(opt, stage, epoch)
        worst = max(worst, max(abs(g["lr"] - p) for g, p in zip(opt.param_groups, public)))
    report("CaLa per-epoch cosine (group 0 only), epochs 0-29", worst)
    assert stage["epochs"] == 30 and worst < 1e-12


# ------------------------------------------------------------------ Combiner and the sum
def test_combiner_matches_clip4cir_combine_features_on_unit_norm_inputs():
    torch.manual_seed(0)
    net = CombinerNet(D).eval()
    g = torch.Generator().manual_seed(3)
    image = F.normalize(torch.randn(8, D, generator=g), dim=-1)
    text = F.normalize(torch.randn(8, D, generator=g), dim=-1)
    with torch.no_grad():
        diff = max_diff(F.normalize(net(image, text), dim=-1), public_combine_features(net, image, text))
    report("Combiner vs CLIP4Cir combine_features (unit-norm inputs)", diff)
    assert diff < TOL


def test_combiner_normalises_raw_inputs_unlike_clip4cir():
    """The documented difference: ours L2-normalises both inputs first, CLIP4Cir mixes the raw
    features; on raw (non-unit) inputs the two disagree and ours equals CLIP4Cir's on the
    normalised inputs."""
    torch.manual_seed(0)
    net = CombinerNet(D).eval()
    g = torch.Generator().manual_seed(4)
    image, text = 4.0 * torch.randn(8, D, generator=g), 0.3 * torch.randn(8, D, generator=g)
    with torch.no_grad():
        ours = F.normalize(net(image, text), dim=-1)
        on_raw = max_diff(ours, public_combine_features(net, image, text))
        on_unit = max_diff(ours, public_combine_features(net, F.normalize(image, dim=-1), F.normalize(text, dim=-1)))
    report("Combiner vs CLIP4Cir on raw inputs (expected to differ)", on_raw)
    assert on_raw > 1e-2 and on_unit < TOL


def test_sum_fusions():
    from composed_retrieval.methods.registry import build_method

    g = torch.Generator().manual_seed(5)
    image = Features(3.0 * torch.randn(8, D, generator=g), None)
    text = Features(0.2 * torch.randn(8, D, generator=g), None)
    raw = build_method("sum", FakeEncoder(), {"fusion": "raw"})
    diff = max_diff(raw.compose(image, text), public_element_wise_sum(image.pooled, text.pooled))
    report("sum fusion=raw vs CLIP4Cir/CaLa element_wise_sum", diff)
    assert diff < TOL
    normalized = build_method("sum", FakeEncoder(), {"fusion": "normalized"}).compose(image, text)
    unit = public_element_wise_sum(F.normalize(image.pooled, dim=-1), F.normalize(text.pooled, dim=-1))
    assert max_diff(normalized, unit) < TOL
    assert max_diff(normalized, raw.compose(image, text)) > 1e-2     # two different methods
    weighted = build_method("sum", FakeEncoder(), {"fusion": "raw", "text_weight": 0.8}).compose(image, text)
    assert max_diff(weighted, F.normalize(0.2 * image.pooled + 0.8 * text.pooled, dim=-1)) < TOL
    combiner = build_method("combiner", FakeEncoder(), {"fusion": "raw"})   # CLIP4Cir's stage 1
    combiner.set_stage("finetune")
    assert max_diff(combiner.compose(image, text), public_element_wise_sum(image.pooled, text.pooled)) < TOL
    for name in ("cala_paper.json", "dra_paper.json"):
        assert json.loads((CONFIGS / name).read_text())["method_config"]["fusion"] == "raw", name
    with pytest.raises(ConfigError, match="fusion"):
        build_method("sum", FakeEncoder(), {"fusion": "mean"})
    with pytest.raises(ConfigError, match="text_weight"):
        build_method("sum", FakeEncoder(), {"text_weight": 1.5})


# ------------------------------------------------------------------ DRA: no target leak
N_IMG, N_TRIPLETS, DP, DT, DW = 512, 512, 32, 16, 12


class TextOnlyEncoder(EncoderPair):
    embed_dim, image_token_dim, text_token_dim, image_size, slot_token_id = DP, DT, DW, 8, 3
    config: dict = {}

    def __init__(self) -> None:
        super().__init__()
        self.words = nn.Embedding(200, DW)
        self.pool = nn.Linear(DW, DP)

    def encode_text(self, token_ids: torch.Tensor, slot_embeddings: torch.Tensor | None = None) -> Features:
        tokens = self.words(token_ids)
        return Features(self.pool(tokens.mean(1)), tokens, token_ids != 0)

    def encode_image(self, pixels: torch.Tensor) -> Features:
        raise AssertionError("the test feeds cached image features")

    def image_parameters(self) -> list[nn.Parameter]:
        return []

    def text_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())


def unlearnable_run(config: dict, steps: int = 200, seed: int = 0) -> tuple[float, float]:
    """Train DRA's main stage on triplets whose target is drawn independently of reference and
    text; returns the (training-query, inference-query) cross-entropies over the triplets in
    64-way batches, eval mode. Image features as an encoder gives them: tokens, and a pooled
    feature that is a function of the tokens (so TAC can carry the target if it is allowed to);
    the pooled features leave 8 dimensions empty, so an uninformative query can score chance."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # hundreds of tiny steps: a second thread only adds waiting (20x on a busy machine)
    try:
        return _unlearnable_run(config, steps, seed)
    finally:
        torch.set_num_threads(threads)


def _unlearnable_run(config: dict, steps: int, seed: int) -> tuple[float, float]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(N_IMG, 9, DT, generator=g)
    proj = torch.randn(DT, DP, generator=g)
    proj[:, DP - 8:] = 0
    pooled = tokens.mean(1) @ proj
    ref = torch.randint(0, N_IMG, (N_TRIPLETS,), generator=g)
    tgt = torch.randint(0, N_IMG, (N_TRIPLETS,), generator=g)
    text = torch.randint(4, 200, (N_TRIPLETS, 6), generator=g)
    torch.manual_seed(seed)
    dra = DRA(TextOnlyEncoder(), {"tac_layers": 1, "tac_heads": 1, "dropout": 0.0, **config})
    dra.set_stage("main")
    opt = torch.optim.Adam(dra.trainable_parameters(), lr=2e-3)

    def batch(idx: torch.Tensor) -> dict:
        return {"reference": Features(pooled[ref[idx]], tokens[ref[idx]]),
                "target": Features(pooled[tgt[idx]], tokens[tgt[idx]]), "text": text[idx]}

    dra.train()
    for _ in range(steps):
        out = dra(batch(torch.randint(0, N_TRIPLETS, (64,), generator=g)))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    dra.eval()
    train_ce, inference_ce = [], []
    with torch.no_grad():
        for start in range(0, N_TRIPLETS, 64):
            b = batch(torch.arange(start, start + 64))
            out = dra(b)
            train_ce.append(float(out["match"]))
            query = dra.compose(b["reference"], dra.text_features(b["text"]))
            inference = F.cross_entropy(100 * query @ F.normalize(b["target"].pooled, dim=-1).t(), torch.arange(64))
            assert abs(float(inference) - float(out["match_inference"])) < 1e-4   # what metrics.jsonl logs
            inference_ce.append(float(inference))
    return sum(train_ce) / len(train_ce), sum(inference_ce) / len(inference_ce)


CHANCE = math.log(64)


@pytest.mark.parametrize("compensation", ["mixed", "predicted"])
def test_dra_no_target_leak(compensation):
    train_ce, inference_ce = unlearnable_run({"compensation": compensation})
    print(f"\n[faithfulness] DRA compensation={compensation}: training-query CE {train_ce:.3f}, "
          f"inference-query CE {inference_ce:.3f}, chance {CHANCE:.3f}")
    assert inference_ce <= CHANCE + 0.2
    assert abs(inference_ce - train_ce) <= 0.5


def test_dra_literal_reading_leaks_the_target():
    """The check above has power: the literal reading (Fc + Fv in every training query, the
    code before this fix) fits the training query far below chance and is worse than chance at
    inference."""
    train_ce, inference_ce = unlearnable_run({"compensation": "target"})
    print(f"\n[faithfulness] DRA compensation=target (leaky): training-query CE {train_ce:.3f}, "
          f"inference-query CE {inference_ce:.3f}, chance {CHANCE:.3f}")
    assert train_ce < CHANCE - 2 and inference_ce > CHANCE + 1


# ------------------------------------------------------------------ training settings
def test_paper_configs_state_every_training_setting():
    """No silent global default in a paper run: gradient clipping, precision, and per stage the
    weight decay and AdamW's epsilon are written in the config (README lists what differs)."""
    from composed_retrieval.config import load_config

    for path in sorted(CONFIGS.glob("*_paper.json")):
        raw = json.loads(path.read_text())
        assert "grad_clip" in raw and raw["grad_clip"] is None, path.name   # the public code does not clip
        assert "amp" in raw, path.name
        for stage in raw["stages"]:
            assert "weight_decay" in stage and "eps" in stage, (path.name, stage["name"])
        load_config(path)   # and it validates


def test_dra_warmup_takes_no_step_on_the_inference_compositor():
    """frozen_dra's Combiner trains exactly as many steps as frozen_combiner's (the tables compare
    them): the warm-up stage trains no module that inference uses."""
    from composed_retrieval.encoders.registry import build_encoder
    from composed_retrieval.methods.registry import build_method

    def combiner_steps(name: str) -> int:
        cfg = json.loads((CONFIGS / name).read_text())
        method = build_method(cfg["method"], build_encoder("tiny", embed_dim=32, image_width=16, text_width=32),
                              cfg.get("method_config") or {})
        combiner = {id(p) for p in method.combiner.parameters()}
        steps = 0
        for stage in cfg["stages"]:
            method.set_stage(stage["name"])
            if combiner & {id(p) for p in method.trainable_parameters()}:
                steps += stage["epochs"] * cfg["max_steps_per_epoch"]
        return steps

    assert combiner_steps("frozen_dra.json") == combiner_steps("frozen_combiner.json") == 120
    for compensation in ("mixed", "predicted"):
        dra = DRA(FakeEncoder(), {"compensation": compensation})
        dra.set_stage("warmup")
        inference = {id(p) for m in (dra.combiner, dra.relation_predictor) if m is not None for p in m.parameters()}
        assert not inference & {id(p) for p in dra.trainable_parameters()}


def test_training_logs_both_match_losses_and_records_the_options(synth_tiny: Path, tmp_path: Path):
    """metrics.jsonl: per epoch the training query's and the inference query's match loss (and
    their gap); results.json: every option the method ran with, defaults included."""
    from composed_retrieval.config import load_config
    from composed_retrieval.train.loop import Trainer

    cfg = load_config(None, [], {
        "method": "dra", "encoder": "tiny", "dataset": "cirr", "root": str(synth_tiny), "device": "cpu",
        "encoder_config": {"image_width": 16, "text_width": 32, "embed_dim": 32},
        "method_config": {"tac_layers": 1}, "batch_size": 16, "max_steps_per_epoch": 2,
        "stages": [{"name": "warmup", "epochs": 1, "lr": 1e-3}, {"name": "main", "epochs": 1, "lr": 1e-3}]})
    result = Trainer(cfg, tmp_path / "run", progress=False).run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["warmup", "main"]
    # what each stage trained (the supervised table counts steps per module from this):
    # the warm-up never trains the Combiner, main trains it and no tower
    assert rows[0]["trains"] == ["align_head", "tac"] and rows[1]["trains"] == ["align_head", "combiner", "tac"]
    for r in rows:
        assert {"match", "match_inference", "match_gap"} <= set(r)
        assert r["match_gap"] == pytest.approx(r["match_inference"] - r["match"], abs=1e-5)
    assert result["method_options"]["compensation"] == "mixed"
    assert result["method_options"]["fusion"] == "normalized"
