"""Chameleon's weights in mmtok's decoder (`mmtok train --init-from hf:DIR`): logits equal
`transformers`' Chameleon on a tiny random checkpoint built here; a run starts from them,
dense or upcycled to MoMa experts."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from helpers.chameleon import save_chameleon, text_tokenizer
from helpers.tokens import make_doc, make_token_shards
from helpers.runs import cli, metrics

from mmtok.chameleon import import_chameleon
from mmtok.mix import plan_mix, write_plan
from mmtok.trainer.config import ModelConfig
from mmtok.trainer.hf_export import chameleon_options, from_hf_state, image_range_of, load_chameleon, to_hf_state
from mmtok.trainer.model import Decoder, loss_terms
from mmtok.trainer.train import TrainError
from mmtok.vocab import Vocab


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("chameleon-weights")
    tok = text_tokenizer()
    out = {}
    for swin in (False, True):
        out[swin] = root / f"hf-swin{int(swin)}"
        out[swin, "model"] = save_chameleon(out[swin], tok, seed=int(swin), randomize=True, swin_norm=swin,
                                            rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    out["tok"] = tok
    return out


def mmtok_config(src, **kw) -> ModelConfig:
    vmap = json.loads((src / "config.json").read_text())["vocabulary_map"]
    return ModelConfig(**chameleon_options(src), image_range=image_range_of(vmap), max_seq_len=64, **kw)


def batch(vocab_size: int, b: int = 2, t: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (b, t), generator=g)  # text and image ids alike
    return ids, torch.arange(t).repeat(b, 1), torch.ones(b, t, dtype=torch.long)


@pytest.mark.parametrize("swin", [False, True])
def test_logits_equal_transformers(hf, swin):
    cfg = mmtok_config(hf[swin])
    assert (cfg.swin_norm, cfg.qk_norm, cfg.norm_eps, cfg.rope_theta) == (swin, "chameleon", 1e-6, 5000.0)
    model = load_chameleon(hf[swin], cfg)
    ids, pos, docs = batch(cfg.vocab_size)
    with torch.no_grad():
        ours, _ = model(ids, pos, docs)
        want = hf[swin, "model"](input_ids=ids).logits
    lo, hi = cfg.image_range
    text = torch.ones(cfg.vocab_size, dtype=torch.bool)
    text[lo:hi] = False  # transformers sets image tokens' logits to the lowest float: it generates text only
    assert ours[..., text].std() > 0.5  # logits spread over units: a layout mistake moves them by far more than 1e-4
    torch.testing.assert_close(ours[..., text], want[..., text], atol=1e-4, rtol=0)


def test_weights_round_trip_and_defaults_unchanged(hf):
    from safetensors.torch import load_file

    cfg = mmtok_config(hf[True])
    theirs = {k: v for k, v in load_file(str(hf[True] / "model.safetensors")).items() if not k.startswith("model.vqmodel.")}
    back = to_hf_state(from_hf_state(theirs, cfg), cfg)
    assert set(back) == set(theirs) and all(torch.equal(back[k], theirs[k]) for k in theirs)  # a permutation, no arithmetic
    # the new options' defaults leave today's models as they were: the same tensors, shapes and eps
    shapes = sorted((k, tuple(v.shape)) for k, v in Decoder(ModelConfig()).state_dict().items())
    assert hashlib.sha256(repr(shapes).encode()).hexdigest() == DEFAULT_SHAPES_SHA256
    assert {m.eps for n, m in Decoder(ModelConfig()).named_modules() if n.endswith("norm")} == {1e-5}


# sha256 of the (name, shape) list of Decoder(ModelConfig()) before the Chameleon options existed
DEFAULT_SHAPES_SHA256 = "5f06208ae8b98ff928000e9bf4d84515710413a7f2937ec2bc084e057e731116"


def test_unsupported_checkpoints_are_refused_by_name(hf, tmp_path):
    src = tmp_path / "gqa"
    shutil.copytree(hf[False], src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": 2}))
    with pytest.raises(TrainError, match="num_key_value_heads = 2"):
        chameleon_options(src)
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(TrainError, match="model_type 'llama'"):
        chameleon_options(src)
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "model.safetensors").write_bytes(b"")
    with pytest.raises(Exception):
        load_chameleon(src, mmtok_config(hf[False]))


def _plan(root, vocab: dict):
    rng = np.random.default_rng(0)
    text = [make_doc(rng, vocab, [int(rng.integers(10, 40))]) for _ in range(20)]
    pairs = [make_doc(rng, vocab, ["img", 10] if i % 2 else [10, "img"]) for i in range(20)]
    dirs = [make_token_shards(root, text, vocab, "text"), make_token_shards(root, pairs, vocab, "pairs")]
    write_plan(plan_mix(dirs, out=root / "plan", ratio=(1, 1), world_size=1, seq_len=96, micro_batch=2, steps=8),
               root / "plan")
    return root / "plan"


def test_train_init_from_hf_dense_and_upcycled(hf, tmp_path):
    from mmtok.loader import PlanLoader
    from mmtok.trainer.checkpoint import load_weights

    src = hf[False]
    import_chameleon(src, tmp_path / "tok")
    plan = _plan(tmp_path, Vocab.load(tmp_path / "tok").to_dict())
    r = cli("train", "--init-from", f"hf:{src}", "--plan", plan, "--out", tmp_path / "run", "--steps", "2", "--json")
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
    assert (saved["qk_norm"], saved["n_layers"], saved["d_model"]) == ("chameleon", 2, 64)
    # the first step scores the first micro-batch with the checkpoint's own weights
    cfg = ModelConfig(**saved)
    ref = load_chameleon(src, cfg)
    first = next(iter(PlanLoader(plan, 0, 1)))
    torch.manual_seed(0)
    ce = {}
    for name, m in (("hf", ref), ("fresh", Decoder(cfg).eval())):
        with torch.no_grad():
            logits, stats = m(first["input_ids"], first["positions"], first["doc_ids"])
        ce[name] = float(loss_terms(cfg, logits, first["targets"], stats)["ce"])
    got = metrics(tmp_path / "run")[0]["ce"]
    assert abs(got - ce["hf"]) < 1e-4 and abs(got - ce["fresh"]) > 0.1
    # MoMa upcycled from it in one go: every expert of each group is the dense FFN
    r = cli("train", "--init-from", f"hf:{src}", "--plan", plan, "--out", tmp_path / "moma", "--model", "moma",
            "--experts", "2t2i", "--steps", "1", "--json")
    assert r.exit_code == 0, r.output
    moma_cfg = ModelConfig(**json.loads((tmp_path / "moma" / "config.json").read_text())["model"])
    moma = Decoder(moma_cfg)
    load_weights(moma, tmp_path / "moma" / "checkpoints" / "step-00000000")
    w1 = ref.layers[0].ffn.w1.weight.T
    for group in ("text", "image"):
        experts = getattr(moma.layers[0].ffn, group).experts.w1
        assert experts.shape[0] == 2 and all(torch.equal(e, w1) for e in experts)  # copies, no arithmetic
    # and `mmtok upcycle` takes the dense run like any other
    r = cli("upcycle", tmp_path / "run", "--experts", "2t2i", "--out", tmp_path / "up", "--json")
    assert r.exit_code == 0, r.output
    # bad sources in one line
    r = cli("train", "--init-from", tmp_path / "nothing", "--plan", plan, "--out", tmp_path / "x")
    assert r.exit_code == 2 and "hf:DIR" in r.output
    r = cli("train", "--init-from", f"hf:{src}", "--plan", plan, "--out", tmp_path / "run")
    assert r.exit_code == 2 and "already holds a run" in r.output
