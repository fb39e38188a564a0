"""extract-audio: decoding to 16 kHz mono, Whisper log-mel and BEATs fbank held to the
reference implementations (openai-whisper, torchaudio's Kaldi fbank), and the stage."""

from __future__ import annotations

import io
import json
import subprocess

import numpy as np
import pytest
import soundfile as sf
import torch

from mmtok.audio import AudioOptions, audio_features, beats_fbank, decode_audio, extract_audio, whisper_log_mel
from mmtok.media import ffmpeg_exe
from mmtok.shards import ShardReader, content_hash

SR = 16_000


def ffmpeg(*args):
    subprocess.run([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args], check=True)


def speech_like(seconds: float, sr: int = SR, seed: int = 0) -> np.ndarray:
    """Voiced harmonics on a wandering pitch, syllable-rate envelope, a little breath noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voiced = sum(np.sin(k * phase) / k for k in range(1, 20))
    envelope = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) ** 2
    return (0.3 * voiced * envelope + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def whisper_reference(wave: np.ndarray, n_mels: int) -> torch.Tensor:
    import whisper.audio as wa

    chunks = [wave[i:i + 480_000] for i in range(0, max(len(wave), 1), 480_000)]
    return torch.stack([wa.log_mel_spectrogram(wa.pad_or_trim(torch.from_numpy(c.copy())), n_mels) for c in chunks])


def fbank_reference(wave: np.ndarray) -> torch.Tensor:
    import torchaudio.compliance.kaldi as kaldi

    # exactly what BEATs.preprocess does
    fb = kaldi.fbank(torch.from_numpy(wave.copy()).unsqueeze(0) * 2 ** 15, num_mel_bins=128,
                     sample_frequency=16000, frame_length=25, frame_shift=10)
    return (fb - 15.41663) / (2 * 6.55582)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_whisper_log_mel_matches_openai_whisper(n_mels):
    wave = speech_like(33.0)  # two chunks, the second mostly padding
    padded = np.zeros((2, 480_000), np.float32)
    padded.reshape(-1)[: wave.size] = wave
    ours = whisper_log_mel(padded, n_mels)
    ref = whisper_reference(wave, n_mels)
    assert ours.shape == ref.shape == (2, n_mels, 3000)
    assert (ours - ref).abs().max().item() <= 1e-3


@pytest.mark.parametrize("seconds", [0.025, 0.7, 12.345])
def test_fbank_matches_torchaudio_kaldi_as_beats_calls_it(seconds):
    wave = speech_like(seconds, seed=1)
    ours, ref = beats_fbank(wave), fbank_reference(wave)
    assert ours.shape == ref.shape == (1 + (wave.size - 400) // 160, 128)
    assert (ours - ref).abs().max().item() <= 1e-3


def test_stored_features_are_float16_of_the_reference():
    wave = speech_like(3.0)
    members, meta = audio_features(wave, AudioOptions(n_mels=80))
    mel = np.load(io.BytesIO(members["whisper.npy"]), allow_pickle=False)
    fb = np.load(io.BytesIO(members["fbank.npy"]), allow_pickle=False)
    assert mel.dtype == fb.dtype == np.float16
    assert list(mel.shape) == meta["whisper"]["shape"] == [1, 80, 3000]
    assert list(fb.shape) == meta["fbank"]["shape"] == [298, 128]
    assert np.abs(mel.astype(np.float32) - whisper_reference(wave, 80).numpy()).max() <= 2e-3
    assert np.abs(fb.astype(np.float32) - fbank_reference(wave).numpy()).max() <= 5e-3
    assert meta["chunks"] == [[0.0, 3.0]]


def _peak_hz(wave, sr=SR):
    spec = np.abs(np.fft.rfft(wave))
    return np.argmax(spec) * sr / wave.size


@pytest.mark.parametrize("fmt,rate,channels", [("wav", 8000, 1), ("flac", 44100, 2), ("mp3", 44100, 2), ("ogg", 22050, 1)])
def test_decode_any_rate_and_layout_to_16k_mono(tmp_path, fmt, rate, channels):
    path = tmp_path / f"tone.{fmt}"
    ffmpeg("-f", "lavfi", "-i", f"sine=f=300:d=2:r={rate}", "-ac", str(channels), str(path))
    wave, duration = decode_audio(str(path))
    assert wave.dtype == np.float32 and abs(wave.size - 2 * SR) < 0.05 * SR
    assert abs(duration - 2.0) < 0.06
    assert abs(_peak_hz(wave) - 300) < 2


def test_audio_track_of_a_video(tmp_path):
    path = tmp_path / "av.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=s=64x48:r=10:d=1", "-f", "lavfi", "-i", "sine=f=500:d=1", "-c:v", "libx264",
           "-c:a", "aac", "-shortest", str(path))
    wave, _ = decode_audio(str(path))
    assert abs(_peak_hz(wave) - 500) < 3


def test_silence_clipping_and_tiny_clips_give_finite_features():
    silence = np.zeros(SR, np.float32)
    clipped = np.clip(8 * np.sin(2 * np.pi * 200 * np.arange(SR) / SR), -1, 1).astype(np.float32)
    tiny = speech_like(0.01)  # shorter than one 25 ms fbank frame
    for wave in (silence, clipped, tiny):
        members, meta = audio_features(wave, AudioOptions())
        for name in ("whisper.npy", "fbank.npy"):
            assert np.isfinite(np.load(io.BytesIO(members[name]))).all()
    assert np.allclose(whisper_log_mel(np.zeros((1, 480_000), np.float32)).numpy(), -1.5)  # log10(1e-10)=-10
    assert audio_features(tiny, AudioOptions())[1]["fbank"]["shape"] == [1, 128]


def test_chunks_and_max_chunks():
    wave = np.tile(speech_like(5.0), 13)  # 65 s
    _, meta = audio_features(wave, AudioOptions(features=("whisper",)))
    assert meta["chunks"] == [[0.0, 30.0], [30.0, 60.0], [60.0, 65.0]]
    assert meta["whisper"]["shape"] == [3, 80, 3000] and "fbank" not in meta
    _, capped = audio_features(wave, AudioOptions(max_chunks=2))
    assert capped["chunks"] == [[0.0, 30.0], [30.0, 60.0]] and capped["fbank"]["shape"][0] == 1 + (60 * SR - 400) // 160


def _make_inputs(d):
    d.mkdir()
    sf.write(d / "speech.wav", speech_like(2.0), SR, subtype="PCM_16")
    sf.write(d / "stereo.flac", np.stack([speech_like(1.5, 44100), speech_like(1.5, 44100, 2)], 1), 44100)
    (d / "garbage.wav").write_bytes(b"RIFF not really" * 50)
    (d / "empty.mp3").write_bytes(b"")
    ffmpeg("-f", "lavfi", "-i", "testsrc=s=64x48:r=10:d=1", "-c:v", "libx264", str(d / "silent.mp4"))


def test_stage_writes_feature_shards_quarantines_and_skips(tmp_path):
    _make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    s = extract_audio([str(tmp_path / "in")], str(out), AudioOptions(), progress=False, max_error_rate=1.0)
    assert (s.items, s.samples, s.quarantined) == (5, 2, 2)
    reasons = {json.loads(l)["input"].rsplit("/", 1)[-1]: json.loads(l)["reason"] for l in (out / "quarantine.jsonl").open()}
    assert set(reasons) == {"garbage.wav", "empty.mp3"} and all(r.startswith("ffmpeg: ") for r in reasons.values())
    samples = list(ShardReader(out))
    assert {sm.shard for sm in samples} == {"audio_features-000000.tar"}
    for sm in samples:
        assert set(sm.members) == {"json", "whisper.npy", "fbank.npy"}
        meta = sm.meta
        assert meta["modality"] == "audio_features" and meta["sample_rate"] == SR and sm.key == f"{meta['parent']}_audio"
        for name in ("whisper", "fbank"):
            assert list(np.load(io.BytesIO(sm.members[f"{name}.npy"])).shape) == meta[name]["shape"]
    durations = sorted(sm.meta["duration"] for sm in samples)
    assert durations == [1.5, 2.0]


def test_shard_directory_input_and_cli(tmp_path):
    from typer.testing import CliRunner

    from mmtok.cli.app import app

    d = tmp_path / "raw"
    d.mkdir()
    sf.write(d / "speech.wav", speech_like(1.0), SR)
    ffmpeg("-f", "lavfi", "-i", "testsrc=s=64x48:r=10:d=1", "-f", "lavfi", "-i", "sine=f=500:d=1", "-c:v", "libx264",
           "-c:a", "aac", "-shortest", str(d / "clip.mp4"))
    runner = CliRunner()
    res = runner.invoke(app, ["shard", str(d), "--out", str(tmp_path / "shards"), "--json"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["extract-audio", str(tmp_path / "shards"), "--out", str(tmp_path / "feats"),
                              "--features", "whisper", "--n-mels", "128", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["samples"] == 2 and summary["by_group"] == {"audio_features": 2}
    # sources and parents point back at the input shards' samples
    parents = {sm.key: sm.meta["source"] for sm in ShardReader(tmp_path / "shards")}
    feats = list(ShardReader(tmp_path / "feats"))
    assert sorted(sm.meta["source"] for sm in feats) == sorted(parents.values())
    assert all(parents[sm.meta["parent"]] == sm.meta["source"] for sm in feats)
    assert all(set(sm.members) == {"json", "whisper.npy"} for sm in feats)
    res = runner.invoke(app, ["extract-keyframes", str(tmp_path / "shards"), "--out", str(tmp_path / "frames"),
                              "--frames", "2", "--size", "16", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["samples"] == 2
    # shard, extract-audio and extract-keyframes agree on what a sample's sha256 is
    shas = {sm.key: sm.meta["sha256"] for sm in ShardReader(tmp_path / "shards")}
    for stage in ("shards", "feats", "frames"):
        for sm in ShardReader(tmp_path / stage):
            assert sm.meta["sha256"] == content_hash({e: b for e, b in sm.members.items() if e != "json"}), (stage, sm.key)
            if stage != "shards":  # and a derived sample names its parent by the parent's sha256
                assert sm.meta["parent_sha256"] == shas[sm.meta["parent"]]
    bad = runner.invoke(app, ["extract-audio", str(d), "--out", str(tmp_path / "x"), "--n-mels", "64"])
    assert bad.exit_code == 2 and "--n-mels must be 80 or 128" in bad.output
