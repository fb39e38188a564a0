"""`mmtok extract-keyframes` and `mmtok extract-audio`."""

from __future__ import annotations

from typing import List

import typer

from mmtok.cli.common import (BACKEND, JSON_OUT, MAX_COUNT, MAX_ERROR_RATE, OVERWRITE, QUIET, WORKERS, check_inputs,
                               friendly_errors, not_a_file, report)

INPUTS = typer.Argument(..., help="Shard directories made by `mmtok shard`, directories of media files "
                        "(walked recursively, by extension) or single files, in any mix.")
OUT = typer.Option(..., "--out", "-o", help="Output shard directory, or a URL (s3://...).")


def register(app: typer.Typer) -> None:
    app.command("extract-keyframes", no_args_is_help=True)(extract_keyframes)
    app.command("extract-audio", no_args_is_help=True)(extract_audio)


@friendly_errors
def extract_keyframes(
    inputs: List[str] = INPUTS,
    out: str = OUT,
    mode: str = typer.Option("uniform", "--mode", help="uniform: N frames evenly spread over the duration; "
                             "keyframes: I-frames only (no full decode, fast); scene: the first frame and the N-1 strongest scene changes, in time order."),
    frames: int = typer.Option(8, "--frames", "-n", min=1, help="Frames per video (uniform), or at most this many (keyframes, scene)."),
    size: int = typer.Option(336, "--size", min=1, help="Output frames are SIZE x SIZE (short side resized, centre crop)."),
    crop: bool = typer.Option(True, "--crop/--no-crop", help="--no-crop fits the whole frame inside SIZE x SIZE."),
    scene_threshold: float = typer.Option(0.3, "--scene-threshold", min=0.0, max=1.0, help="Scene-change score (0-1) above which "
                                          "a frame starts a new scene (--mode scene)."),
    quality: int = typer.Option(95, "--quality", min=1, max=100, help="JPEG quality of the frames."),
    workers: int = WORKERS,
    backend: str = BACKEND,
    max_count: int = MAX_COUNT,
    max_error_rate: float = MAX_ERROR_RATE,
    overwrite: bool = OVERWRITE,
    as_json: bool = JSON_OUT,
    quiet: bool = QUIET,
) -> None:
    """Extract frames from videos into image shards (group image-jpg) that tokenize-images reads.

    Each frame keeps its timestamp and its source video's key (meta `parent`). Videos that
    ffmpeg cannot open (no video stream, truncated, garbage) are quarantined with ffmpeg's
    reason. Rerun the same command to resume.

    Example: mmtok extract-keyframes shards/ --out frames/ --mode uniform --frames 8 --size 336
    """
    from mmtok.video import FrameOptions, extract_keyframes as run

    not_a_file(out)
    check_inputs(inputs, out)
    opts = FrameOptions(mode=mode, frames=frames, size=size, crop=crop, scene_threshold=scene_threshold,
                        quality=quality)
    summary = run(list(inputs), out, opts, workers=workers, backend=backend, max_count=max_count,
                  max_error_rate=max_error_rate, overwrite=overwrite, progress=not quiet and not as_json)
    report(summary, as_json)


@friendly_errors
def extract_audio(
    inputs: List[str] = INPUTS,
    out: str = OUT,
    features: str = typer.Option("whisper,fbank", "--features", help="Comma-separated: whisper (log-mel, "
                                 "n_mels x 3000 per 30 s chunk), fbank (BEATs' Kaldi fbank, 128 bins)."),
    n_mels: int = typer.Option(80, "--n-mels", help="Whisper mel bins: 80, or 128 (large-v3)."),
    max_chunks: int = typer.Option(20, "--max-chunks", min=1, help="30 s chunks per input at most; the rest is dropped."),
    workers: int = WORKERS,
    backend: str = BACKEND,
    max_count: int = MAX_COUNT,
    max_error_rate: float = MAX_ERROR_RATE,
    overwrite: bool = OVERWRITE,
    as_json: bool = JSON_OUT,
    quiet: bool = QUIET,
) -> None:
    """Decode audio (and videos' audio tracks) to 16 kHz mono and store Whisper / fbank features.

    Output group `audio_features`: members whisper.npy and/or fbank.npy (float16) and json
    (shapes, chunk times, sample rate, source key). Undecodable audio is quarantined with
    ffmpeg's reason; videos without an audio track are skipped. Rerun the same command to resume.

    Example: mmtok extract-audio shards/ --out audio-feats/ --features whisper,fbank --n-mels 80
    """
    from mmtok.audio import AudioOptions, extract_audio as run

    not_a_file(out)
    check_inputs(inputs, out)
    opts = AudioOptions(features=tuple(f.strip() for f in features.split(",") if f.strip()), n_mels=n_mels,
                        max_chunks=max_chunks)
    summary = run(list(inputs), out, opts, workers=workers, backend=backend, max_count=max_count,
                  max_error_rate=max_error_rate, overwrite=overwrite, progress=not quiet and not as_json)
    report(summary, as_json)
