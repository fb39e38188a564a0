"""The trainer's speed paths against the plain ones (issue 18): blocks that compile with no
graph break, experts through one grouped GEMM, the head fused with a chunked cross-entropy,
unsharded weights kept on one process, and the FLOP count behind MFU."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mmtok.trainer import moe
from mmtok.trainer.config import PRESETS, ModelConfig
from mmtok.trainer.kernels import linear_cross_entropy
from mmtok.trainer.model import Decoder, flops_per_token, loss_terms


def _cfg(model: str, experts: str = "", **kw) -> ModelConfig:
    return ModelConfig(model=model, experts=experts, vocab_size=96, image_range=(64, 96), n_layers=2, d_model=32,
                       n_heads=4, ffn_hidden=64, max_seq_len=16, **kw)


def _batch(seed: int = 0, b: int = 2, t: int = 16):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (b, t), generator=g)
    docs = torch.ones(b, t, dtype=torch.int32)
    docs[:, t // 2:] = 2  # two documents per row
    docs[-1, -3:] = 0  # and some padding
    pos = torch.cat([torch.arange(t // 2), torch.arange(t - t // 2)]).int().repeat(b, 1)
    targets = torch.roll(ids, -1, 1).masked_fill(docs == 0, -100)
    return ids, pos, docs, targets


def _step(m: Decoder, cfg: ModelConfig, fused: bool):
    ids, pos, docs, targets = _batch()
    m.zero_grad()
    out, stats = m(ids, pos, docs, targets=targets if fused else None)
    terms = loss_terms(cfg, out, targets, stats)
    terms["loss"].backward()
    return terms, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def _close_grads(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize("model, experts, dtype", [("dense", "", torch.float32), ("moma", "4t4i", torch.float32),
                                                   ("mod-moma", "4t4i", torch.float32),
                                                   ("mod-moma", "4t4i", torch.bfloat16)])
def test_blocks_compile_with_no_graph_break_and_match_eager(model, experts, dtype):
    """Regional compilation as the trainer does it (each Block), with fullgraph=True: any
    graph break (a data-dependent shape, a host sync) raises. Outputs and gradients equal
    eager's (the eager backend runs the same kernels, so only op order could differ). In
    bf16 the experts run as grouped GEMMs under the compiler too (fp32: the bmm fallback)."""
    cfg = _cfg(model, experts)
    torch.manual_seed(0)
    eager = Decoder(cfg).train().to(dtype)
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    for block in compiled.layers:
        block.compile(backend="eager", fullgraph=True)
    want, want_grads = _step(eager, cfg, fused=True)
    got, got_grads = _step(compiled, cfg, fused=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: a different order of roundings
    torch.testing.assert_close(got["loss"], want["loss"], atol=tol, rtol=tol)
    _close_grads(got_grads, want_grads, tol)


def test_moma_block_graph_break_count_is_pinned_at_zero():
    cfg = _cfg("mod-moma", "4t4i")
    torch.manual_seed(0)
    m = Decoder(cfg).train()
    ids, pos, docs, _ = _batch()
    x, ctx = m.embed(ids), m.context(ids, pos, docs)
    torch._dynamo.reset()
    for block in m.layers:  # layer 0 is depth-routed (MoD + MoMa), layer 1 plain MoMa
        explained = torch._dynamo.explain(block)(x, ctx)
        assert explained.graph_break_count == 0, explained.break_reasons


def _reference(layer: moe.ExpertChoice, x: torch.Tensor, member: torch.Tensor | None) -> torch.Tensor:
    """Expert choice by a plain loop: each expert alone (`Experts.one`) on its chosen tokens."""
    gate, idx, k = layer.route(x, member)
    out = torch.zeros_like(x)
    for e in range(layer.n_experts):
        rows = idx[e, : int(k)]
        out = out.index_add(0, rows, layer.experts.one(e, x[rows]) * gate[e, : int(k)].unsqueeze(1))
    return out


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("n_experts, factor, share", [(4, 1.0, 0.6), (3, 2.0, 0.3), (2, 1.0, 0.0), (1, 1.0, 0.5)])
def test_expert_paths_match_the_per_expert_reference(monkeypatch, grouped, n_experts, factor, share):
    """Grouped GEMM (torch._grouped_mm) and the padded-bmm fallback give the per-expert
    loop's output and gradients, for a group holding some of the tokens, none (share 0),
    or with every expert taking every member (one expert)."""
    monkeypatch.setattr(moe, "grouped_mm_ok", lambda x, w: grouped)
    torch.manual_seed(1)
    layer = moe.ExpertChoice(16, 32, n_experts, factor)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(40, 16, requires_grad=True)
    member = torch.rand(40) < share
    out = torch.zeros(40, 16)
    stats = layer.add_into(out, x, member)
    (out * torch.linspace(-1, 1, 16)).sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in layer.experts.parameters()]
    x.grad = None
    layer.zero_grad()
    want_out = _reference(layer, x, member)
    (want_out * torch.linspace(-1, 1, 16)).sum().backward()
    want = [x.grad] + [p.grad for p in layer.experts.parameters()]
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (out[~member] == 0).all()  # a non-member reaches no expert
    assert int(stats["tokens"]) == int(member.sum())
    assert stats["load"].tolist() == [moe.capacity(int(member.sum()), n_experts, factor)] * n_experts


def test_grouped_mm_dispatch(monkeypatch):
    w = torch.zeros(2, 16, 32)
    assert moe.grouped_mm_ok(torch.zeros(3, 16), w)  # fp32 on CPU, 64-byte rows
    assert moe.grouped_mm_ok(torch.zeros(3, 16, dtype=torch.bfloat16), w.bfloat16())
    assert not moe.grouped_mm_ok(torch.zeros(3, 6), torch.zeros(2, 6, 10))  # 24-byte rows: not aligned
    assert not moe.grouped_mm_ok(torch.zeros(3, 16, dtype=torch.float64), w.double())
    assert not moe.grouped_mm_ok(torch.zeros(3, 16, device="meta"), w.to("meta"))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's dtype decides, not the input's
        assert moe.compute_dtype(torch.zeros(3, 16)) == torch.bfloat16
    monkeypatch.delattr(torch, "_grouped_mm")
    assert not moe.grouped_mm_ok(torch.zeros(3, 16), w)  # a build without it: the bmm fallback


@pytest.mark.parametrize("chunk", [5, 1000])
def test_fused_head_loss_matches_cross_entropy_over_full_logits(chunk):
    torch.manual_seed(0)
    h = torch.randn(37, 24, requires_grad=True)
    w = (torch.randn(50, 24) * 0.3).requires_grad_()
    targets = torch.randint(0, 50, (37,))
    targets[::4] = -100
    z = 1e-2  # larger than the default so that the z-loss term's gradient is visible
    loss, nll, lse = linear_cross_entropy(h, w, targets, z, chunk=chunk)
    loss.backward()
    got = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    logits = h @ w.T
    valid = targets != -100
    want = F.cross_entropy(logits, targets, ignore_index=-100) + z * logits.logsumexp(-1)[valid].pow(2).mean()
    want.backward()
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0], h.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[1], w.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(nll[valid], F.cross_entropy(logits, targets, reduction="none")[valid].detach())
    assert (nll[~valid] == 0).all() and not nll.requires_grad


@pytest.mark.parametrize("model, experts", [("dense", ""), ("moma", "2t2i")])
def test_decoder_fused_head_equals_the_logits_path(model, experts):
    """The training path (targets into the model) gives the logits path's loss, per-modality
    NLL sums and gradients."""
    cfg = _cfg(model, experts, z_loss=1e-2)
    torch.manual_seed(0)
    m = Decoder(cfg).train()
    plain, plain_grads = _step(m, cfg, fused=False)
    fused, fused_grads = _step(m, cfg, fused=True)
    for key in ("loss", "ce", "z_loss", "text_nll", "image_nll", "text_n", "image_n"):
        torch.testing.assert_close(fused[key], plain[key], atol=1e-5, rtol=1e-5, msg=key)
    _close_grads(fused_grads, plain_grads, 1e-5)


def test_one_process_keeps_gathered_weights_between_forward_and_backward():
    """FSDP2 on one process (gloo, bf16 parameters): with reshard_after_forward=False the
    blocks' parameters stay unsharded after forward (plain tensors, not DTensor shards)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from mmtok.trainer.parallel import parallelize, reshard_after_forward

    assert [reshard_after_forward(i, 2, 2) for i in range(3)] == [True, True, False]
    assert not any(reshard_after_forward(i, 2, 1) for i in range(3))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        cfg = _cfg("moma", "2t2i")
        torch.manual_seed(0)
        m = parallelize(Decoder(cfg), 1, torch.device("cpu"), bf16=True, act_ckpt=False, compile=False).train()
        ids, pos, docs, targets = _batch()
        out, stats = m(ids, pos, docs, targets=targets)
        assert not isinstance(m.layers[0].attn.qkv.weight, DTensor)
        loss_terms(cfg, out, targets, stats)["loss"].backward()
        assert torch.isfinite(m.layers[0].attn.qkv.weight.grad.full_tensor()).all()
    finally:
        dist.destroy_process_group()


