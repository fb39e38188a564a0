"""Expert routing: expert-choice capacity and gate invariants, MoMa's modality isolation,
top-2 routing and its balance loss; every router against a plain per-expert loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmtok.trainer.config import ModelConfig
from mmtok.trainer.context import Context
from mmtok.trainer.model import Decoder, loss_terms
from mmtok.trainer.moe import ExpertChoice, MoMaFFN, TopTwo, capacity, selection_scores, token_rows


def ffn(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ experts.w1[e]) * (x @ experts.w3[e])) @ experts.w2[e]


def init(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return module


@pytest.mark.parametrize("n, experts, factor", [(37, 4, 1.0), (8, 8, 1.0), (50, 3, 2.0), (3, 4, 1.0), (64, 4, 0.5)])
def test_expert_choice_capacity_gates_and_output(n, experts, factor):
    layer = init(ExpertChoice(8, 16, experts, factor))
    x = torch.randn(n, 8)
    gate, idx, chosen = layer.route(x)
    gate, idx = gate.T[: int(chosen)], idx.T[: int(chosen)]  # each expert's first k are its choice
    k = math.ceil(n * factor / experts)
    assert idx.shape == (min(n, max(1, k)), experts) == (capacity(n, experts, factor), experts)
    for e in range(experts):
        assert len(set(idx[:, e].tolist())) == idx.shape[0]  # an expert never takes a token twice
        all_gates = torch.sigmoid(layer.router(x))[:, e]
        torch.testing.assert_close(gate[:, e], all_gates[idx[:, e]])  # sigmoid gates of the chosen
        score = selection_scores(layer.router(x))[:, e]  # the top-k tokens by centred score
        assert score[idx[:, e]].min() >= score.topk(idx.shape[0]).values.min() - 1e-6
        assert ((gate > 0) & (gate < 1)).all()
    out, stats = layer(x)
    want = torch.zeros_like(x)
    for e in range(experts):
        for j, t in enumerate(idx[:, e].tolist()):
            want[t] += gate[j, e] * ffn(layer.experts, e, x[t])
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert stats["load"].tolist() == [idx.shape[0]] * experts
    assert int(stats["unrouted"]) == n - len(set(idx.reshape(-1).tolist()))


def test_moma_routes_text_only_to_text_experts_and_image_only_to_image_experts():
    layer = init(MoMaFFN(8, 16, 3, 2))
    n = 40
    is_image = torch.rand(n) < 0.4
    real = torch.ones(n, dtype=torch.bool)
    real[-5:] = False  # padding
    x = torch.randn(n, 8)
    x[:, 0] = torch.where(is_image, -100.0, 100.0)  # marks each row's modality
    x[~real, 0] = 0.0
    seen = {}
    for name in ("text", "image"):
        getattr(layer, name).experts.register_forward_hook(
            lambda m, inp, out, name=name: seen.__setitem__(name, inp[0].reshape(-1, 8)))
    out = layer(x.unsqueeze(0), Context(None, None, None, is_image.unsqueeze(0), real.unsqueeze(0)))
    stats = layer.routing_stats  # an FFN layer returns a tensor and keeps its statistics
    used = {name: rows[rows[:, 0] != 0] for name, rows in seen.items()}  # unused expert rows are zeros
    assert (used["text"][:, 0] == 100.0).all() and (used["image"][:, 0] == -100.0).all()
    n_text, n_image = int((~is_image & real).sum()), int((is_image & real).sum())
    assert len(used["text"]) == 3 * capacity(n_text, 3, 1.0)  # capacity = modality tokens / experts
    assert len(used["image"]) == 2 * capacity(n_image, 2, 1.0)
    assert (out[0, ~real] == 0).all()  # padding reaches no expert
    assert stats["text"]["tokens"] == n_text and stats["image"]["tokens"] == n_image


@pytest.mark.parametrize("layout", ["1t1i", "2t3i"])
def test_moma_decoder_gradients_stay_inside_the_modality_group(layout):
    torch.manual_seed(0)
    cfg = ModelConfig(model="moma", experts=layout, vocab_size=256, image_range=(192, 256), n_layers=2, d_model=32,
                      n_heads=4, ffn_hidden=64, max_seq_len=32)
    m = Decoder(cfg)
    for lo, hi, touched, untouched in ((192, 256, "image", "text"), (16, 192, "text", "image")):
        m.zero_grad()
        ids = torch.randint(lo, hi, (2, 32))  # a batch of one modality only
        logits, stats = m(ids, torch.arange(32).int().repeat(2, 1), torch.ones(2, 32, dtype=torch.int32))
        loss_terms(cfg, logits, torch.roll(ids, -1, 1), stats)["loss"].backward()
        for block in m.layers:
            # the auxiliary router trains only on its own BCE (joint mode or the aux-routers stage)
            assert all(p.grad.abs().sum() > 0 for n, p in getattr(block.ffn, touched).named_parameters() if not n.startswith("aux."))
            assert all(p.grad is None or p.grad.abs().sum() == 0 for p in getattr(block.ffn, untouched).parameters())


def test_top2_matches_a_loop_and_reports_load():
    layer = init(TopTwo(8, 16, 4))
    x = torch.randn(30, 8)
    out, stats = layer(x)
    probs = layer.router(x).softmax(-1)
    w, e = probs.topk(2, -1)
    w = w / w.sum(-1, keepdim=True)
    want = torch.stack([sum(w[t, j] * ffn(layer.experts, int(e[t, j]), x[t]) for j in range(2)) for t in range(30)])
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert stats["load"].tolist() == torch.bincount(e.reshape(-1), minlength=4).float().tolist()
    share = stats["load"] / 60
    torch.testing.assert_close(stats["balance"], 4 * (share * probs.mean(0)).sum())
    torch.testing.assert_close(stats["router_z"], torch.logsumexp(layer.router(x), -1).pow(2).mean())


def test_top2_balance_loss_penalises_skew_and_training_on_it_spreads_the_load():
    torch.manual_seed(0)
    layer = TopTwo(8, 16, 4)
    x = torch.randn(256, 8)
    x[:, 0] = 1.0
    with torch.no_grad():
        layer.router.weight.mul_(0.1)
        layer.router.weight[0, 0] = 4.0  # every token prefers expert 0
    skewed = layer(x)[1]
    assert skewed["balance"] > 1.5  # 1.0 is perfect balance
    opt = torch.optim.SGD(layer.router.parameters(), lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        layer(x)[1]["balance"].backward()
        opt.step()
    balanced = layer(x)[1]
    assert balanced["balance"] < skewed["balance"] - 0.3
    assert balanced["load"].max() / balanced["load"].sum() < skewed["load"].max() / skewed["load"].sum()


def test_top2_decoder_adds_the_auxiliary_losses():
    torch.manual_seed(0)
    cfg = ModelConfig(model="moe", experts="4", routing="top2", vocab_size=256, image_range=(192, 256), n_layers=2,
                      d_model=32, n_heads=4, ffn_hidden=32, max_seq_len=16)
    m = Decoder(cfg)
    ids = torch.randint(0, 256, (2, 16))
    logits, stats = m(ids, torch.arange(16).int().repeat(2, 1), torch.ones(2, 16, dtype=torch.int32))
    t = loss_terms(cfg, logits, torch.roll(ids, -1, 1), stats)
    aux = sum(0.01 * s["all"]["balance"] + 1e-3 * s["all"]["router_z"] for s in stats)
    torch.testing.assert_close(t["aux_loss"], aux.detach())
    torch.testing.assert_close(t["loss"], t["ce"] + t["z_loss"] + aux)


def test_token_rows_match_nonzero_and_follow_in_place_changes():
    torch.manual_seed(0)
    real = torch.rand(3, 20) < 0.8
    rows = token_rows(real)
    assert torch.equal(rows, real.reshape(-1).nonzero().squeeze(1))
    assert token_rows(real) is rows  # the next layer reuses the answer
    real[0, :] = ~real[0, :]  # an in-place change makes it stale
    assert torch.equal(token_rows(real), real.reshape(-1).nonzero().squeeze(1))


def test_a_frozen_auxiliary_router_is_skipped_only_in_training():
    layer = init(ExpertChoice(8, 16, 2))
    x = torch.randn(12, 8)
    layer.aux.requires_grad_(False)
    assert "aux_bce" not in layer(x)[1]  # frozen and training: nothing would use its output
    layer.eval()
    assert "aux_bce" in layer(x)[1]  # eval reports the auxiliary routers' agreement
    layer.train()
    layer.aux.requires_grad_(True)
    out, stats = layer(x)
    assert "aux_bce" in stats and stats["aux_bce"].requires_grad
