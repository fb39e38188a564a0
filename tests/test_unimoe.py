"""The Uni-MoE model: connector shapes and placement, LoRA experts (merge, routing,
capacity, balance loss), and what each stage trains."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmtok.trainer.context import Context
from mmtok.trainer.unimoe import LoRAMoEFFN, UniMoE, UniMoEConfig
from mmtok.trainer.unimoe_data import Pair, collate, load_feature, sequence
from mmtok.vocab import Vocab

VOCAB = Vocab.layout(vocab_size=16 + 512 + 16, image_codes=16, image_tokens_per_image=4)
CFG = dict(vocab_size=VOCAB.vocab_size, image_range=VOCAB.image_range, n_layers=2, d_model=32, n_heads=2,
           ffn_hidden=64, queries=4, connector_layers=1, enc_width=16, enc_heads=2, enc_layers=1, n_mels=8,
           fbank_bins=16, image_size=16, patch=8, frames=3, lora_rank=4, lora_alpha=8.0)


def features(modality: str, cfg: UniMoEConfig, rng, size: int = 0) -> np.ndarray:
    shape = {"speech": (1 + size, cfg.n_mels, 3000), "audio": (20 + 7 * size, cfg.fbank_bins),
             "image": (3, cfg.image_size, cfg.image_size), "video": (cfg.frames, 3, cfg.image_size, cfg.image_size)}
    return rng.standard_normal(shape[modality]).astype(np.float32)


def make_batch(cfg: UniMoEConfig, modalities, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    examples = []
    for i, m in enumerate(modalities):
        text = rng.integers(*VOCAB.text_range, size=3 + 2 * i)
        examples.append((m, features(m, cfg, rng, i % 2), *sequence(text, m, cfg, VOCAB.specials)))
    return collate(examples, cfg)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return UniMoE(UniMoEConfig(**CFG))


def test_each_connector_writes_queries_vectors_of_decoder_width_over_its_placeholder_span(model):
    cfg = model.cfg
    batch = make_batch(cfg, ["speech", "audio", "video", "image", "audio", "image"])
    seen = {}
    model.decoder.layers[0].register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    model(batch)
    x, ids = seen["x"], batch["input_ids"]
    span = torch.zeros_like(ids, dtype=torch.bool)
    span[:, 2:2 + cfg.queries] = True
    assert torch.equal(ids[span], torch.zeros(int(span.sum()), dtype=torch.long))  # placeholders are <pad>
    for m, module in model.inputs.items():
        rows = batch[f"{m}_rows"]
        out = module(batch)
        assert out.shape == (len(rows), cfg.queries, cfg.d_model)
        torch.testing.assert_close(x[rows, 2:2 + cfg.queries], out)
    # everywhere else the decoder sees the token embeddings (padding included)
    torch.testing.assert_close(x[~span], model.decoder.embed(ids)[~span])


def test_a_sample_only_sees_its_own_features(model):
    cfg = model.cfg
    a = make_batch(cfg, ["image", "audio"], seed=1)
    b = {k: v.clone() for k, v in a.items()}
    b["audio"] = b["audio"] + 1.0
    la, lb = model(a)[0], model(b)[0]
    torch.testing.assert_close(la[0], lb[0])  # the image row does not change
    assert not torch.allclose(la[1], lb[1])


def test_padding_frames_of_a_shorter_clip_do_not_change_its_output(model):
    cfg = model.cfg
    rng = np.random.default_rng(2)
    short = features("audio", cfg, rng)
    seq = sequence(np.arange(20, 25), "audio", cfg, VOCAB.specials)
    alone = model(collate([("audio", short, *seq)], cfg))[0]
    padded = model(collate([("audio", short, *seq), ("audio", features("audio", cfg, rng, 3), *seq)], cfg))[0]
    torch.testing.assert_close(alone[0], padded[0], atol=1e-5, rtol=1e-5)


def run(ffn: LoRAMoEFFN, x: torch.Tensor, real: torch.Tensor, route: torch.Tensor | None = None):
    """The FFN's output and the statistics it recorded."""
    y = ffn(x, Context(None, None, None, None, real, expert_route=route))
    return y, ffn.__dict__.pop("routing_stats", {})


def lora_ffn(seed=0, experts=4) -> LoRAMoEFFN:
    torch.manual_seed(seed)
    ffn = LoRAMoEFFN(16, 32, experts, rank=4, alpha=8.0, capacity_factor=1.5)
    for b in ffn.lora_b.values():
        torch.nn.init.normal_(b, std=0.3)  # trained-looking experts (B starts at zero)
    return ffn


