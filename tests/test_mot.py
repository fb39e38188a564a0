"""Mixture-of-Transformers (`--model mot`): every block weight untied by modality, global
attention, no router; trains, resumes exactly, evaluates, generates and exports like the
other families."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers.runs import VOCAB, cli, make_plan, metrics, random_batch, tiny
from mmtok.trainer.model import Decoder, active_params, flops_per_token, loss_terms


def _mot(**kw) -> Decoder:
    torch.manual_seed(0)
    return Decoder(tiny("mot", "", **kw))


def test_a_text_only_batch_leaves_every_image_weight_without_gradient():
    m = _mot().train()
    ids, pos, docs = random_batch(0)
    ids = ids % VOCAB["image_range"][0]  # text ids only
    logits, stats = m(ids, pos, docs)
    loss_terms(m.cfg, logits, torch.roll(ids, -1, 1), stats)["loss"].backward()
    image = {n: p.grad for n, p in m.named_parameters() if ".image." in n}
    text = {n: p.grad for n, p in m.named_parameters() if ".text." in n}
    assert len(image) == len(text) == 2 * 9  # per layer: 2 norms, qkv, proj, 2 QK-norms, 3 FFN matrices
    assert all(g is None or not g.any() for g in image.values())
    assert all(g is not None and g.abs().sum() > 0 for g in text.values())


def test_a_token_goes_through_its_own_modality_weights():
    """In one layer the FFN follows attention, so scaling the image tower's FFN moves exactly
    the image tokens' logits."""
    m = _mot(n_layers=1).eval()
    ids, pos, docs = random_batch(1)
    image = m.is_image(ids)
    assert image.any() and (~image).any()
    with torch.no_grad():
        before = m(ids, pos, docs)[0]
        m.layers[0].image.ffn.w2.weight.mul_(3.0)  # only the image tokens' FFN output changes
        after = m(ids, pos, docs)[0]
    changed = (after - before).abs().amax(-1) > 1e-6
    assert torch.equal(changed, image)


def test_mot_is_causal_a_later_token_changes_no_earlier_logit():
    m = _mot().eval()
    ids, pos, docs = random_batch(2, b=1, t=32)
    later = ids.clone()
    later[0, 20:] = torch.randint(VOCAB["text_range"][0], VOCAB["vocab_size"], (12,), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a, b = m(ids, pos, docs)[0], m(later, pos, docs)[0]
    torch.testing.assert_close(a[0, :20], b[0, :20], atol=1e-6, rtol=1e-6)  # the later change moves its own logits by ~0.8
    assert (a[0, 20:] - b[0, 20:]).abs().max() > 1e-3


def test_incremental_decoding_with_a_cache_matches_the_full_pass():
    m = _mot().eval()
    ids, pos, docs = random_batch(3, b=1, t=12)
    cache = [{} for _ in m.layers]
    with torch.no_grad():
        full = m(ids, pos, docs)[0]
        first = m(ids[:, :8], pos[:, :8], docs[:, :8], "causal", cache)[0]
        steps = [m(ids[:, i:i + 1], pos[:, i:i + 1], docs[:, i:i + 1], "causal", cache)[0] for i in range(8, 12)]
    torch.testing.assert_close(torch.cat([first, *steps], 1), full, atol=1e-5, rtol=1e-5)


def test_active_flops_per_token_equal_the_dense_model_and_parameters_double_in_blocks():
    dense, mot = tiny("dense", ""), tiny("mot", "")
    assert flops_per_token(mot, 64) == flops_per_token(dense, 64)
    assert active_params(mot) == active_params(dense)
    count = lambda m: sum(p.numel() for n, p in m.named_parameters() if n.startswith("layers."))  # noqa: E731
    assert count(Decoder(mot)) == 2 * count(Decoder(dense))


def test_the_chameleon_qk_norm_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="--model mot uses qk_norm rms"):
        _mot(qk_norm="chameleon")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_plan(tmp_path_factory.mktemp("mot"), steps=12)


def test_mot_trains_resumes_exactly_evaluates_generates_and_exports(data, tmp_path):
    common = ["--plan", data["plan"], "--model", "mot", "--steps", 4, "--ckpt-every", 2, "--lr", "0.01", "--warmup", 1, "--json"]
    a, b = tmp_path / "A", tmp_path / "B"
    assert cli("train", "--out", a, *common).exit_code == 0
    r = cli("train", "--out", b, *common, "--stop-at-step", 2)
    assert r.exit_code == 0 and json.loads(r.stdout)["status"] == "stopped"
    r = cli("train", "--out", b, *common, "--resume")
    assert r.exit_code == 0, r.output
    assert [x["loss"] for x in metrics(a)] == [x["loss"] for x in metrics(b)]  # same bits after the resume
    r = cli("eval", "--checkpoint", a, "--data", data["text"], "--data", data["pairs"], "--out", tmp_path / "eval", "--json")
    assert r.exit_code == 0, r.output
    heldout = json.loads(r.stdout)["heldout"]
    assert heldout["image"]["tokens"] > 0 and 1 < heldout["all"]["ppl"] < 2 * VOCAB["vocab_size"]
    assert cli("export", a, "--to", tmp_path / "exported").exit_code == 0
    from mmtok.trainer.export import load_model
    from mmtok.trainer.generate import Sampling, generate

    model, cfg = load_model(tmp_path / "exported")
    assert cfg.model == "mot"
    prompt = np.random.default_rng(0).integers(*VOCAB["text_range"], size=6)
    s = Sampling(max_tokens=12, seed=0)
    out = generate(model, prompt, VOCAB, s)
    assert 0 < len(out) <= 12 and np.array_equal(out, generate(model, prompt, VOCAB, s, use_cache=False))
