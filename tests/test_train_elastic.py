"""`mmtok train --resume` at another world size (elastic resume): a MoMa 2t2i run stopped
on 2 processes continues on 1, and one stopped on 1 continues on 2. The global batch stays
the same (2 ranks x 1 micro-batch == 1 process x --grad-accum 2), so the resumed run must
continue at the checkpoint's step, read exactly the plan's next micro-batches, and train
like an uninterrupted run at the new world size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.runs import MOMA, cli, cli_subprocess, curve, metrics

STEPS, STOP = 6, 3
COMMON = [*MOMA, "--steps", STEPS, "--ckpt-every", STOP, "--json"]
# the same global batch of 2 micro-batches per step; --grad-accum is given on both sides since
# a resume keeps the run's own value unless told otherwise
ONE, TWO = ["--grad-accum", 2], ["--nproc", 2, "--grad-accum", 1]
# tests/test_train.py's tolerance for 2 FSDP ranks (gloo, fp32) against 1 process over the
# same micro-batches: only the order of the floating-point sums differs.
RTOL = 2e-5


def launch(world: list, out: Path, plan: Path, *extra) -> dict:
    """One `mmtok train` on 1 process (in this process) or 2 (torchrun); its JSON summary."""
    args = ["train", "--plan", plan, "--out", out, *world, *COMMON, *extra]
    if world is TWO:
        r = cli_subprocess(args)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout)
    r = cli(*args)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def loader_states(ckpt: Path) -> dict:
    return {p.name: json.loads(p.read_text())["loader"]["next_microbatch"] for p in sorted(ckpt.glob("rank-*.json"))}


@pytest.fixture(scope="module")
def elastic(train_plan):
    """Uninterrupted references on 1 and 2 processes; 2 -> 1 and 1 -> 2 resumed runs."""
    root, plan = train_plan["root"] / "elastic", train_plan["plan"]
    runs = {"ref1": (ONE, ONE), "ref2": (TWO, TWO), "2to1": (TWO, ONE), "1to2": (ONE, TWO)}
    out = {"root": root, "first": {}, "summary": {}, "stopped": {}}
    for name, (first, then) in runs.items():
        if name.startswith("ref"):
            out["summary"][name] = launch(first, root / name, plan)
            continue
        s = launch(first, root / name, plan, "--stop-at-step", STOP)
        assert s["status"] == "stopped" and s["step"] == STOP, s
        out["first"][name] = metrics(root / name)
        ckpt = root / name / "checkpoints" / f"step-{STOP:08d}"
        out["stopped"][name] = (json.loads((ckpt / "train_state.json").read_text()), loader_states(ckpt))
        # the weights the resumed run starts from, for scoring its first step
        assert cli("export", root / name, "--to", root / f"{name}-step{STOP}").exit_code == 0
        out["summary"][name] = launch(then, root / name, plan, "--resume")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name,before,after", [("2to1", 2, 1), ("1to2", 1, 2)])
def test_resume_at_another_world_size_continues_from_the_checkpoint(elastic, name, before, after):
    meta, states = elastic["stopped"][name]
    assert meta["step"] == STOP and meta["world_size"] == before
    # the loader position is global: every rank saved the same place in the plan's order
    assert states == {f"rank-{r}.json": 2 * STOP for r in range(before)}
    s = elastic["summary"][name]
    assert (s["status"], s["step"], s["world_size"]) == ("finished", STEPS, after)
    run = elastic["root"] / name
    assert [r["step"] for r in metrics(run)] == list(range(1, STEPS + 1))  # no step twice, none missing
    assert metrics(run)[:STOP] == elastic["first"][name]  # the records before the checkpoint are kept as they were
    final = run / "checkpoints" / f"step-{STEPS:08d}"
    assert json.loads((final / "train_state.json").read_text())["world_size"] == after
    assert loader_states(final) == {f"rank-{r}.json": 2 * STEPS for r in range(after)}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["2to1", "1to2"])
def test_the_first_resumed_step_reads_the_next_micro_batches_of_the_plan(elastic, train_plan, name):
    """The first step after the resume trains on micro-batches 2*STOP and 2*STOP+1 of the
    plan: its logged loss is the checkpointed model's loss on exactly those two, and not on
    a pair repeating or skipping one (the micro-batches all hold the same token counts, so
    the loss, not a count, tells them apart)."""
    from mmtok.trainer.export import load_model
    from mmtok.trainer.model import loss_terms

    from mmtok.loader import PlanLoader

    model, cfg = load_model(elastic["root"] / f"{name}-step{STOP}")
    with torch.no_grad():
        losses = []
        for _, b in zip(range(2 * STEPS), PlanLoader(train_plan["plan"], 0, 1)):
            logits, stats = model(b["input_ids"], b["positions"], b["doc_ids"])
            losses.append(float(loss_terms(cfg, logits, b["targets"], stats)["loss"]))
    pairs = {g: (losses[g] + losses[g + 1]) / 2 for g in range(2 * STEPS - 1)}
    logged = metrics(elastic["root"] / name)[STOP]
    assert logged["step"] == STOP + 1
    assert abs(logged["loss"] - pairs[2 * STOP]) < 1e-5  # as in test_train's export test: fp32 sum order only
    others = [abs(logged["loss"] - v) for g, v in pairs.items() if g != 2 * STOP]
    assert min(others) > 1e-3  # any other position would show


@pytest.mark.slow
@pytest.mark.parametrize("name,ref", [("2to1", "ref1"), ("1to2", "ref2")])
def test_resumed_losses_and_weights_match_an_uninterrupted_run_at_the_new_world_size(elastic, name, ref):
    root = elastic["root"]
    got, want = np.array(curve(root / name)), np.array(curve(root / ref))
    assert got.shape == (STEPS, 5)
    # loss, gradient norm, text and image loss per step, after the resume too
    np.testing.assert_allclose(got, want, rtol=RTOL)
    from safetensors.torch import load_file

    for run in (name, ref):
        assert cli("export", root / run, "--to", root / f"{run}-export").exit_code == 0
    a, b = (load_file(str(root / f"{r}-export" / "model.safetensors")) for r in (name, ref))
    assert a.keys() == b.keys() and "layers.0.ffn.image.experts.w1" in a
    for k in a:  # the experts' weights (sharded differently on each side) included
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