def test_a_merged_lora_expert_gives_the_same_outputs_as_the_unmerged_one():
    ffn = lora_ffn()
    ffn.mode = "forced"
    x = torch.randn(2, 5, 16)
    real = torch.ones(2, 5, dtype=torch.bool)
    for e in range(4):
        y, _ = run(ffn, x, real, torch.full((2, 5), e))
        torch.testing.assert_close(y, ffn.merged(e)(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(y, super(LoRAMoEFFN, ffn).forward(x), atol=1e-3)  # the expert matters


def test_a_new_expert_equals_the_shared_ffn():
    torch.manual_seed(0)
    ffn = LoRAMoEFFN(16, 32, 3, rank=4, alpha=8.0, capacity_factor=1.5)
    ffn.mode = "routed"
    x = torch.randn(1, 6, 16)
    y, _ = run(ffn, x, torch.ones(1, 6, dtype=torch.bool))
    torch.testing.assert_close(y, super(LoRAMoEFFN, ffn).forward(x))  # top-2 weights sum to 1


def test_top2_routing_is_a_weighted_sum_of_the_two_best_experts():
    ffn = lora_ffn(1)
    ffn.mode = "routed"
    ffn.capacity_factor = 100.0  # nothing dropped
    x = torch.randn(1, 7, 16)
    y, stats = run(ffn, x, torch.ones(1, 7, dtype=torch.bool))
    probs = ffn.router(x[0]).softmax(-1)
    w, e = probs.topk(2, -1)
    w = w / w.sum(-1, keepdim=True)
    want = torch.stack([sum(w[t, j] * ffn.merged(int(e[t, j]))(x[0, t:t + 1])[0] for j in range(2)) for t in range(7)])
    torch.testing.assert_close(y[0], want, atol=1e-5, rtol=1e-5)
    assert torch.equal(stats["all"]["expert"], e) and float(stats["all"]["load"].sum()) == 14


def test_the_balance_loss_is_one_when_balanced_and_grows_with_collapse_and_capacity_drops_the_excess():
    ffn = lora_ffn(2)
    ffn.mode = "routed"
    x = torch.randn(1, 64, 16) * 0.1 + 1.0  # tokens that all look alike
    real = torch.ones(1, 64, dtype=torch.bool)
    with torch.no_grad():
        ffn.router.weight.zero_()
    _, s = run(ffn, x, real)
    assert abs(float(s["all"]["balance"].detach()) - 1.0) < 1e-5  # uniform probabilities
    with torch.no_grad():
        ffn.router.weight[0], ffn.router.weight[1] = 0.3, 0.2  # every token prefers experts 0 then 1
    _, s = run(ffn, x, real)
    assert float(s["all"]["balance"].detach()) > 1.5
    cap = int(np.ceil(2 * 64 * 1.5 / 4))  # capacity factor 1.5 over 2N assignments
    assert s["all"]["load"].tolist() == [cap, cap, 0, 0]
    assert float(s["all"]["unrouted"]) == 64 - cap  # the last tokens lost both their experts
    # the loss pushes towards balance: a few steps on it alone lower it
    opt = torch.optim.SGD(ffn.router.parameters(), lr=0.1)
    losses = []
    for _ in range(20):
        loss = run(ffn, x, real)[1]["all"]["balance"]
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0] - 0.1


def test_each_stage_trains_only_its_parts(model):
    align = model.set_stage("align")
    assert set(align["trained"]) == {"connectors", "encoders"} and align["frozen"]["lora_experts"] > 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("inputs.") for n in trainable)
    assert all(f.mode == "base" for f in model.ffns)
    experts = model.set_stage("experts")
    assert "lora_experts" in experts["trained"] and "routers" in experts["frozen"]
    assert all(f.mode == "forced" for f in model.ffns)
    tune = model.set_stage("tune")
    assert {"lora_experts", "routers", "connectors"} <= set(tune["trained"]) and "decoder" in tune["frozen"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.endswith(("attn.qkv.weight", "ffn.w1.weight", "embed.weight", "head.weight")) for n in trainable)
    with pytest.raises(ValueError, match="unknown stage"):
        model.set_stage("pretrain")


def test_stage_experts_sends_each_sample_to_its_modality_expert(model):
    model.set_stage("experts")
    batch = make_batch(model.cfg, ["speech", "image", "video", "audio"])
    _, stats = model(batch)
    chosen = stats[0]["all"]["expert"].view(4, -1)[:, 0]
    assert chosen.tolist() == [model.cfg.modalities.index(m) for m in ["speech", "image", "video", "audio"]]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_decompression_bomb_in_an_image_pair_is_refused_with_its_name():
    from helpers.media import bomb_png

    class Reader:  # stands in for a ShardReader holding one bomb
        directory = "shards/images"

        def read_member(self, shard, offset, size):
            return bomb_png()

    pair = Pair("img-0007", "image", "a caption", [(Reader(), "shard-000000.tar", 0, 0)])
    with pytest.raises(ValueError, match="shards/images img-0007: image image: .*decompression bomb"):
        load_feature(pair, UniMoEConfig(vocab_size=600, image_range=(500, 600), modalities=("image",)))


def test_speech_comes_from_espeak_ng_when_it_is_on_the_path(tmp_path, monkeypatch):
    """The demo's voice: espeak-ng's WAV (here a stand-in executable writing stereo 22.05 kHz,
    one 0.1 s tone per word) is read, mixed to mono and resampled to 16 kHz; without it,
    the procedural stand-in speaks."""
    import sys

    from mmtok.speech_standin import SAMPLE_RATE, speak, standin

    fake = tmp_path / "espeak-ng"
    fake.write_text(f"""#!{sys.executable}
import io, sys
import numpy as np, soundfile as sf
words = sys.argv[-1].split()
t = np.arange(int(0.1 * 22050 * len(words))) / 22050
left = 0.5 * np.sin(2 * np.pi * 440 * t)
buf = io.BytesIO()
sf.write(buf, np.stack([left, 0 * left], 1), 22050, format="WAV")
sys.stdout.buffer.write(buf.getvalue())
""")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    wave, voice = speak("three short words")
    assert voice == "espeak-ng" and wave.dtype == np.float32
    assert abs(len(wave) - 0.3 * SAMPLE_RATE) <= 2  # resampled to 16 kHz
    assert abs(float(np.abs(wave).max()) - 0.25) < 0.01  # the two channels averaged
    monkeypatch.setenv("PATH", "/nonexistent")
    wave, voice = speak("three short words")
    assert voice == "standin" and np.array_equal(wave, standin("three short words"))
