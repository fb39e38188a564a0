"""The decoder: document masking, per-document rotary positions, QK-norm/swin norm
variants, flex vs SDPA attention, and the loss terms."""

from __future__ import annotations

import pytest
import torch

from mmtok.plan import parse_layout
from mmtok.trainer.config import ModelConfig, resolve
from mmtok.trainer.model import Decoder, loss_terms

VOCAB = dict(vocab_size=256, image_range=(192, 256), max_seq_len=64)


def model(**kw) -> Decoder:
    torch.manual_seed(0)
    return Decoder(ModelConfig(n_layers=2, d_model=32, n_heads=4, ffn_hidden=64, **(VOCAB | kw))).eval()


def two_docs(a: torch.Tensor, b: torch.Tensor):
    ids = torch.cat([a, b]).unsqueeze(0)
    doc = torch.cat([torch.full_like(a, 1), torch.full_like(b, 2)]).int().unsqueeze(0)
    pos = torch.cat([torch.arange(len(a)), torch.arange(len(b))]).int().unsqueeze(0)
    return ids, pos, doc


@pytest.mark.parametrize("kind", [dict(model="dense"), dict(model="dense", swin_norm=True)])
def test_a_document_is_blind_to_other_documents_and_positions_restart(kind):
    m = model(**kind)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 256, (20,), generator=g), torch.randint(0, 256, (12,), generator=g)
    with torch.no_grad():
        packed = m(*two_docs(a, b))[0][0, 20:]
        alone = m(b.unsqueeze(0), torch.arange(12).int().unsqueeze(0), torch.ones(1, 12, dtype=torch.int32))[0][0]
        other = m(*two_docs(torch.randint(0, 256, (20,), generator=g), b))[0][0, 20:]
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed, other, atol=1e-5, rtol=1e-5)


def test_attention_is_causal():
    m = model()
    ids = torch.randint(0, 256, (1, 16))
    doc, pos = torch.ones(1, 16, dtype=torch.int32), torch.arange(16).int().unsqueeze(0)
    changed = ids.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 256
    with torch.no_grad():
        x, y = m(ids, pos, doc)[0], m(changed, pos, doc)[0]
    torch.testing.assert_close(x[0, :10], y[0, :10])
    assert not torch.allclose(x[0, 10:], y[0, 10:])


def test_flex_attention_matches_sdpa():
    ids, pos, doc = two_docs(torch.randint(0, 256, (24,)), torch.randint(0, 256, (8,)))
    with torch.no_grad():
        torch.testing.assert_close(model(attention="flex")(ids, pos, doc)[0], model()(ids, pos, doc)[0], atol=1e-5, rtol=1e-5)


def test_loss_terms_match_a_direct_computation():
    cfg = ModelConfig(**VOCAB)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 8, 256, generator=g) * 3
    targets = torch.randint(0, 256, (2, 8), generator=g)
    targets[0, :3] = 200  # image targets
    targets[1, -2:] = -100
    t = loss_terms(cfg, logits, targets, [])
    valid = targets != -100
    ce = torch.nn.functional.cross_entropy(logits[valid], targets[valid])
    z = 1e-5 * torch.logsumexp(logits[valid], -1).pow(2).mean()
    torch.testing.assert_close(t["ce"], ce)
    torch.testing.assert_close(t["z_loss"], z)
    torch.testing.assert_close(t["loss"], ce + z)
    image = valid & (targets >= 192)
    assert int(t["image_n"]) == int(image.sum()) and int(t["text_n"]) == int((valid & ~image).sum())
    per = torch.nn.functional.cross_entropy(logits[image], targets[image], reduction="sum")
    torch.testing.assert_close(t["image_nll"], per)


