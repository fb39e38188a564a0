"""Audio features against the reference implementations, side by side on the same audio.

- Whisper log-mel: mmtok's `whisper_log_mel` (chunk by chunk, in-place post-processing)
  against openai-whisper's `log_mel_spectrogram` called per chunk as Uni-MoE's
  loader does (pad_or_trim, then log-mel). Aim: at least as fast.
- fbank: mmtok's `beats_fbank` against `torchaudio.compliance.kaldi.fbank` (BEATs' call).

Run: .venv/bin/python benchmarks/bench_audio.py [--minutes 10]
Writes benchmarks/results/audio.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from benchutil import save
from mmtok.audio import CHUNK_SAMPLES, beats_fbank, whisper_log_mel


def best_of_pair(a, b, repeat):
    """Min time of each, runs interleaved (a, b, a, b, ...) so that load from other
    processes on a shared machine hits both alike."""
    a(), b()  # warm-up: filter banks, allocator
    ta, tb = [], []
    for _ in range(repeat):
        for fn, times in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return min(ta), min(tb)


def main():
    import torchaudio.compliance.kaldi as kaldi
    import whisper.audio as wa

    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--repeat", type=int, default=9)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    wave = (0.1 * rng.standard_normal(int(args.minutes * 60 * 16000))).astype(np.float32)
    n = -(-wave.size // CHUNK_SAMPLES)
    padded = np.zeros((n, CHUNK_SAMPLES), np.float32)
    padded.reshape(-1)[: wave.size] = wave

    def ours_whisper():
        whisper_log_mel(padded, 80)

    def ref_whisper():
        for i in range(n):
            wa.log_mel_spectrogram(wa.pad_or_trim(torch.from_numpy(wave[i * CHUNK_SAMPLES:(i + 1) * CHUNK_SAMPLES])), 80)

    def ours_fbank():
        beats_fbank(wave)

    def ref_fbank():
        kaldi.fbank(torch.from_numpy(wave).unsqueeze(0) * 2 ** 15, num_mel_bins=128, sample_frequency=16000,
                    frame_length=25, frame_shift=10)

    w_ours, w_ref = best_of_pair(ours_whisper, ref_whisper, args.repeat)
    f_ours, f_ref = best_of_pair(ours_fbank, ref_fbank, args.repeat)
    result = {
        "audio_seconds": wave.size / 16000, "chunks": n, "torch_threads": torch.get_num_threads(),
        "whisper_mmtok_s": round(w_ours, 4), "whisper_openai_s": round(w_ref, 4),
        "whisper_speedup": round(w_ref / w_ours, 2), "whisper_aim": ">= 1.0",
        "fbank_mmtok_s": round(f_ours, 4), "fbank_torchaudio_s": round(f_ref, 4),
        "fbank_speedup": round(f_ref / f_ours, 2),
    }
    save(Path(__file__).parent / "results" / "audio.json", result)


if __name__ == "__main__":
    main()