def test_flops_per_token_matches_a_hand_count():
    cfg = ModelConfig(vocab_size=32, image_range=(16, 32), n_layers=2, d_model=8, n_heads=2, ffn_hidden=16, max_seq_len=4)
    block = 4 * 8 * 8 + 3 * 8 * 16  # attention q, k, v, o + SwiGLU, per token
    head = 8 * 32
    scores = 12 * 8 * 4  # 2 matmuls (QK^T, AV) x 2 FLOPs x 3 (forward + backward) x d x seq
    assert flops_per_token(cfg, 4) == 6 * (2 * block + head) + 2 * scores
    moma = ModelConfig(**{**cfg.__dict__, "model": "moma", "experts": "4t4i"})
    assert flops_per_token(moma, 4) == flops_per_token(cfg, 4)  # one expert per token, same width
    mod = ModelConfig(**{**cfg.__dict__, "model": "mod-moma", "experts": "4t4i"})
    # layer 0 routed: a quarter of the tokens pass, and they attend to a quarter of the keys
    assert flops_per_token(mod, 4) == 6 * head + (6 * block + scores) + 0.25 * 6 * block + 0.25 ** 2 * scores
    assert PRESETS["1.4b"] == dict(n_layers=24, d_model=2048, n_heads=16, ffn_hidden=8192)  # MoMa's 1.4B row


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run by benchmarks/gpu_pending.sh)")
def test_grouped_gemm_on_the_gpu_matches_the_padded_path(monkeypatch):
    """bf16 on CUDA, where the trainer uses torch._grouped_mm: against the bmm fallback."""
    torch.manual_seed(0)
    layer = moe.ExpertChoice(256, 512, 4).cuda().bfloat16()
    x = torch.randn(1000, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    member = torch.rand(1000, device="cuda") < 0.6
    assert moe.grouped_mm_ok(x, layer.experts.w1)
    results = []
    for grouped in (True, False):
        monkeypatch.setattr(moe, "grouped_mm_ok", lambda x, w, g=grouped: g)
        x.grad = None
        layer.zero_grad()
        out = torch.zeros_like(x)
        layer.add_into(out, x, member)
        out.float().pow(2).sum().backward()
        results.append([out.float(), x.grad.float()] + [p.grad.float() for p in layer.experts.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)
