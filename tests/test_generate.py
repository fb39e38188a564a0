"""`mmtok generate`: mixed-modal sampling with causal routing and a KV cache. Outputs obey
the image-block grammar, images decode to PNGs of the tokenizer's resolution, the cache
changes nothing but speed, and sampling is reproducible by seed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.runs import VOCAB, cli, make_plan
from mmtok.trainer.config import ModelConfig
from mmtok.trainer.export import load_model
from mmtok.trainer.generate import Sampling, generate
from mmtok.trainer.model import Decoder

N = VOCAB["image_tokens_per_image"]
S = VOCAB["specials"]


def well_formed(ids: np.ndarray, vocab: dict) -> bool:
    """Image codes only as <boi> + exactly N codes + <eoi>; nothing after <eod>."""
    lo, hi = vocab["image_range"]
    n, s = vocab["image_tokens_per_image"], vocab["specials"]
    i = 0
    while i < len(ids):
        if ids[i] == s["<boi>"]:
            block = ids[i + 1:i + 1 + n]
            if len(block) != n or not ((block >= lo) & (block < hi)).all() or i + 1 + n >= len(ids) or ids[i + 1 + n] != s["<eoi>"]:
                return False
            i += n + 2
        elif lo <= ids[i] < hi or ids[i] == s["<eoi>"] or (ids[i] == s["<eod>"] and i != len(ids) - 1):
            return False
        else:
            i += 1
    return True


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny MoMa trained on caption-then-image pairs (it learns to open images), with
    auxiliary routers trained for causal routing."""
    root = tmp_path_factory.mktemp("gen")
    data = make_plan(root, steps=40)
    run = root / "run"
    r = cli("train", "--plan", data["plan"], "--out", run, "--model", "moma", "--experts", "2t2i", "--lr", "0.01",
            "--warmup", "2", "--steps", 40, "--json")
    assert r.exit_code == 0, r.output
    r = cli("train", "--stage", "aux-routers", "--resume", "--plan", data["plan"], "--out", run, "--steps", 100, "--json")
    assert r.exit_code == 0, r.output
    model, _ = load_model(run)
    return model


def prompt(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(*VOCAB["text_range"], size=10)


def test_samples_are_well_formed_and_the_model_opens_images(trained):
    outs = [generate(trained, prompt(i), VOCAB, Sampling(max_tokens=40, seed=i)) for i in range(8)]
    assert all(well_formed(o, VOCAB) for o in outs)
    assert sum(int((o == S["<boi>"]).sum()) for o in outs) >= 1  # the model emitted [begin-image] itself
    assert all(len(o) <= 40 for o in outs)


def test_no_image_starts_when_the_cap_leaves_no_room(trained):
    for seed in range(6):  # N codes + <boi> + <eoi> never fit in N + 1 tokens
        out = generate(trained, prompt(seed), VOCAB, Sampling(max_tokens=N + 1, seed=seed, temperature=2.0))
        assert S["<boi>"] not in out and well_formed(out, VOCAB)


def test_kv_cache_samples_exactly_what_full_recomputation_samples(trained):
    for seed in (0, 1):
        s = Sampling(max_tokens=30, seed=seed)
        assert np.array_equal(generate(trained, prompt(seed), VOCAB, s, use_cache=True),
                              generate(trained, prompt(seed), VOCAB, s, use_cache=False))


def test_seed_temperature_and_top_p(trained):
    p = prompt(3)
    a = generate(trained, p, VOCAB, Sampling(max_tokens=20, seed=5))
    assert np.array_equal(a, generate(trained, p, VOCAB, Sampling(max_tokens=20, seed=5)))
    assert not np.array_equal(a, generate(trained, p, VOCAB, Sampling(max_tokens=20, seed=6)))
    greedy = generate(trained, p, VOCAB, Sampling(max_tokens=20, temperature=0))
    assert np.array_equal(greedy, generate(trained, p, VOCAB, Sampling(max_tokens=20, top_p=1e-6, seed=9)))


def test_prompt_ending_in_boi_draws_exactly_one_image_block(trained):
    out = generate(trained, np.append(prompt(1), S["<boi>"]), VOCAB, Sampling(max_tokens=30, seed=0))
    lo, hi = VOCAB["image_range"]
    assert ((out[:N] >= lo) & (out[:N] < hi)).all() and out[N] == S["<eoi>"]
    assert well_formed(np.concatenate([[S["<boi>"]], out]), VOCAB)


@pytest.fixture(scope="module")
def tokdir(tmp_path_factory):
    from mmtok.bpe import train_bpe
    from mmtok.vq import VQConfig
    from mmtok.trainer.vq_train import train_vq
    from helpers.media import draw_image, make_shards, sentences

    tmp = tmp_path_factory.mktemp("tok")
    shards = make_shards(tmp / "train", texts=sentences(), images=[draw_image(i) for i in range(8)])
    train_bpe([shards], tmp / "tok", vocab_size=1000, image_codes=64, log=lambda m: None)
    train_vq([shards], tmp / "tok", VQConfig(resolution=16, downsample=2, codebook_size=64, channels=8, res_blocks=1),
             steps=2, batch_size=4, disc_weight=0, log=lambda m: None)
    return tmp / "tok"


@pytest.mark.slow
def test_cli_generates_text_and_a_png_of_the_tokenizer_resolution(tokdir, tmp_path):
    from safetensors.torch import save_file

    from mmtok.vocab import Vocab

    v = Vocab.load(tokdir)
    cfg = ModelConfig(model="mod-moma", experts="2t2i", vocab_size=v.vocab_size, image_range=tuple(v.image_range), max_seq_len=256)
    torch.manual_seed(0)
    model_dir = tmp_path / "model"  # an export of an (untrained) model: the sampler's grammar does not need training
    model_dir.mkdir()
    save_file({k: t.contiguous() for k, t in Decoder(cfg).state_dict().items()}, str(model_dir / "model.safetensors"))
    (model_dir / "config.json").write_text(json.dumps({"format": "mmtok-model/1", "model": cfg.__dict__ | {"image_range": list(cfg.image_range)}}))
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    out = tmp_path / "gen"
    r = cli("generate", "--checkpoint", model_dir, "--tokenizer", tokdir, "--prompt", "a red square", "--image",
            tmp_path / "red.png", "--generate-image", "--max-tokens", 80, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert len(result["images"]) == 1 and json.loads((out / "generation.json").read_text())["new_ids"] == result["new_ids"]
    assert Image.open(result["images"][0]).size == (16, 16)
    assert result["new_ids"][v.image_tokens_per_image] == v.specials["<eoi>"]
    r = cli("generate", "--checkpoint", model_dir, "--tokenizer", tmp_path, "--prompt", "x")
    assert r.exit_code == 2 and "error" in r.output.lower()
