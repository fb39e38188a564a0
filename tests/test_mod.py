"""Mixture-of-Depths (`--model mod-moma`): exactly the capacity share of the batch's real
tokens passes through routed layers (0, 2, ...), the rest skip them unchanged, the router
weight scales the update, and the model trains."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers.runs import cli, make_plan, metrics, random_batch, tiny
from mmtok.trainer.block import Block
from mmtok.trainer.depth import DepthRoutedBlock
from mmtok.trainer.ffn import SwiGLU
from mmtok.trainer.model import Decoder, flops_per_token


def _decoder(capacity: float, n_layers: int = 4) -> Decoder:
    torch.manual_seed(0)
    m = Decoder(tiny("mod-moma", "2t2i", n_layers=n_layers, mod_capacity=capacity)).eval()
    for layer in m.layers:
        if isinstance(layer, DepthRoutedBlock):
            torch.nn.init.normal_(layer.mod_router.weight, std=1.0)  # spread the router weights
    return m


@pytest.mark.parametrize("capacity", [0.25, 0.5])
def test_routed_layers_pass_exactly_the_capacity_share_of_real_tokens(capacity):
    m = _decoder(capacity)
    ids, pos, docs = random_batch(0, b=3, t=24)
    docs[1, 17:] = 0  # padding never passes
    docs[2, 5:] = 0
    real = int((docs > 0).sum())
    with torch.no_grad():
        _, stats = m(ids, pos, docs)
    routed = [i for i, s in enumerate(stats) if "mod" in s]
    assert routed == [0, 2]
    for i in routed:
        assert int(stats[i]["mod"]["passed"]) == math.ceil(capacity * real)
        assert int(stats[i]["mod"]["candidates"]) == real
        # the experts inside saw only the tokens that passed
        assert sum(float(stats[i][g]["tokens"]) for g in ("text", "image")) == math.ceil(capacity * real)


@pytest.mark.parametrize("rows", [1, 2])
def test_skipped_tokens_keep_their_state_and_chosen_ones_get_the_weighted_block_update(rows):
    m = _decoder(0.25)
    block = m.layers[0]
    ids, pos, docs = random_batch(1, b=rows, t=20)
    docs[rows - 1, 14:] = 0  # padding at the end of the last row
    x = torch.randn(rows, 20, 64)
    ctx = m.context(ids, pos, docs)
    real = ctx.real
    with torch.no_grad():
        out = block(x, ctx)
        weight = torch.sigmoid(block.mod_router(x).squeeze(-1))
        k = math.ceil(0.25 * int(real.sum()))
        chosen = torch.zeros(rows * 20, dtype=torch.bool)
        chosen[weight.masked_fill(~real, -1).reshape(-1).topk(k).indices] = True
        chosen = chosen.view(rows, 20)
        assert torch.equal(out[~chosen], x[~chosen])  # skipped: untouched
        if rows == 1:  # reference: the block on the chosen tokens alone, in order, scaled by the weight
            idx = chosen[0].nonzero().squeeze(1)
            sub = x[:, idx]
            y = Block.forward(block, sub, m.context(ids[:, idx], pos[:, idx], docs[:, idx]))
            torch.testing.assert_close(out[:, idx], sub + weight[:, idx].unsqueeze(-1) * (y - sub), atol=1e-5, rtol=1e-5)
        else:
            assert not torch.allclose(out[chosen], x[chosen])


def test_the_chosen_tokens_run_as_one_fixed_width_row_that_keeps_rows_and_documents_apart():
    m = _decoder(0.25)
    block = m.layers[0]
    block.ffn = SwiGLU(64, 128)  # a per-token FFN: each source row can then be checked on its own
    ids, pos, docs = random_batch(2, b=3, t=20)
    docs[0, 8:], pos[0, 8:] = 2, torch.arange(12)  # two documents in row 0
    docs[2, 15:] = 0  # padding
    x = torch.randn(3, 20, 64)
    ctx = m.context(ids, pos, docs)
    real = ctx.real
    shapes = []
    block.attn.register_forward_pre_hook(lambda mod, args: shapes.append(tuple(args[0].shape)))
    with torch.no_grad():
        out = block(x, ctx)
        weight = torch.sigmoid(block.mod_router(x).squeeze(-1))
    # static shape: ceil(0.25 * 3 * 20) = 15 slots, rounded up to 16, whatever the weights and padding
    assert shapes == [(1, 16, 64)]
    chosen = torch.zeros(60, dtype=torch.bool)
    chosen[weight.masked_fill(~real, -1).reshape(-1).topk(math.ceil(0.25 * int(real.sum()))).indices] = True
    chosen = chosen.view(3, 20)
    assert torch.equal(out[~chosen], x[~chosen])  # index_add leaves these rows as copies of x
    with torch.no_grad():
        for r in range(3):  # reference: the block on one row's chosen tokens alone
            idx = chosen[r].nonzero().squeeze(1)
            if not len(idx):
                continue
            sub, d = x[r:r + 1, idx], docs[r:r + 1, idx]
            y = Block.forward(block, sub, m.context(ids[r:r + 1, idx], pos[r:r + 1, idx], d))
            want = sub + weight[r:r + 1, idx].unsqueeze(-1) * (y - sub)
            torch.testing.assert_close(out[r:r + 1, idx], want, atol=1e-5, rtol=1e-5)


def test_the_packed_row_under_flex_block_masks_matches_sdpa():
    """attention="flex" builds the packed row's document mask as a BlockMask (what the GPU
    runs to skip masked tiles); forward only, since flex has no CPU backward. Two documents
    per row, so the mask really separates something: one mask for both moves logits by 0.35."""
    ids, pos, _ = random_batch(3, b=2, t=32)
    doc = torch.ones_like(ids)
    doc[:, 20:] = 2
    pos[:, 20:] -= 20
    out = {}
    for attention in ("sdpa", "flex"):
        torch.manual_seed(0)
        m = Decoder(tiny("mod-moma", "2t2i", n_layers=4, attention=attention)).eval()
        with torch.no_grad():
            out[attention] = m(ids, pos, doc)[0]
    torch.testing.assert_close(out["flex"], out["sdpa"], atol=1e-5, rtol=1e-5)


def test_mod_moma_trains_and_reports_depth_router_agreement(tmp_path):
    data = make_plan(tmp_path, steps=12)
    run = tmp_path / "run"
    r = cli("train", "--plan", data["plan"], "--out", run, "--model", "mod-moma", "--experts", "2t2i", "--steps", 10,
            "--lr", "0.01", "--warmup", "2", "--aux-routers", "joint", "--json")
    assert r.exit_code == 0, r.output
    recs = metrics(run)
    assert recs[-1]["loss"] < recs[0]["loss"]
    r = cli("eval", "--checkpoint", run, "--data", data["text"], "--out", tmp_path / "eval", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert set(result["heldout"]["aux_agreement"]) == {"experts", "depth"}
    assert result["heldout_causal"]["all"]["loss"] is not None


def test_bad_mod_capacity_is_refused(tmp_path):
    data = make_plan(tmp_path, steps=4)
    r = cli("train", "--plan", data["plan"], "--out", tmp_path / "r", "--model", "mod-moma", "--experts", "2t2i",
            "--mod-capacity", "1.5", "--steps", 1)
    assert r.exit_code == 2 and "--mod-capacity" in r.output and "less than or equal to 1" in r.output


def test_flops_per_token_count_only_the_tokens_that_pass_routed_blocks():
    full = flops_per_token(tiny("moma", "2t2i"), 64)
    per_capacity = [flops_per_token(tiny("mod-moma", "2t2i", mod_capacity=c), 64) for c in (0.25, 0.5, 1.0)]
    assert per_capacity[-1] == pytest.approx(full)  # everyone passes: the work of moma
    assert per_capacity[0] < per_capacity[1] < per_capacity[2]


def test_batch_routing_never_waits_for_the_device():
    """Host waits (counted on the CPU by the ops that cause them on a GPU) in a training
    forward and backward: none. Expert groups' sizes stay on the device (static shapes),
    and so do Mixture-of-Depths' choice and packing."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from benchutil import device_waits

    from mmtok.trainer.model import loss_terms

    waits = {}
    for model in ("moma", "mod-moma"):
        torch.manual_seed(0)
        cfg = tiny(model, "2t2i", n_layers=6)
        m = Decoder(cfg).train()
        ids, pos, docs = random_batch(0, b=3, t=24)
        docs[2, 15:] = 0
        with device_waits() as w:
            logits, stats = m(ids, pos, docs)
            loss_terms(cfg, logits, ids, stats)["loss"].backward()
        waits[model] = dict(w.count)
    assert waits == {"moma": {}, "mod-moma": {}}
