"""The three Uni-MoE stages end to end on shards made by the real stages: `mmtok shard`
of speech / sound / video / image files with their texts, `extract-audio`,
`extract-keyframes`, a trained BPE. Each stage lowers its own held-out loss, frozen
parameters stay bit-identical, stage 3 starts from the stage-2 experts, resume is exact."""

from __future__ import annotations

import json
import random
import subprocess

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from helpers.tensors import moved as weights_moved
from mmtok.cli.app import app
from mmtok.demo import COLOURS, SHAPES, draw_shape
from mmtok.speech_standin import SAMPLE_RATE, standin
from mmtok.trainer.config import TrainConfig
from mmtok.trainer.unimoe import UniMoEConfig
from mmtok.trainer.unimoe_data import UniMoELoader, heldout, join_pairs
from mmtok.trainer.unimoe_train import UniMoERun, load_run, score, train_stage

WORDS = sorted(COLOURS)
TINY = dict(n_layers=2, d_model=32, n_heads=2, ffn_hidden=64, queries=4, connector_layers=1, enc_width=16,
            enc_heads=2, enc_layers=1, image_size=32, patch=8, frames=4, lora_rank=4, lora_alpha=8.0, max_seq_len=64)
HOLDOUT = 0.25


def cli(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    return r


def write_corpus(root):
    """Files with captions side by side (same stem), as `mmtok shard` pairs them."""
    import soundfile as sf

    from mmtok.media import ffmpeg_exe

    rng = random.Random(0)
    for d in ("speech", "sounds", "videos", "images"):
        (root / d).mkdir()
    phrases = rng.sample([f"{c} {s}" for c in WORDS for s in SHAPES], 24)  # distinct: shard drops duplicates
    for i, text in enumerate(phrases):
        sf.write(root / "speech" / f"s{i:02d}.wav", standin(text), SAMPLE_RATE)
        (root / "speech" / f"s{i:02d}.txt").write_text(text)
    for i in range(24):
        kind = ["low hum", "high beep", "noise burst"][i % 3]
        t = np.arange(int(0.5 * SAMPLE_RATE)) / SAMPLE_RATE
        f = 150 + 20 * rng.random() if kind == "low hum" else 2500 + 300 * rng.random()
        wave = np.random.default_rng(i).standard_normal(len(t)) * 0.3 if kind == "noise burst" else 0.5 * np.sin(2 * np.pi * f * t)
        sf.write(root / "sounds" / f"a{i:02d}.wav", wave.astype(np.float32), SAMPLE_RATE)
        (root / "sounds" / f"a{i:02d}.txt").write_text(f"a {kind}")
    colours = ["red", "green", "blue", "yellow"]
    for i in range(12):
        c = colours[i % 4]
        subprocess.run([ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", f"color=c={c}:s=64x64:d={1 + i / 8}:r=8",
                        "-pix_fmt", "yuv420p", str(root / "videos" / f"v{i:02d}.mp4")], check=True)
        (root / "videos" / f"v{i:02d}.txt").write_text(f"a {c} screen")
    for i in range(24):
        fg, bg = rng.sample(WORDS, 2)
        shape = rng.choice(SHAPES)
        draw_shape(shape, fg, bg, size=48, seed=i).save(root / "images" / f"i{i:02d}.png")
        (root / "images" / f"i{i:02d}.txt").write_text(f"a {fg} {shape}")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from helpers.media import make_shards, sentences
    from mmtok.bpe import train_bpe

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("unimoe")
    write_corpus(root)
    for d in ("speech", "sounds", "videos", "images"):
        cli("shard", root / d, "--out", root / f"{d}_shards", "--quiet", "--json")
    cli("extract-audio", root / "speech_shards", "--out", root / "speech_feats", "--features", "whisper", "--quiet", "--json")
    cli("extract-audio", root / "sounds_shards", "--out", root / "sound_feats", "--features", "fbank", "--quiet", "--json")
    cli("extract-keyframes", root / "videos_shards", "--out", root / "frames", "--frames", 4, "--size", 32, "--quiet", "--json")
    captions = [p.read_text() for p in root.glob("*/*.txt")]
    text = make_shards(root / "bpe_text", texts=sentences() + captions * 4)
    train_bpe([text], root / "tok", vocab_size=2000, image_codes=64, log=lambda m: None)
    sources = dict(speech=[root / "speech_feats"], audio=[root / "sound_feats"], video=[root / "frames"],
                   image=[root / "images_shards"])
    return {"root": root, "sources": sources, "tok": root / "tok"}


@pytest.fixture(scope="module")
def setup(corpus):
    from mmtok.tokenize import Tokenizer

    tok = Tokenizer.load(corpus["tok"])
    cfg = UniMoEConfig(vocab_size=tok.vocab.vocab_size, image_range=tok.vocab.image_range, **TINY)
    pairs = join_pairs(**corpus["sources"])
    train = [p for p in pairs if not heldout(p.key, HOLDOUT)]
    test = [p for p in pairs if heldout(p.key, HOLDOUT)]
    out = {"tok": tok, "cfg": cfg, "pairs": pairs, "train": train, "test": test}
    out["dense"] = pretrain_decoder(out, corpus["root"] / "dense")
    return out


def pretrain_decoder(setup, out, steps=150):
    """A tiny dense decoder trained on the training captions (the language model Uni-MoE
    starts from), written in `mmtok export`'s format."""
    import dataclasses

    from safetensors.torch import save_file

    from mmtok.trainer.model import Decoder, loss_terms

    dcfg = setup["cfg"].decoder_config()
    torch.manual_seed(0)
    dec = Decoder(dcfg)
    opt = torch.optim.AdamW(dec.parameters(), lr=1e-2)
    batches = iter(UniMoELoader(setup["train"], setup["cfg"], setup["tok"], batch_size=16))
    for _ in range(steps):
        b = next(batches)
        logits, stats = dec(b["input_ids"], b["positions"], b["doc_ids"])
        opt.zero_grad()
        loss_terms(dcfg, logits, b["targets"], stats)["loss"].backward()
        opt.step()
    out.mkdir()
    save_file(dec.state_dict(), out / "model.safetensors")
    (out / "config.json").write_text(json.dumps({"format": "mmtok-model/1", "model": dataclasses.asdict(dcfg),
                                                 "step": steps, "source_run": ""}))
    return out


@pytest.mark.slow
def test_pairs_join_every_modality_with_its_own_text(setup, corpus):
    pairs = setup["pairs"]
    by = {m: [p for p in pairs if p.modality == m] for m in ("speech", "audio", "video", "image")}
    assert {m: len(v) for m, v in by.items()} == {"speech": 24, "audio": 24, "video": 12, "image": 24}
    from mmtok.audio import whisper_log_mel
    from mmtok.trainer.unimoe_data import load_feature

    def mel_of(text):
        wave = np.zeros((1, 30 * SAMPLE_RATE), np.float32)
        said = standin(text)
        wave[0, :len(said)] = said
        return whisper_log_mel(wave).numpy()

    for p in by["speech"][:3]:  # the transcript is the text the audio was made from (16-bit wav: not exact)
        err = {q.text: float(np.abs(load_feature(p, setup["cfg"]) - mel_of(q.text)).max()) for q in by["speech"]}
        assert min(err, key=err.get) == p.text and err[p.text] < 0.2
    assert all(len(p.members) == 4 for p in by["video"])  # its 4 keyframes
    assert {p.text for p in by["video"]} == {"a red screen", "a green screen", "a blue screen", "a yellow screen"}
    assert setup["train"] and setup["test"]


def load_file_model(export) -> dict:
    from safetensors.torch import load_file

    return load_file(export / "model.safetensors")


def heldout_loss(model, setup) -> dict:
    return score(model, UniMoELoader(setup["test"], setup["cfg"], setup["tok"], batch_size=8).once())


def run_stage(setup, root, stage, init="", steps=25, **kw):
    cfg = UniMoERun(setup["cfg"], TrainConfig(steps=steps, lr=1e-2, warmup=2, ckpt_every=10, seed=0), stage, str(init))
    loaders = lambda rank, world: UniMoELoader(setup["train"], setup["cfg"], setup["tok"], batch_size=8, seed=0)  # noqa: E731
    return train_stage(cfg, root / stage, loaders, live=False, **kw)


def mean_loss(result) -> float:
    v = result["text_given"]
    return sum(x["loss"] * x["tokens"] for x in v.values()) / sum(x["tokens"] for x in v.values())


@pytest.fixture(scope="module")
def stages(setup, tmp_path_factory):
    """align (from the dense decoder) -> experts -> tune; each with the model it started from."""
    from mmtok.trainer.unimoe import UniMoE
    from mmtok.trainer.unimoe_train import init_weights

    root = tmp_path_factory.mktemp("stages")
    out, init = {"root": root}, setup["dense"]
    for stage in ("align", "experts", "tune"):
        torch.manual_seed(0)  # the seed train_stage builds the model with (run_stage's TrainConfig)
        start = UniMoE(setup["cfg"])
        init_weights(start, UniMoERun(setup["cfg"], TrainConfig(), stage, str(init)))
        start.set_stage(stage)
        out[stage] = {"summary": run_stage(setup, root, stage, init, steps=40), "before": start.eval()}
        init = root / stage
    return out


@pytest.mark.slow
def test_each_stage_lowers_its_held_out_loss(stages, setup):
    for stage in ("align", "experts", "tune"):
        after, _, _ = load_run(stages["root"] / stage)
        b = mean_loss(heldout_loss(stages[stage]["before"], setup))
        a = mean_loss(heldout_loss(after, setup))
        assert a < b - 0.05, (stage, b, a)


@pytest.mark.slow
def test_frozen_parameters_are_bit_identical_and_stage3_starts_from_the_stage2_experts(stages, setup):
    for stage in ("align", "experts", "tune"):
        start = stages[stage]["before"]  # the exact model the stage started from, set to the stage
        end, _, _ = load_run(stages["root"] / stage)
        final = dict(end.named_parameters())
        params = dict(start.named_parameters())
        frozen = {n for n, p in params.items() if not p.requires_grad}
        changed = {n for n in frozen if not torch.equal(params[n], final[n])}  # frozen: copies, bit for bit
        assert not changed, f"{stage}: frozen parameters moved: {sorted(changed)[:3]}"
        moved = {n for n, p in params.items() if weights_moved(p, final[n])}  # trained: beyond rounding
        assert moved, stage
        assert any(n.startswith("decoder.") for n in frozen) and "decoder" in stages[stage]["summary"]["frozen"]
        if stage == "experts":
            assert any(".lora_" in n for n in moved) and not any(".router." in n for n in moved)
        if stage == "tune":
            assert any(".router." in n for n in moved)
    dense = load_file_model(setup["dense"])
    align, _, _ = load_run(stages["root"] / "align")
    for n, p in dense.items():  # align starts from the dense decoder and leaves it alone
        assert torch.equal(align.decoder.state_dict()[n], p)
    # stage tune started from the experts stage's LoRA weights exactly: its first step's
    # loss equals the experts model's loss on that batch under top-2 routing
    experts, _, _ = load_run(stages["root"] / "experts")
    tune_start = stages["tune"]["before"]
    for (n, a), (m, b) in zip(experts.named_parameters(), tune_start.named_parameters()):
        assert n == m and torch.equal(a, b)
    stage_file = json.loads((stages["root"] / "tune" / "stage.json").read_text())
    assert "experts" in stage_file["init"] and "routers" in stage_file["trained"]


@pytest.mark.slow
def test_resume_mid_stage_is_exact(setup, tmp_path):
    a = run_stage(setup, tmp_path / "a", "align", setup["dense"], steps=6)
    assert a["status"] == "finished"
    b = run_stage(setup, tmp_path / "b", "align", setup["dense"], steps=6, stop_at_step=3)
    assert b["status"] == "stopped"
    b = run_stage(setup, tmp_path / "b", "align", setup["dense"], steps=6, resume=True)
    recs = lambda p: [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, (p / "align" / "metrics.jsonl").read_text().splitlines())]  # noqa: E731
    assert recs(tmp_path / "b") == recs(tmp_path / "a")