def test_qk_norm_makes_attention_independent_of_query_key_scale():
    m = model()
    ids, pos, doc = torch.randint(0, 256, (1, 16)), torch.arange(16).int().unsqueeze(0), torch.ones(1, 16, dtype=torch.int32)
    with torch.no_grad():
        before = m(ids, pos, doc)[0]
        m.layers[0].attn.qkv.weight[: 2 * 32].mul_(50.0)  # the q and k projections only
        after = m(ids, pos, doc)[0]
    torch.testing.assert_close(before, after, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bad, message", [
    (dict(model="sparse"), "unknown model"),
    (dict(model="moma", experts="4x4"), "NtMi"),
    (dict(model="moma", experts="0t4i"), "NtMi"),
    (dict(model="moe", experts="1"), "N >= 2"),
    (dict(routing="top3"), "unknown routing"),
])
def test_bad_model_options_name_the_problem(bad, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**bad)


def test_layouts_and_presets():
    assert parse_layout("4t4i") == (4, 4) and parse_layout("1t1i") == (1, 1) and parse_layout("3t1i") == (3, 1)
    cfg = resolve("90m", {"model": "moma", "experts": "4t4i"}, {}, vocab={"vocab_size": 65536, "image_range": [57344, 65536]}, seq_len=4096)
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.model.n_heads, cfg.model.ffn_hidden) == (8, 512, 8, 2048)
    assert cfg.model.max_seq_len == 4096 and cfg.model.groups == [("text", 4), ("image", 4)]


def test_config_file_is_overridden_by_options_and_checked_against_the_plan(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[model]\nd_model = 48\nn_heads = 4\n[train]\nlr = 0.01\nsteps = 7\n')
    cfg = resolve("tiny", {"d_model": None}, {"lr": 0.02}, toml, vocab={"vocab_size": 256, "image_range": [192, 256]}, seq_len=32)
    assert cfg.model.d_model == 48 and cfg.train.lr == 0.02 and cfg.train.steps == 7
    toml.write_text('[model]\nvocab_size = 1000\n')
    with pytest.raises(ValueError, match="vocab_size"):
        resolve("tiny", {}, {}, toml, vocab={"vocab_size": 256, "image_range": [192, 256]}, seq_len=32, plan="P")
    toml.write_text('[model]\nmax_seq_len = 16\n')
    with pytest.raises(ValueError, match="longer than max_seq_len"):
        resolve("tiny", {}, {}, toml, vocab={"vocab_size": 256, "image_range": [192, 256]}, seq_len=32, plan="P")
    toml.write_text('[train]\nlearning_rate = 1\n')
    with pytest.raises(ValueError, match="unknown keys learning_rate"):
        resolve("tiny", {}, {}, toml)


# The configs behind tests/model_keys.json: each model kind's state_dict (names and shapes)
# as the code before the layer interface (issue 13) wrote it. Saved runs, upcycling and the
# HF export rely on these names.
KEY_KINDS = {
    "dense": dict(model="dense"), "dense-swin-cham": dict(model="dense", swin_norm=True, qk_norm="chameleon"),
    "moe-ec": dict(model="moe", experts="4"), "moe-top2": dict(model="moe", experts="4", routing="top2"),
    "moma": dict(model="moma", experts="2t2i"), "mod-moma": dict(model="mod-moma", experts="2t2i", n_layers=3),
}


@pytest.mark.parametrize("kind", [*KEY_KINDS, "unimoe"])
def test_state_dict_names_and_shapes_are_those_saved_runs_hold(kind):
    import json
    from pathlib import Path

    want = json.loads((Path(__file__).parent / "model_keys.json").read_text())[kind]
    if kind == "unimoe":
        from mmtok.trainer.unimoe import UniMoE, UniMoEConfig

        m = UniMoE(UniMoEConfig(modalities=("image", "audio")))
    else:
        m = Decoder(ModelConfig(**{"vocab_size": 96, "image_range": (64, 96), "n_layers": 2, "d_model": 32, "n_heads": 4,
                                   "ffn_hidden": 64, "max_seq_len": 16, **KEY_KINDS[kind]}))
    assert {k: list(v.shape) for k, v in m.state_dict().items()} == want
