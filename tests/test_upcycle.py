"""Upcycling (`mmtok upcycle`): a 1t1i (or dense) run becomes the step-0 checkpoint of an
NtMi run whose experts copy their modality's FFN; its first step continues from the
parent's loss, its loader resumes where the parent stopped, its schedule restarts."""

from __future__ import annotations

import json

import pytest
import torch

from helpers.runs import cli, make_plan, metrics
from mmtok.trainer.checkpoint import load_run

COMMON = ["--lr", "0.01", "--warmup", "2"]


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    root = tmp_path_factory.mktemp("up")
    data = make_plan(root, steps=40)
    run = root / "p1t1i"
    r = cli("train", "--plan", data["plan"], "--out", run, "--model", "moma", "--experts", "1t1i", *COMMON,
            "--steps", 30, "--stop-at-step", 20, "--json")
    assert r.exit_code == 0, r.output
    return {"root": root, "run": run, **data}


def _loader_next(run) -> int:
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text()
    return json.loads((ckpt / "rank-0.json").read_text())["loader"]["next_microbatch"]


def test_upcycled_experts_copy_the_ffn_and_routers_start_at_the_parents(parent, tmp_path):
    r = cli("upcycle", parent["run"], "--experts", "3t2i", "--out", tmp_path / "up", "--json")
    assert r.exit_code == 0, r.output
    old, _, _ = load_run(parent["run"])
    new, cfg, step = load_run(tmp_path / "up")
    assert step == 0 and cfg.model.experts == "3t2i" and cfg.model.router_noise == "gumbel"
    for lo, ln in zip(old.layers, new.layers):
        for group, n in (("text", 3), ("image", 2)):
            g_old, g_new = getattr(lo.ffn, group), getattr(ln.ffn, group)
            for w in ("w1", "w2", "w3"):
                # upcycling copies weights (no arithmetic): bit-identical on any CPU
                assert torch.equal(getattr(g_new.experts, w), getattr(g_old.experts, w).expand(n, -1, -1))
            assert g_new.router.weight.shape == (n, 64)
            row = g_old.router.weight[0]
            assert torch.allclose(g_new.router.weight, row.expand(n, -1), atol=0.05 * row.abs().max().item())
        assert torch.equal(lo.attn.qkv.weight, ln.attn.qkv.weight)
    assert torch.equal(old.embed.weight, new.embed.weight) and torch.equal(old.head.weight, new.head.weight)


def test_upcycled_gates_start_at_the_parents_and_the_experts_split_the_tokens(parent):
    """Fresh routers gate the copied experts near 0.5 instead of the parent's trained gate
    (the upcycling shock, docs/SCIENCE.md); routers from the parent's row keep its gates,
    and their small random parts still send each expert its own tokens."""
    from dataclasses import replace

    from mmtok.trainer.model import Decoder
    from mmtok.trainer.upcycle import upcycle_weights

    old, cfg, _ = load_run(parent["run"])
    x = torch.randn(4096, cfg.model.d_model)
    gap = {}
    for spread in (0.01, None):
        torch.manual_seed(0)
        new = Decoder(replace(cfg.model, experts="4t4i")).eval()
        upcycle_weights(old, new, from_dense=False, router_spread=spread)
        g_old, g_new = old.layers[0].ffn.text, new.layers[0].ffn.text
        with torch.no_grad():
            want = torch.sigmoid(g_old.router(x)).expand(-1, 4)
            gap[spread] = (torch.sigmoid(g_new.router(x)) - want).abs().mean().item()
            _, idx, _ = g_new.route(x)
        if spread is not None:  # four independent quarters would reach 1 - (3/4)^4 = 68% of tokens
            assert idx.unique().numel() / x.shape[0] > 0.6
    assert gap[0.01] < 0.01 and gap[None] > 0.05, gap


def test_upcycled_training_continues_from_the_parent_loss_and_data_position(parent, tmp_path):
    up, scratch = tmp_path / "up", tmp_path / "scratch"
    assert cli("upcycle", parent["run"], "--experts", "2t2i", "--out", up, "--json").exit_code == 0
    opts = ["--model", "moma", "--experts", "2t2i", *COMMON, "--steps", 4]
    r = cli("train", "--plan", parent["plan"], "--out", up, *opts, "--router-noise", "gumbel", "--resume", "--json")
    assert r.exit_code == 0, r.output
    r = cli("train", "--plan", parent["plan"], "--out", scratch, *opts, "--json")
    assert r.exit_code == 0, r.output
    parent_last = metrics(parent["run"])[-1]["loss"]
    up_first, scratch_first = metrics(up)[0]["loss"], metrics(scratch)[0]["loss"]
    print(f"parent 1t1i at step 20: {parent_last:.3f}; upcycled 2t2i step 1: {up_first:.3f}; from scratch: {scratch_first:.3f}")
    assert abs(up_first - parent_last) < 0.25 * (scratch_first - parent_last)
    assert metrics(up)[0]["lr"] == metrics(scratch)[0]["lr"]  # the schedule restarted
    assert _loader_next(up) == _loader_next(parent["run"]) + 4  # no micro-batch seen twice
    assert _loader_next(scratch) == 4


def test_upcycle_from_dense_and_refusals(parent, tmp_path):
    dense = tmp_path / "dense"
    assert cli("train", "--plan", parent["plan"], "--out", dense, "--steps", 2, "--json").exit_code == 0
    r = cli("upcycle", dense, "--experts", "2t2i", "--out", tmp_path / "d2", "--json")
    assert r.exit_code == 0, r.output
    old, _, _ = load_run(dense)
    new, cfg, _ = load_run(tmp_path / "d2")
    assert cfg.model.model == "moma"
    ffn = new.layers[1].ffn
    for group in (ffn.text, ffn.image):
        assert torch.equal(group.experts.w1[1], old.layers[1].ffn.w1.weight.T)  # copies, transposed
        assert torch.equal(group.experts.w2[0], old.layers[1].ffn.w2.weight.T)
    r = cli("upcycle", tmp_path / "d2", "--experts", "4t4i", "--out", tmp_path / "d3")
    assert r.exit_code == 2 and "dense or a 1t1i" in r.output
    r = cli("upcycle", dense, "--experts", "four", "--out", tmp_path / "d4")
    assert r.exit_code == 2 and "NtMi" in r.output
    r = cli("upcycle", dense, "--experts", "2t2i", "--out", tmp_path / "d2")
    assert r.exit_code == 2 and "already holds a run" in r.output