@pytest.mark.slow
def test_eval_reports_text_given_each_modality_and_routing_per_layer(stages, setup):
    result = heldout_loss(load_run(stages["root"] / "tune")[0], setup)
    assert set(result["text_given"]) == {m for m in ("speech", "audio", "video", "image")
                                         if any(p.modality == m for p in setup["test"])}
    assert set(result["routing"]) == {"0", "1"}
    for rows in result["routing"].values():
        for share in rows.values():
            assert abs(sum(share) - 1) < 1e-6 and len(share) == 4


@pytest.mark.slow
def test_cli_runs_the_three_stages_and_evaluates(corpus, tmp_path):
    from safetensors.torch import load_file, save_file
    from whisper.model import AudioEncoder

    src = corpus["sources"]
    whisper = tmp_path / "whisper_encoder.safetensors"
    save_file(AudioEncoder(80, 1500, 64, 1, 1).state_dict(), whisper)
    data = ["--speech", src["speech"][0], "--audio", src["audio"][0], "--video", src["video"][0],
            "--image", src["image"][0], "--tokenizer", corpus["tok"], "--speech-encoder", whisper,
            "--queries", 4, "--connector-layers", 1, "--batch-size", 4, "--holdout", 0.25,
            "--steps", 2, "--warmup", 1, "--json"]
    init = []
    for stage in ("align", "experts", "tune"):
        r = cli("train", "--model", "uni-moe", "--stage", stage, "--out", tmp_path / stage, *init, *data)
        summary = json.loads(r.stdout)
        assert summary["status"] == "finished" and summary["stage"] == stage
        assert summary["frozen"]["frozen_encoders"] > 0 and "frozen_encoders" not in summary["trained"]
        init = ["--init", tmp_path / stage]
    tuned, _, _ = load_run(tmp_path / "tune")
    for k, v in load_file(whisper).items():  # the loaded speech encoder never moved
        assert torch.equal(tuned.inputs["speech"].encoder.state_dict()[k], v)  # frozen: a copy
    r = cli("eval", "--checkpoint", tmp_path / "tune", "--batch-size", 4, "--json")
    result = json.loads(r.stdout)
    assert result["stage"] == "tune" and result["text_given"] and result["routing"]
    assert (tmp_path / "tune" / "eval" / "routing.png").stat().st_size > 0
    # a stage that does not follow its predecessor is refused with a message
    r = CliRunner().invoke(app, [str(a) for a in ("train", "--model", "uni-moe", "--stage", "tune", "--out",
                                                  tmp_path / "bad", "--init", tmp_path / "align", *data)])
    assert r.exit_code == 2 and "starts from the experts stage" in r.output and "Traceback" not in r.output


