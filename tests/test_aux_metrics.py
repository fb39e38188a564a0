"""Auxiliary-router agreement beside its trivial rate (always "not selected"), precision and
recall of "selected", and the causal-routing loss gap, in `mmtok eval`'s JSON and eval.md."""

from __future__ import annotations

import json

import pytest
import torch

from helpers.runs import cli, make_plan, random_batch, tiny
from mmtok.trainer.aux_routers import agreement_summary, aux_agreement
from mmtok.trainer.model import Decoder
from mmtok.trainer.moe import aux_stats


def test_aux_counts_and_summary_on_a_hand_made_case():
    # 4 tokens x 2 experts; token 3 is outside the group (not counted)
    logits = torch.tensor([[1.0, -1.0], [1.0, 1.0], [-1.0, -1.0], [5.0, 5.0]])
    chosen = torch.tensor([[True, False], [False, True], [True, False], [True, True]])
    s = aux_stats(logits, chosen, torch.tensor([True, True, True, False]))
    assert [float(s[f"aux_{k}"]) for k in ("hits", "n", "tp", "pos", "pred")] == [4, 6, 2, 3, 3]
    summary = agreement_summary(aux_agreement([{"text": s}])["experts"])
    assert summary == pytest.approx({"agreement": 4 / 6, "trivial": 1 - 3 / 6, "precision": 2 / 3, "recall": 2 / 3})


def test_agreement_is_consistent_with_precision_recall_and_the_trivial_rate():
    torch.manual_seed(0)
    m = Decoder(tiny("moma", "2t2i")).eval()
    ids, pos, docs = random_batch(0, b=2, t=32)
    with torch.no_grad():
        _, stats = m(ids, pos, docs)
    sums = aux_agreement(stats)["experts"]
    s = agreement_summary(sums)
    # agreement = (true positives + true negatives) / predictions
    tn = sums["n"] - sums["pos"] - sums["pred"] + sums["tp"]
    assert s["agreement"] == pytest.approx((sums["tp"] + tn) / sums["n"])
    # two experts per group, each taking ceil(half) of its tokens: "not selected" is right about half the time
    assert s["trivial"] == pytest.approx(0.5, abs=0.05)


def test_eval_reports_trivial_rate_precision_recall_and_the_causal_gap(tmp_path):
    data = make_plan(tmp_path, steps=6)
    run = tmp_path / "run"
    r = cli("train", "--plan", data["plan"], "--out", run, "--model", "moma", "--experts", "2t2i", "--steps", 4,
            "--ckpt-every", 4, "--json")
    assert r.exit_code == 0, r.output
    r = cli("eval", run, "--data", data["text"], "--data", data["pairs"], "--out", tmp_path / "e", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    h = res["heldout"]
    exp = h["aux_routing"]["experts"]
    assert set(exp) == {"agreement", "trivial", "precision", "recall"}
    assert exp["agreement"] == h["aux_agreement"]["experts"]
    assert 0.4 < exp["trivial"] < 0.6  # 2 experts per group
    for kind in ("all", "text", "image"):
        assert res["causal_gap"][kind] == pytest.approx(res["heldout_causal"][kind]["loss"] - h[kind]["loss"])
    md = (tmp_path / "e" / "eval.md").read_text()
    assert 'always "not selected"' in md and "Causal routing minus batch routing" in md
