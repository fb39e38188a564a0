"""Audio and speech features for encoder-fused models: the `extract-audio` stage.

Any audio ffmpeg decodes (wav, flac, mp3, ogg, a video's audio track) becomes 16 kHz mono
float32, is cut into 30 s chunks (at most `max_chunks`, as Uni-MoE does), and becomes:

- `whisper`: Whisper's log-mel, computed exactly as openai-whisper does for each chunk
  padded to 30 s: (chunks, n_mels, 3000).
- `fbank`: BEATs' input features, Kaldi fbank (128 bins, 25 ms / 10 ms, povey window,
  pre-emphasis 0.97, DC removal, natural log) of the whole decoded clip scaled by 2^15, then
  BEATs' normalisation: (frames, 128). A clip shorter than one 25 ms frame is zero-padded
  to one frame.

Both are implemented here with torch (no torchaudio or whisper at run time); the tests
hold them to the reference implementations.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

from mmtok.media import AUDIO_EXTS, VIDEO_EXTS, MediaError, MediaSource, media_items, run_ffmpeg
from mmtok.runner import Quarantined, Sample
from mmtok.shards import content_hash

SAMPLE_RATE = 16_000
CHUNK_SECONDS = 30
CHUNK_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE
WHISPER_N_FFT, WHISPER_HOP = 400, 160
FBANK_BINS, FBANK_WINDOW, FBANK_SHIFT, FBANK_FFT = 128, 400, 160, 512  # 25 ms / 10 ms at 16 kHz
BEATS_MEAN, BEATS_STD = 15.41663, 6.55582
FEATURES = ("whisper", "fbank")
GROUP = "audio_features"


@dataclass(frozen=True)
class AudioOptions:
    features: tuple[str, ...] = FEATURES
    n_mels: int = 80
    max_chunks: int = 20

    def __post_init__(self):
        bad = [f for f in self.features if f not in FEATURES]
        if bad or not self.features:
            raise ValueError(f"unknown --features {','.join(bad) or '(none)'}; choose from {','.join(FEATURES)}")
        if self.n_mels not in (80, 128):
            raise ValueError("--n-mels must be 80 or 128 (the two Whisper front ends)")
        if self.max_chunks < 1:
            raise ValueError("--max-chunks must be at least 1")


# --- decoding ---------------------------------------------------------------------------

_DURATION = re.compile(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?)")


def decode_audio(path: str, max_seconds: float | None = None):
    """First audio stream -> (16 kHz mono float32 numpy array, source duration or None).

    ffmpeg downmixes and resamples (one process). MediaError carries ffmpeg's reason, or
    says the file has no audio stream."""
    import ffmpeg
    import numpy as np

    kw = {"t": max_seconds} if max_seconds else {}
    cmd = ffmpeg.input(path).output("pipe:", format="f32le", acodec="pcm_f32le", ac=1, ar=SAMPLE_RATE,
                                    map="0:a:0", vn=None, sn=None, dn=None, **kw)
    raw, err = run_ffmpeg(cmd)
    d = _DURATION.search(err)
    duration = int(d.group(1)) * 3600 + int(d.group(2)) * 60 + float(d.group(3)) if d else None
    return np.frombuffer(raw, np.float32).copy(), duration  # writable, for torch


def wave_problem(wave) -> str | None:
    """Why a decoded waveform cannot become features, or None; `mmtok shard` asks the same,
    so that an audio file it keeps is one this stage reads."""
    import numpy as np

    if len(wave) == 0:
        return "no audio samples could be decoded (empty or truncated stream)"
    if not np.isfinite(wave).all():
        return "decoded audio contains NaN or infinite samples"
    return None


# --- Whisper log-mel --------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def whisper_mel_filters(n_mels: int):
    """Slaney-normalised mel filters, as openai-whisper ships them (made with librosa)."""
    import librosa
    import torch

    return torch.from_numpy(librosa.filters.mel(sr=SAMPLE_RATE, n_fft=WHISPER_N_FFT, n_mels=n_mels)).float()


def whisper_log_mel(chunks, n_mels: int = 80):
    """(C, 480000) float32 chunks -> (C, n_mels, 3000) Whisper log-mel, each chunk
    floored at its own max - 8 as Whisper does when it sees that chunk alone."""
    import torch

    x = torch.as_tensor(chunks, dtype=torch.float32)
    window, filters = torch.hann_window(WHISPER_N_FFT), whisper_mel_filters(n_mels)
    out = torch.empty(x.shape[0], n_mels, CHUNK_SAMPLES // WHISPER_HOP)
    for i, chunk in enumerate(x):  # one chunk at a time stays in cache; a batch of 20 does not
        spec = torch.stft(chunk, WHISPER_N_FFT, WHISPER_HOP, window=window, return_complex=True)[..., :-1]
        log_spec = torch.matmul(filters, spec.abs().square_()).clamp_(min=1e-10).log10_()
        log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
        out[i] = log_spec.add_(4.0).div_(4.0)
    return out


# --- Kaldi fbank as BEATs calls it ------------------------------------------------------

@functools.lru_cache(maxsize=None)
def kaldi_mel_banks():
    """Kaldi's triangular mel filters (mel = 1127 ln(1 + f/700), 20 Hz to Nyquist), as
    (FBANK_FFT // 2 + 1, 128) for a right-multiply."""
    import torch

    def mel(f):
        return 1127.0 * torch.log(1.0 + f / 700.0)

    low, high = mel(torch.tensor(20.0, dtype=torch.float64)), mel(torch.tensor(SAMPLE_RATE / 2, dtype=torch.float64))
    delta = (high - low) / (FBANK_BINS + 1)
    left = low + delta * torch.arange(FBANK_BINS, dtype=torch.float64).unsqueeze(1)
    center, right = left + delta, left + 2 * delta
    bins = mel(SAMPLE_RATE / FBANK_FFT * torch.arange(FBANK_FFT // 2, dtype=torch.float64)).unsqueeze(0)
    up, down = (bins - left) / (center - left), (right - bins) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)
    return torch.nn.functional.pad(banks, (0, 1)).float().T  # the Nyquist bin gets no weight


def beats_fbank(wave):
    """16 kHz mono float waveform in [-1, 1] -> (frames, 128) normalised BEATs fbank."""
    import torch

    x = torch.as_tensor(wave, dtype=torch.float32) * 32768.0
    if x.numel() < FBANK_WINDOW:
        x = torch.nn.functional.pad(x, (0, FBANK_WINDOW - x.numel()))
    frames = x.unfold(0, FBANK_WINDOW, FBANK_SHIFT)  # Kaldi snip_edges: whole frames only
    frames = frames - frames.mean(dim=1, keepdim=True)
    prev = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - 0.97 * prev
    window = torch.hann_window(FBANK_WINDOW, periodic=False).pow(0.85)  # Kaldi's povey window
    frames = torch.nn.functional.pad(frames * window, (0, FBANK_FFT - FBANK_WINDOW))
    power = torch.view_as_real(torch.fft.rfft(frames)).pow(2).sum(-1)
    energies = torch.clamp(power @ kaldi_mel_banks(), min=torch.finfo(torch.float32).eps).log()
    return (energies - BEATS_MEAN) / (2 * BEATS_STD)


# --- the stage ---------------------------------------------------------------------------

def _npy(array) -> bytes:
    import numpy as np

    from mmtok.shards import npy_bytes

    return npy_bytes(np.ascontiguousarray(array, dtype=np.float16))


def audio_features(wave, opts: AudioOptions) -> tuple[dict[str, bytes], dict]:
    """Waveform -> ({member: npy bytes}, metadata about shapes and chunk times)."""
    import numpy as np

    n_chunks = min(opts.max_chunks, max(1, math.ceil(len(wave) / CHUNK_SAMPLES)))
    wave = wave[: n_chunks * CHUNK_SAMPLES]
    chunks = [[float(i * CHUNK_SECONDS), round(min(len(wave), (i + 1) * CHUNK_SAMPLES) / SAMPLE_RATE, 4)]
              for i in range(n_chunks)]
    members, meta = {}, {"chunks": chunks}
    if "whisper" in opts.features:
        padded = np.zeros((n_chunks, CHUNK_SAMPLES), np.float32)
        padded.reshape(-1)[: len(wave)] = wave
        mel = whisper_log_mel(padded, opts.n_mels).numpy()
        members["whisper.npy"] = _npy(mel)
        meta["whisper"] = {"shape": list(mel.shape), "n_mels": opts.n_mels, "frame_shift": 0.01}
    if "fbank" in opts.features:
        fb = beats_fbank(wave).numpy()
        members["fbank.npy"] = _npy(fb)
        meta["fbank"] = {"shape": list(fb.shape), "bins": FBANK_BINS, "frame_length": 0.025, "frame_shift": 0.01}
    return members, meta


def audio_stage(payload, opts: AudioOptions):
    """Stage function: one audio file (or a video's audio track) -> one feature sample."""
    src = MediaSource(payload)
    try:
        with src:
            wave, duration = decode_audio(src.path, opts.max_chunks * CHUNK_SECONDS)
    except MediaError as e:
        if "matches no streams" in str(e) and src.ext in VIDEO_EXTS:
            return []  # a silent video: nothing to extract, nothing wrong with it
        return Quarantined("", f"ffmpeg: {e}")
    problem = wave_problem(wave)
    if problem:
        return Quarantined("", problem)
    members, meta = audio_features(wave, opts)
    meta.update({
        "modality": GROUP,
        "source": src.source,
        "parent": src.key,
        "parent_sha256": src.sha256,
        "sha256": content_hash(members),
        "sample_rate": SAMPLE_RATE,
        "duration": round(len(wave) / SAMPLE_RATE, 4),
        "source_duration": duration,
        "features": list(opts.features),
        "dtype": "float16",
    })
    return Sample(f"{src.key}_audio", GROUP, members, meta, {"parent": src.key, "duration": meta["duration"]})


def extract_audio(inputs: list[str], out: str, opts: AudioOptions, **run_kw):
    """Run the extract-audio stage over shard dirs / files; returns the runner Summary."""
    from mmtok.mirror import run_stage_to

    items, total = media_items(inputs, ("audio", "video"), AUDIO_EXTS + VIDEO_EXTS)
    config = {"inputs": [str(i) for i in inputs], "features": list(opts.features), "n_mels": opts.n_mels,
              "max_chunks": opts.max_chunks}
    return run_stage_to(out, "extract-audio", items, functools.partial(audio_stage, opts=opts),
                        config=config, total=total, **run_kw)