@pytest.mark.slow
def test_a_stage_on_two_fsdp_processes_matches_one_process_with_the_same_micro_batches(corpus, tmp_path):
    """2 ranks x 4 pairs == 1 process x grad_accum 2 x 4 pairs: rank r takes the r-th block of
    each step's pairs, as the one process's r-th micro-batch does. Frozen parts stay frozen
    under FSDP (the whole decoder outside the LoRA experts in stage experts)."""
    from helpers.runs import cli_subprocess

    src = corpus["sources"]
    data = ["--speech", src["speech"][0], "--audio", src["audio"][0], "--image", src["image"][0],
            "--tokenizer", corpus["tok"], "--queries", 4, "--connector-layers", 1, "--batch-size", 4,
            "--holdout", 0.25, "--warmup", 1, "--lr", "0.01", "--json"]
    r = cli_subprocess(["train", "--model", "uni-moe", "--stage", "align", "--out", tmp_path / "align", "--steps", 1, *data])
    assert r.returncode == 0, r.stderr[-3000:]
    stage = ["--model", "uni-moe", "--stage", "experts", "--init", tmp_path / "align", "--steps", 3, *data]
    r = cli_subprocess(["train", "--out", tmp_path / "F", "--nproc", 2, *stage])
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["world_size"] == 2
    r = cli_subprocess(["train", "--out", tmp_path / "R", "--grad-accum", 2, *stage])
    assert r.returncode == 0, r.stderr[-3000:]
    curve = lambda run: [(r["step"], r["loss"], r["grad_norm"]) + tuple(r[k] for k in sorted(r) if k.startswith("text_given_"))  # noqa: E731
                         for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    fsdp, ref = curve(tmp_path / "F"), curve(tmp_path / "R")
    assert [x[0] for x in fsdp] == [1, 2, 3] and len(fsdp[0]) == 9  # loss and tokens of text given speech, audio, image
    np.testing.assert_allclose(np.array(fsdp, dtype=float), np.array(ref, dtype=float), rtol=2e-5)
    start, _, _ = load_run(tmp_path / "align")
    for run in ("F", "R"):
        model, _, _ = load_run(tmp_path / run)
        for (name, p), q in zip(model.named_parameters(), start.parameters()):
            if not name.startswith("inputs.") and ".lora_" not in name:
                assert torch.equal(p, q), name  # the decoder (and its routers) did not move
