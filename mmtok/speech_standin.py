"""Speech with known text for demos and tests.

espeak-ng says the text when it is installed (Debian package `espeak-ng`). Otherwise a
procedural stand-in "says" it: each letter is a short two-partial tone whose pitches are a
fixed function of the letter, spaces and punctuation are pauses. The sound is a
deterministic function of the text, so a model can learn to transcribe it.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np

SAMPLE_RATE = 16000
LETTER_S, PAUSE_S = 0.07, 0.05


def _letter(c: str) -> np.ndarray:
    i = ord(c) % 64
    t = np.arange(int(LETTER_S * SAMPLE_RATE)) / SAMPLE_RATE
    f1, f2 = 180 + 35 * (i % 16), 900 + 140 * (i // 16 + (i % 5))
    envelope = np.sin(np.pi * t / LETTER_S) ** 2  # no clicks between letters
    return (0.5 * np.sin(2 * np.pi * f1 * t) + 0.3 * np.sin(2 * np.pi * f2 * t)) * envelope


def standin(text: str) -> np.ndarray:
    """float32 mono at 16 kHz."""
    parts = [_letter(c) if c.isalnum() else np.zeros(int(PAUSE_S * SAMPLE_RATE)) for c in text.lower()]
    return (0.6 * np.concatenate(parts or [np.zeros(1)])).astype(np.float32)


def espeak(text: str) -> np.ndarray | None:
    """espeak-ng's rendering at 16 kHz, or None when espeak-ng is not installed."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        return None
    import io

    import soundfile as sf

    wav = subprocess.run([exe, "--stdout", text], capture_output=True, check=True).stdout
    data, sr = sf.read(io.BytesIO(wav), dtype="float32")
    if data.ndim > 1:
        data = data.mean(1)
    n = int(len(data) * SAMPLE_RATE / sr)
    return np.interp(np.arange(n) * sr / SAMPLE_RATE, np.arange(len(data)), data).astype(np.float32)


def speak(text: str) -> tuple[np.ndarray, str]:
    """(waveform at 16 kHz, "espeak-ng" or "standin")."""
    wave = espeak(text)
    return (wave, "espeak-ng") if wave is not None else (standin(text), "standin")
