"""A newcomer's first hour with their own data (issue 16, part C): `inspect` knows every
directory mmtok writes, and what `shard` keeps decodes in every later stage."""

import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from helpers.media import draw_image, sentences

from helpers.runs import cli
from mmtok.shards import ShardReader, read_jsonl


def ok(*args):
    r = cli(*args)
    assert r.exit_code == 0, r.output
    return r


def tone(seconds=0.5, sr=16000):
    return (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * sr)) / sr)).astype("float32")


def float_wav(payload: bytes) -> bytes:
    """A WAV of 32-bit float samples written by hand (44-byte header + payload)."""
    fmt = struct.pack("<HHIIHH", 3, 1, 16000, 64000, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


def quarantine(d):
    return read_jsonl(Path(d) / "quarantine.jsonl")


# ---------------------------------------------------------------- inspect

@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Every kind of directory mmtok writes, each made by a tiny real run of its stage."""
    from mmtok.media import ffmpeg_exe

    tmp = tmp_path_factory.mktemp("pipe")
    raw = tmp / "raw"
    raw.mkdir()
    for i in range(6):
        (raw / f"img{i}.png").write_bytes(draw_image(i))
        (raw / f"img{i}.txt").write_text(f"shapes number {i}")
    (raw / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences(400)))
    sf.write(raw / "clip.wav", tone(), 16000)
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=10:duration=1",
                    "-pix_fmt", "yuv420p", "-c:v", "libx264", str(raw / "clip.mp4")], check=True)
    d = {k: tmp / k for k in ("shards", "frames", "features", "tokenizer", "codes", "tokens", "plan", "run", "export")}
    ok("shard", raw, "--out", d["shards"], "--quiet")
    ok("extract-keyframes", d["shards"], "--out", d["frames"], "--frames", 2, "--size", 32, "--quiet")
    ok("extract-audio", d["shards"], "--out", d["features"], "--features", "fbank", "--quiet")
    ok("train-bpe", d["shards"], "--out", d["tokenizer"], "--vocab-size", 800, "--image-codes", 64)
    ok("train-vq", d["shards"], "--out", d["tokenizer"], "--steps", 2, "--codebook-size", 64, "--resolution", 16,
       "--downsample", 2, "--channels", 8, "--res-blocks", 1, "--batch-size", 4, "--log-every", 1)
    ok("tokenize-images", d["shards"], "--tokenizer", d["tokenizer"], "--out", d["codes"], "--quiet")
    ok("tokenize", d["shards"], "--tokenizer", d["tokenizer"], "--codes", d["codes"], "--out", d["tokens"], "--quiet")
    ok("balance-mix", d["tokens"], "--out", d["plan"], "--world-size", 1, "--experts", "1t1i", "--seq-len", 128,
       "--micro-batch", 2, "--steps", 2)
    ok("train", "--plan", d["plan"], "--out", d["run"], "--model", "moma", "--experts", "1t1i", "--preset", "tiny",
       "--steps", 2, "--ckpt-every", 2)
    ok("export", d["run"], "--to", d["export"])
    return d


def test_inspect_knows_every_directory_mmtok_writes_without_torch(pipeline):
    code = ("import json, sys\n"
            "from typer.testing import CliRunner\n"
            "from mmtok.cli.app import app\n"
            f"dirs = {({k: str(v) for k, v in pipeline.items()})!r}\n"
            "out = {}\n"
            "for k, d in dirs.items():\n"
            "    r = CliRunner().invoke(app, ['inspect', d, '--json'])\n"
            "    assert r.exit_code == 0, (k, r.output)\n"
            "    out[k] = json.loads(r.stdout)\n"
            "    r = CliRunner().invoke(app, ['inspect', d])\n"
            "    assert r.exit_code == 0 and 'Traceback' not in r.output, (k, r.output)\n"
            "assert 'torch' not in sys.modules\n"
            "print(json.dumps(out))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout)
    assert {k: v["kind"] for k, v in info.items()} == {
        "shards": "shards", "frames": "frames", "features": "features", "tokenizer": "tokenizer", "codes": "codes",
        "tokens": "tokens", "plan": "plan", "run": "run", "export": "export"}
    f = info["frames"]["facts"]
    assert (f["mode"], f["frames_per_video"], f["videos"], f["frames"]) == ("uniform", 2, 1, 2)
    f = info["features"]["facts"]
    assert f["features"] == ["fbank"] and f["clips"] == 1 and f["seconds"] == pytest.approx(0.5, abs=0.01)
    tok = info["tokenizer"]
    assert (tok["vocab_size"], tok["image_codes"], tok["codes_per_image"]) == (800, 64, 64)
    assert tok["text_model_present"] and tok["vq"]["codebook_size"] == 64 and tok["vq"]["last_log"]["step"] == 2
    assert tok["vq"]["parameters"] > 0
    f = info["codes"]["facts"]
    assert (f["images"], f["codes_per_image"], f["resolution"], f["vocab_size"]) == (6, 64, 16, 800)
    f = info["tokens"]["facts"]
    assert f["documents"] == 406 and f["tokens"] == f["text_tokens"] + f["image_tokens"]
    assert f["image_tokens"] == 6 * 64 and f["tokenizer"] == info["codes"]["facts"]["tokenizer"]
    e = info["export"]
    assert (e["model"], e["experts"], e["step"]) == ("moma", "1t1i", 2)
    assert e["weights"]["parameters"] > 1000 and e["weights"]["tensors"] > 0
    assert e["tokenizer"] == f["tokenizer"] and info["run"]["step"] == 2


def test_inspect_refuses_a_forged_export_header(pipeline, tmp_path):
    bad = tmp_path / "export"
    bad.mkdir()
    (bad / "config.json").write_text((pipeline["export"] / "config.json").read_text())
    (bad / "model.safetensors").write_bytes((1 << 60).to_bytes(8, "little") + b"{}")
    r = cli("inspect", bad)
    assert r.exit_code == 2 and "not a safetensors file" in r.output and "Traceback" not in r.output


# ---------------------------------------------------------------- validation agrees across stages

def test_audio_shard_keeps_is_audio_extract_audio_reads(tmp_path):
    """A 64-byte WAV whose samples are NaN: libsndfile reads it, extract-audio refuses it.
    shard now decodes as extract-audio does, so the two agree."""
    raw = tmp_path / "raw"
    raw.mkdir()
    nan = float_wav(b"\xff" * 20)
    assert len(nan) == 64
    (raw / "nan.wav").write_bytes(nan)
    sf.write(raw / "good.wav", tone(), 16000)
    r = cli("shard", raw, "--out", tmp_path / "s", "--max-error-rate", "1", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["by_modality"] == {"audio": 1}
    assert [q["reason"] for q in quarantine(tmp_path / "s")] == [f"{raw / 'nan.wav'}: decoded audio contains NaN "
                                                                 "or infinite samples"]
    r = cli("extract-audio", tmp_path / "s", "--out", tmp_path / "f", "--features", "fbank", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["quarantined"] == 0, r.output


def test_audio_formats_soundfile_and_ffmpeg_read_are_audio(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for fmt, name in (("AU", "a.au"), ("AIFF", "b.aiff"), ("AIFF", "c.aif"), ("CAF", "d.caf"), ("W64", "e.w64")):
        sf.write(raw / name, tone(0.2 + 0.1 * len(name) + 0.05 * ord(name[0])), 16000, format=fmt)
    r = cli("shard", raw, "--out", tmp_path / "s", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["by_group"] == {"audio-au": 1, "audio-aiff": 2, "audio-caf": 1, "audio-w64": 1}
    assert quarantine(tmp_path / "s") == []
    r = cli("extract-audio", tmp_path / "s", "--out", tmp_path / "f", "--features", "fbank", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["samples"] == 5, r.output


def test_a_bad_member_costs_only_itself(tmp_path):
    """song.aiff does not decode: the good song.wav and its caption still form a pair; the
    aiff gets its own record. A caption whose only image is bad is no sample: quarantined."""
    raw = tmp_path / "raw"
    raw.mkdir()
    sf.write(raw / "song.wav", tone(), 16000)
    (raw / "song.txt").write_text("a steady tone")
    (raw / "song.aiff").write_bytes(b"FORM\x00\x00\x00\x10AIFFCOMM" + b"\x00" * 20)
    good = draw_image(3)
    (raw / "pic.png").write_bytes(good[: len(good) // 2])
    (raw / "pic.txt").write_text("a caption without its picture")
    r = cli("shard", raw, "--out", tmp_path / "s", "--max-error-rate", "1", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["by_modality"] == {"audio_pair": 1}
    (sample,) = ShardReader(tmp_path / "s")
    assert sample.members["txt"] == b"a steady tone" and sample.members["wav"] == (raw / "song.wav").read_bytes()
    q = {x["input"]: x["reason"] for x in quarantine(tmp_path / "s")}
    assert set(q) == {str(raw / "song.aiff"), str(raw / "pic")}
    assert "audio does not decode" in q[str(raw / "song.aiff")] and "image does not decode" in q[str(raw / "pic")]


def test_a_bad_tar_member_costs_only_itself(tmp_path):
    import tarfile

    buf = io.BytesIO()
    sf.write(buf, tone(), 16000, format="WAV")
    members = {"s.wav": buf.getvalue(), "s.txt": b"a tone", "s.flac": b"fLaC" + b"\x00" * 40}
    with tarfile.open(tmp_path / "in.tar", "w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    r = cli("shard", tmp_path / "in.tar", "--out", tmp_path / "s", "--max-error-rate", "1", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["by_modality"] == {"audio_pair": 1}
    (rec,) = quarantine(tmp_path / "s")
    assert rec["input"] == f"{tmp_path / 'in.tar'}:s.flac" and "audio does not decode" in rec["reason"]
    assert "/tmp" not in rec["reason"].split("ffmpeg:", 1)[1]  # the temporary copy's name stays out of the log


def test_images_shard_keeps_are_images_tokenize_images_reads(tmp_path):
    """A 60:1 strip decodes in PIL but tokenize-images refuses it (resizing it to a square
    would take gigabytes at full size): shard refuses it too, with the same reason."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for name, size in (("strip.png", (600, 10)), ("ok.png", (500, 10))):
        buf = io.BytesIO()
        Image.new("RGB", size, (200, 30, 30)).save(buf, "PNG")
        (raw / name).write_bytes(buf.getvalue())
    r = cli("shard", raw, "--out", tmp_path / "s", "--max-error-rate", "1", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["by_modality"] == {"image": 1}
    (rec,) = quarantine(tmp_path / "s")
    assert rec["input"] == str(raw / "strip") and "aspect ratio over the 50:1 limit" in rec["reason"]


# ---------------------------------------------------------------- plots a user can trust

def test_expert_load_plots_what_varies_with_experts_numbered_per_modality():
    """2t2i expert choice: every expert takes exactly its capacity, so the shares of routed
    slots are a constant 0.5/0.5 whatever the router learnt. The plot shows the share of the
    modality's tokens each expert took (its capacity here; it varies under top-2 routing or
    another capacity factor) beside the share that reached no expert, which the router decides
    (none here: two experts under centred selection split the tokens)."""
    import torch

    from mmtok.trainer.config import ModelConfig
    from mmtok.trainer.evaluate import _stack, load_bars, score
    from mmtok.trainer.model import Decoder

    torch.manual_seed(0)
    cfg = ModelConfig(model="moma", experts="2t2i", vocab_size=256, image_range=(192, 256), n_layers=2, d_model=32,
                      n_heads=4, ffn_hidden=64, max_seq_len=32)
    model = Decoder(cfg).eval()
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(4):
        x = np.concatenate([rng.integers(16, 192, 20), rng.integers(192, 256, 12)])
        rows.append((x, np.roll(x, -1), np.zeros(32, np.int8)))
    load = score(model, iter([_stack(rows, 32)]))["expert_load"]
    for g in ("text", "image"):
        assert load[g]["share"] == pytest.approx([0.5, 0.5], abs=1e-9)  # expert choice: constant, not worth a plot
        taken, unrouted = load[g]["taken"], load[g]["unrouted"]
        # each expert takes its capacity (half the group's tokens); with two experts the centred
        # selection scores are opposite, so they split the tokens and none is left unrouted
        assert taken == pytest.approx([0.5, 0.5], abs=1 / 40)
        assert unrouted == pytest.approx(0.0, abs=1 / 40)
    bars = load_bars(load)
    assert [b[1] for b in bars] == ["text 0", "text 1", "text none", "image 0", "image 1", "image none"]
    assert [b[2] for b in bars] == [*load["text"]["taken"], load["text"]["unrouted"],
                                    *load["image"]["taken"], load["image"]["unrouted"]]


def test_expert_load_figure_labels_every_bar():
    import matplotlib

    matplotlib.use("Agg")
    from mmtok.trainer.evaluate import expert_load_figure

    load = {"text": {"share": [0.5, 0.5], "taken": [0.6, 0.4], "unrouted": 0.25},
            "image": {"share": [0.5, 0.5], "taken": [0.5, 0.5], "unrouted": 0.1}}
    fig = expert_load_figure(load)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["text 0", "text 1", "text none", "image 0", "image 1",
                                                             "image none"]
    assert [round(p.get_height(), 6) for p in ax.patches] == [0.6, 0.4, 0.25, 0.5, 0.5, 0.1]


def test_uni_moe_routing_figure_has_a_colour_bar():
    import matplotlib

    matplotlib.use("Agg")
    from mmtok.trainer.unimoe_train import routing_figure

    routing = {"0": {"speech": [0.7, 0.3], "image": [0.2, 0.8]}, "1": {"speech": [0.5, 0.5], "image": [0.4, 0.6]}}
    fig = routing_figure(routing, ["e0", "e1"])
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1 and bars[0].get_ylim() == (0.0, 1.0)


def test_unrouted_share_goes_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mmtok.trainer.metrics import Metrics

    m = Metrics(tmp_path, 0, 0)
    m.write({"step": 1, "loss": 2.0, "expert_load": {"text": [0.5, 0.5]}, "unrouted": {"text": 0.25, "image": 0.125}})
    m.close()
    ev = EventAccumulator(str(tmp_path / "tb"))
    ev.Reload()
    assert {"unrouted/text", "unrouted/image"} <= set(ev.Tags()["scalars"])
    assert ev.Scalars("unrouted/text")[0].value == pytest.approx(0.25)
