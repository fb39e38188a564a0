"""MoMa's auxiliary routers: causal routing at inference, the aux-routers stage after
training, joint training on detached inputs, and eval in both routing modes."""

from __future__ import annotations

import json

import pytest
import torch

from helpers.runs import cli, make_plan, metrics, random_batch, tiny
from helpers.tensors import moved
from mmtok.trainer.export import load_model
from mmtok.trainer.model import Decoder, is_aux_param
from mmtok.trainer.moe import ExpertChoice

MOMA = ["--model", "moma", "--experts", "2t2i", "--lr", "0.01", "--warmup", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("aux")
    return {"root": root, **make_plan(root)}


def test_causal_expert_routing_follows_the_aux_router_and_the_main_gates():
    torch.manual_seed(0)
    layer = ExpertChoice(8, 16, 3)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(30, 8)
    out, stats = layer(x, causal=True)
    take = layer.aux(x) > 0
    gates = torch.sigmoid(layer.router(x))
    want = torch.zeros_like(x)
    for t in range(30):
        for e in range(3):
            if take[t, e]:
                want[t] += gates[t, e] * layer.experts.one(e, x[t:t + 1])[0]
    assert 0 < take.sum() < take.numel()  # some tokens reach experts, some don't
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert stats["load"].tolist() == take.sum(0).float().tolist()
    assert int(stats["unrouted"]) == int((~take.any(1)).sum())


@pytest.mark.parametrize("model, experts", [("moma", "2t2i"), ("mod-moma", "2t2i"), ("moe", "4")])
def test_changing_a_later_token_changes_no_earlier_logit_with_causal_routing(model, experts):
    torch.manual_seed(0)
    m = Decoder(tiny(model, experts)).eval()
    ids, pos, docs = random_batch(1)
    later = ids.clone()
    later[:, 16:] = torch.flip(later[:, 16:], [1]) + 1  # every token from position 16 on changes
    with torch.no_grad():
        a, _ = m(ids, pos, docs, "causal")
        b, _ = m(later, pos, docs, "causal")
        batch_a, _ = m(ids, pos, docs)
        batch_b, _ = m(later, pos, docs)
    # Each expert sees a batch of another size once later tokens change, and kernels differ
    # with batch size and CPU (~1e-7 apart on AVX-512): "unchanged" is within 1e-5.
    torch.testing.assert_close(a[:, :16], b[:, :16], atol=1e-5, rtol=0)
    # expert choice over the batch does look ahead: the same edit moves earlier logits by
    # ~2e-2 (measured on all three models), far beyond that tolerance
    assert (batch_a[:, :16] - batch_b[:, :16]).abs().max() > 1e-3


@pytest.mark.parametrize("model", ["dense", "moma", "mod-moma"])
def test_kv_cache_decoding_gives_the_full_causal_forward_logits(model):
    torch.manual_seed(0)
    m = Decoder(tiny(model, "" if model == "dense" else "2t2i")).eval()
    ids, pos, docs = random_batch(2, b=1, t=20)
    cache = [{} for _ in m.layers]
    with torch.no_grad():
        full, _ = m(ids, pos, docs, "causal")
        steps = [m(ids[:, :6], pos[:, :6], docs[:, :6], "causal", cache)[0]]  # prefill, then one at a time
        steps += [m(ids[:, t:t + 1], pos[:, t:t + 1], docs[:, t:t + 1], "causal", cache)[0] for t in range(6, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-5, rtol=1e-5)


def _weights(run):
    model, _ = load_model(run)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_aux_router_stage_learns_expert_choice_and_keeps_the_model(data, tmp_path):
    run = tmp_path / "run"
    assert cli("train", "--plan", data["plan"], "--out", run, *MOMA, "--steps", 20, "--ckpt-every", 10, "--json").exit_code == 0
    r = cli("eval", "--checkpoint", run, "--data", data["text"], "--data", data["pairs"], "--out", tmp_path / "e0", "--json")
    before = json.loads(r.stdout)
    w0 = _weights(run)
    r = cli("train", "--stage", "aux-routers", "--resume", "--plan", data["plan"], "--out", run, "--steps", 300, "--json")
    assert r.exit_code == 0, r.output
    stage = json.loads(r.stdout)
    assert stage["step"] == 20  # the run's step, schedule and loader position are unchanged
    w1 = _weights(run)
    for k in w0:  # only the auxiliary routers moved; the rest is the checkpoint's copy, bit for bit
        assert (moved(w0[k], w1[k]) if is_aux_param(k) else torch.equal(w0[k], w1[k])), k
    r = cli("eval", "--checkpoint", run, "--data", data["text"], "--data", data["pairs"], "--out", tmp_path / "e1", "--json")
    after = json.loads(r.stdout)
    agree = after["heldout"]["aux_agreement"]["experts"]
    print(f"auxiliary-router agreement with expert choice on held-out data: {before['heldout']['aux_agreement']['experts']:.3f} "
          f"-> {agree:.3f}; ppl batch {after['heldout']['all']['ppl']:.2f}, causal {after['heldout_causal']['all']['ppl']:.2f}")
    # ~0.95 on the training batches, ~0.87 here: eval batches hold fewer tokens, which moves
    # expert choice's batch-wide threshold (MoMa reports ~0.99 at scale)
    assert agree >= 0.8 and agree > before["heldout"]["aux_agreement"]["experts"] + 0.2
    assert stage["final"]["agreement_experts"] >= 0.9
    # routing causally costs little perplexity once the auxiliary routers agree
    assert after["heldout_causal"]["all"]["ppl"] < 1.1 * after["heldout"]["all"]["ppl"]
    assert after["heldout_causal"]["all"]["tokens"] == after["heldout"]["all"]["tokens"]
    assert "causal routing" in (tmp_path / "e1" / "eval.md").read_text()
    # the main training can still continue from the rewritten checkpoint
    r = cli("train", "--plan", data["plan"], "--out", run, *MOMA, "--steps", 22, "--resume", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["step"] == 22, r.output


def test_joint_aux_routers_learn_without_changing_the_main_training(data, tmp_path):
    runs = {}
    for mode in ("stage", "joint"):
        runs[mode] = tmp_path / mode
        r = cli("train", "--plan", data["plan"], "--out", runs[mode], *MOMA, "--aux-routers", mode, "--steps", 8, "--json")
        assert r.exit_code == 0, r.output
    stage, joint = metrics(runs["stage"]), metrics(runs["joint"])
    # detached inputs: the same model updates. Were the BCE to reach the main weights, ce
    # would move by 4e-4 at step 2 and 1e-2 after (measured); 1e-5 leaves room for kernels.
    assert [r["ce"] for r in joint] == pytest.approx([r["ce"] for r in stage], rel=0, abs=1e-5)
    assert joint[-1]["aux_router_bce"] < joint[0]["aux_router_bce"] - 0.05
    assert joint[-1]["loss"] > joint[-1]["ce"] + joint[-1]["z_loss"]  # the BCE is part of the joint loss


def test_aux_stage_errors_are_clear(data, tmp_path):
    r = cli("train", "--stage", "aux-routers", "--plan", data["plan"], "--out", tmp_path / "none")
    assert r.exit_code == 2 and "--resume" in r.output
    r = cli("train", "--stage", "aux-routers", "--resume", "--plan", data["plan"], "--out", tmp_path / "none")
    assert r.exit_code == 2 and "not a training run" in r.output
    dense = tmp_path / "dense"
    assert cli("train", "--plan", data["plan"], "--out", dense, "--steps", 1, "--json").exit_code == 0
    r = cli("train", "--stage", "aux-routers", "--resume", "--plan", data["plan"], "--out", dense)
    assert r.exit_code == 2 and "routes causally already" in r.output


@pytest.mark.slow
def test_aux_router_stage_on_two_processes(data, tmp_path):
    """`--stage aux-routers --nproc 2`: FSDP2 over two ranks that read their own micro-batches;
    only the auxiliary routers move, and the checkpoint keeps the main run's step, world size
    and global batch, so the main training resumes from it without a warning."""
    from helpers.runs import cli_subprocess as run_cli

    run = tmp_path / "run"
    assert cli("train", "--plan", data["plan"], "--out", run, *MOMA, "--steps", 10, "--json").exit_code == 0
    w0 = _weights(run)
    r = run_cli(["train", "--stage", "aux-routers", "--resume", "--plan", data["plan"], "--out", run, "--steps", 60,
                 "--nproc", 2, "--json"])
    assert r.returncode == 0, r.stderr[-3000:]
    stage = json.loads(r.stdout)
    assert stage["world_size"] == 2 and stage["step"] == 10
    assert stage["final"]["agreement_experts"] >= 0.85
    w1 = _weights(run)
    for k in w0:
        assert (moved(w0[k], w1[k]) if is_aux_param(k) else torch.equal(w0[k], w1[k])), k
    state = json.loads((run / "checkpoints" / "step-00000010" / "train_state.json").read_text())
    assert (state["step"], state["world_size"], state["global_batch"]) == (10, 1, 1)
    r = run_cli(["train", "--plan", data["plan"], "--out", run, *MOMA, "--steps", 12, "--resume", "--json"])
    assert r.returncode == 0 and json.loads(r.stdout)["step"] == 12 and "warning" not in r.stderr, r.stderr[-2000:]
