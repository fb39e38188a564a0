"""extract-keyframes: frames come from the right times, in every mode and odd case.

Test videos are made with ffmpeg: each frame is a flat grey whose level is 8 x its frame
number, so a frame's mean brightness says which source frame it is. The ground truth for
"the frame shown at time t" comes from decoding every frame with its timestamp.
"""

from __future__ import annotations

import io
import json
import random
import re
import subprocess

import numpy as np
import pytest
from PIL import Image

from mmtok.media import ffmpeg_exe, packet_timing, probe_video
from mmtok.shards import ShardReader
from mmtok.video import FrameOptions, _strongest_cuts, extract_frames, extract_keyframes, uniform_times


def ffmpeg(*args):
    subprocess.run([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args], check=True)


def counter_video(path, seconds=3, fps=10, gop=10, size="64x48", vf_extra="", extra=()):
    vf = f"nullsrc=s={size}:r={fps}:d={seconds},format=gray,geq=lum='N*8'{vf_extra}"
    ffmpeg("-f", "lavfi", "-i", vf, "-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", str(gop), *extra, str(path))
    return path


def decode_all(path):
    """Every frame of the video as (timestamp, frame number from its brightness)."""
    out = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path), "-vf", "scale=16:16,showinfo",
                          "-f", "rawvideo", "-pix_fmt", "gray", "-fps_mode", "passthrough", "-"], capture_output=True)
    times = [float(t) for t in re.findall(r"pts_time:([\d.]+)", out.stderr.decode())]
    levels = np.frombuffer(out.stdout, np.uint8).reshape(-1, 16, 16).mean(axis=(1, 2))
    return list(zip(times, np.rint(levels / 8).astype(int)))


def frame_number(img) -> int:
    return int(np.rint(np.asarray(img.convert("L"), dtype=float).mean() / 8))


def shown_at(truth, t):
    return [n for ts, n in truth if ts <= t + 1e-9][-1]


def test_uniform_frames_come_from_the_segment_centres(tmp_path):
    v = counter_video(tmp_path / "c.mp4")
    frames = extract_frames(str(v), FrameOptions(size=32), duration=3.0)
    assert [round(f.time, 4) for f in frames] == [round(t, 4) for t in uniform_times(3.0, 8)]
    # at 10 fps the frame shown at t is number floor(10 t)
    assert [frame_number(f.image) for f in frames] == [int(10 * t) for t in uniform_times(3.0, 8)]
    assert all(f.image.size == (32, 32) and f.scene_score is None for f in frames)


def test_uniform_on_variable_frame_rate(tmp_path):
    # slow first half (5 fps), fast second half (20 fps)
    v = counter_video(tmp_path / "vfr.mp4", extra=("-fps_mode", "vfr"),
                      vf_extra=",settb=1/1000,setpts='if(lt(N,10),N*0.2,2+(N-10)*0.05)/TB'")
    truth = decode_all(v)
    assert len({round(b - a, 3) for (a, _), (b, _) in zip(truth, truth[1:])}) > 1  # really VFR
    duration = 3.0
    frames = extract_frames(str(v), FrameOptions(size=32), duration)
    assert [frame_number(f.image) for f in frames] == [shown_at(truth, t) for t in uniform_times(duration, 8)]


def test_video_shorter_than_n_frames_repeats_frames(tmp_path):
    v = counter_video(tmp_path / "short.mp4", seconds=0.3, fps=10)  # 3 frames
    frames = extract_frames(str(v), FrameOptions(size=32, frames=8), duration=0.3)
    nums = [frame_number(f.image) for f in frames]
    assert len(nums) == 8
    assert nums == [int(10 * t) for t in uniform_times(0.3, 8)]  # 0,0,0,1,1,2,2,2


def test_keyframes_mode_returns_only_i_frames(tmp_path):
    v = counter_video(tmp_path / "gop.mp4", seconds=3, fps=10, gop=10)
    frames = extract_frames(str(v), FrameOptions(mode="keyframes", size=32, frames=8), duration=3.0)
    assert [(round(f.time, 2), frame_number(f.image)) for f in frames] == [(0.0, 0), (1.0, 10), (2.0, 20)]
    capped = extract_frames(str(v), FrameOptions(mode="keyframes", size=32, frames=2), duration=3.0)
    assert [frame_number(f.image) for f in capped] == [0, 20]  # spaced at least 3/2 s apart


def test_scene_mode_finds_the_cuts(tmp_path):
    v = tmp_path / "scenes.mp4"
    src = "color=c={}:s=64x48:r=10:d=1"
    ffmpeg("-f", "lavfi", "-i", src.format("red"), "-f", "lavfi", "-i", src.format("blue"), "-f", "lavfi",
           "-i", src.format("green"), "-filter_complex", "[0][1][2]concat=n=3:v=1", "-c:v", "libx264",
           "-pix_fmt", "yuv420p", str(v))
    frames = extract_frames(str(v), FrameOptions(mode="scene", size=16), duration=3.0)
    assert [round(f.time, 1) for f in frames] == [0.0, 1.0, 2.0]
    colours = [np.asarray(f.image).reshape(-1, 3).mean(0).argmax() for f in frames]
    assert colours == [0, 2, 1]  # red, blue, green


# Grey level of each 0.5 s segment of a 10 fps video: weak steps of 6 early, strong jumps of
# 20, 40 and 30 later, then one more weak step at the very end, so that the first N cuts,
# the last N and the strongest N are three different sets.
GREYS = (100, 106, 112, 118, 138, 178, 148, 154)
SCENE = dict(mode="scene", size=32, scene_threshold=0.03)  # every one of the 7 cuts passes


def greys_video(path):
    inputs = []
    for g in GREYS:
        inputs += ["-f", "lavfi", "-i", f"color=c=0x{g:02x}{g:02x}{g:02x}:s=64x48:r=10:d=0.5"]
    concat = "".join(f"[{i}]" for i in range(len(GREYS))) + f"concat=n={len(GREYS)}:v=1"
    ffmpeg(*inputs, "-filter_complex", concat, "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path))
    return path


def grey(img) -> float:
    return float(np.asarray(img, dtype=float).mean())


def test_scene_mode_keeps_the_strongest_cuts_in_time_order(tmp_path):
    v = greys_video(tmp_path / "greys.mp4")
    four = extract_frames(str(v), FrameOptions(frames=4, **SCENE), None)
    assert [round(f.time, 1) for f in four] == [0.0, 2.0, 2.5, 3.0]
    assert [grey(f.image) for f in four] == pytest.approx([100, 138, 178, 148], abs=2)
    first, *cuts = [f.scene_score for f in four]
    assert first is None
    # ffmpeg's score of a cut between flat frames: mean absolute RGB difference / 100
    assert cuts == pytest.approx([0.2, 0.4, 0.3], abs=0.03)

    three = extract_frames(str(v), FrameOptions(frames=3, **SCENE), None)
    assert [round(f.time, 1) for f in three] == [0.0, 2.5, 3.0]
    assert [f.scene_score for f in three[1:]] == [cuts[1], cuts[2]]
    assert [round(f.time, 1) for f in extract_frames(str(v), FrameOptions(frames=1, **SCENE), None)] == [0.0]


def test_scene_mode_with_fewer_cuts_than_asked_returns_them_all(tmp_path):
    v = greys_video(tmp_path / "greys.mp4")
    frames = extract_frames(str(v), FrameOptions(frames=20, **SCENE), None)
    assert [round(f.time, 1) for f in frames] == [i / 2 for i in range(len(GREYS))]
    assert [grey(f.image) for f in frames] == pytest.approx(GREYS, abs=2)
    weak = [f.scene_score for i, f in enumerate(frames) if i in (1, 2, 3, 7)]
    assert 0.03 < max(weak) < min(f.scene_score for f in frames[4:7])
    # a higher threshold leaves only the strong cuts as candidates
    strong = extract_frames(str(v), FrameOptions(**{**SCENE, "frames": 20, "scene_threshold": 0.15}), None)
    assert [round(f.time, 1) for f in strong] == [0.0, 2.0, 2.5, 3.0]


def test_strongest_cuts_matches_a_full_sort_and_keeps_earlier_on_ties():
    rng = random.Random(0)
    stream = [(i / 10, 4, 4, rng.choice([0.4, 0.5, 0.6, 0.7]), bytes([i % 256]) * 48) for i in range(500)]
    for n in (1, 2, 9, 600):
        kept = _strongest_cuts(iter(stream), n)
        # reference: sort the candidates after the first by score, highest first, earlier first on ties
        ranked = sorted(range(1, len(stream)), key=lambda i: (-stream[i][3], i))[: n - 1]
        assert kept == [stream[0][:3] + (None, stream[0][4])] + [stream[i] for i in sorted(ranked)]


def test_scene_stage_records_each_frames_score(tmp_path):
    v = greys_video(tmp_path / "greys.mp4")
    out = tmp_path / "out"
    extract_keyframes([str(v)], str(out), FrameOptions(frames=3, **SCENE), progress=False)
    metas = [meta for _, meta, _ in _frames_of(out)]
    assert [(m["timestamp"], m["mode"]) for m in metas] == [(0.0, "scene"), (2.5, "scene"), (3.0, "scene")]
    scores = [m["scene_score"] for m in metas]
    assert scores[0] is None and scores[1:] == pytest.approx([0.4, 0.3], abs=0.03)
    uniform = tmp_path / "uniform"
    extract_keyframes([str(v)], str(uniform), FrameOptions(frames=2, size=16), progress=False)
    assert all("scene_score" not in meta for _, meta, _ in _frames_of(uniform))

def test_rotation_metadata_is_applied(tmp_path):
    flat = tmp_path / "flat.mp4"
    ffmpeg("-f", "lavfi", "-i", "nullsrc=s=64x48:r=10:d=1,format=gray,geq=lum='if(lt(X,32),255,0)'",
           "-c:v", "libx264", "-pix_fmt", "yuv420p", str(flat))
    rot = tmp_path / "rot.mp4"
    try:  # a display matrix: newer ffmpeg sets it so and ignores a `rotate` tag; 5.1 has only the tag
        ffmpeg("-display_rotation:v", "90", "-i", str(flat), "-c", "copy", str(rot))
    except subprocess.CalledProcessError:
        ffmpeg("-i", str(flat), "-c", "copy", "-metadata:s:v", "rotate=90", str(rot))
    assert probe_video(str(rot))["rotation"] == 90.0
    im = extract_frames(str(rot), FrameOptions(size=32, crop=False, frames=1), duration=1.0)[0].image
    a = np.asarray(im.convert("L"), dtype=float)
    assert im.size == (24, 32)  # portrait once rotated
    assert abs(a[:4].mean() - a[-4:].mean()) > 200  # the white half is now on top or bottom
    assert abs(a[:, :4].mean() - a[:, -4:].mean()) < 10


def test_odd_sizes_crop_and_fit(tmp_path):
    v = counter_video(tmp_path / "odd.mp4", seconds=1, size="65x47", extra=("-pix_fmt", "yuv444p"))
    sq = extract_frames(str(v), FrameOptions(size=33, frames=1), duration=1.0)[0].image
    fit = extract_frames(str(v), FrameOptions(size=33, crop=False, frames=1), duration=1.0)[0].image
    assert sq.size == (33, 33)
    assert max(fit.size) == 33 and abs(fit.size[0] / fit.size[1] - 65 / 47) < 0.1


def _frames_of(out):
    r = ShardReader(out)
    return [(s.key, s.meta, s.members["jpg"]) for s in r]


def test_stage_writes_image_shards_and_quarantines_bad_inputs(tmp_path):
    (tmp_path / "in").mkdir()
    good = counter_video(tmp_path / "in" / "good.mp4")
    raw = tmp_path / "in" / "raw.h264"  # no duration in any header
    ffmpeg("-i", str(good), "-c", "copy", "-f", "h264", str(raw))
    (tmp_path / "in" / "garbage.mp4").write_bytes(b"this is not a video" * 100)
    truncated = tmp_path / "in" / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    ffmpeg("-f", "lavfi", "-i", "sine=f=440:d=1", str(tmp_path / "in" / "sound.mkv"))  # no video stream

    out = tmp_path / "out"
    s = extract_keyframes([str(tmp_path / "in"), str(raw)], str(out), FrameOptions(size=32), progress=False,
                          max_error_rate=1.0)
    assert s.items == 5 and s.samples == 16 and s.quarantined == 3
    reasons = {json.loads(l)["input"].split("/")[-1]: json.loads(l)["reason"] for l in (out / "quarantine.jsonl").open()}
    assert set(reasons) == {"garbage.mp4", "truncated.mp4", "sound.mkv"}
    assert "Invalid data" in reasons["garbage.mp4"] and "moov atom not found" in reasons["truncated.mp4"]
    assert reasons["sound.mkv"].startswith("ffmpeg: ")

    frames = _frames_of(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [sh["group"] for sh in manifest["shards"]] == ["image-jpg"]
    by_parent, jpgs = {}, {}
    for key, meta, jpg in frames:
        assert meta["modality"] == "image" and meta["mode"] == "uniform" and key == f"{meta['parent']}_f{meta['frame_index']:03d}"
        assert Image.open(io.BytesIO(jpg)).size == (32, 32)
        by_parent.setdefault(meta["source"].split("/")[-1], []).append(meta["timestamp"])
        jpgs.setdefault(meta["source"].split("/")[-1], []).append(jpg)
    assert by_parent["good.mp4"] == [round(t, 4) for t in uniform_times(3.0, 8)]
    # the raw stream holds the same 30 frames at 10 fps: the same times, the same frames
    assert by_parent["raw.h264"] == by_parent["good.mp4"] and jpgs["raw.h264"] == jpgs["good.mp4"]


def test_duration_without_a_header_comes_from_the_packets(tmp_path):
    # ffmpeg's own guess for these differs by version (raw h264 of 3 s: 5.1 says 2.7 s,
    # 9.0 assumes 25 fps and says 1.2 s); the packet listing gives 3 s with both
    good = counter_video(tmp_path / "good.mp4", seconds=3, fps=10)
    raw = tmp_path / "raw.h264"
    ffmpeg("-i", str(good), "-c", "copy", "-f", "h264", str(raw))
    streamed = tmp_path / "streamed.webm"  # written to a pipe: no duration in its header
    with streamed.open("wb") as f:
        subprocess.run([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-f", "lavfi", "-i",
                        "nullsrc=s=64x48:r=10:d=3", "-c:v", "libvpx", "-f", "webm", "pipe:"], stdout=f, check=True)
    for v in (raw, streamed):
        assert packet_timing(str(v)) == (3.0, 10.0)
        info = probe_video(str(v))
        assert (info["duration"], info["fps"]) == (3.0, 10.0)
    assert probe_video(str(good))["duration"] == 3.0  # from the header


@pytest.fixture
def chosen_ffmpeg(monkeypatch):
    """Set MMTOK_FFMPEG for one test; the binary is looked up once per process, so the
    lookup is redone before and after."""
    def choose(value):
        monkeypatch.setenv("MMTOK_FFMPEG", str(value))
        ffmpeg_exe.cache_clear()

    yield choose
    monkeypatch.undo()
    ffmpeg_exe.cache_clear()


def fake_ffmpeg(path, version_line):
    path.write_text(f"#!/bin/sh\necho '{version_line}'\n")
    path.chmod(0o755)
    return path


def test_mmtok_ffmpeg_picks_the_binary_and_old_or_missing_ones_are_refused(tmp_path, chosen_ffmpeg):
    from typer.testing import CliRunner

    from mmtok.cli.app import app

    real = ffmpeg_exe()
    chosen_ffmpeg(fake_ffmpeg(tmp_path / "ffmpeg-dev", "ffmpeg version N-118000-g0123abcd Copyright (c) 2000-2025"))
    assert ffmpeg_exe() == str(tmp_path / "ffmpeg-dev")  # a development build is let through
    chosen_ffmpeg(real)
    assert ffmpeg_exe() == real

    v = counter_video(tmp_path / "v.mp4", seconds=1)
    for value, words in [(fake_ffmpeg(tmp_path / "ffmpeg44", "ffmpeg version 4.4.2-0ubuntu0.22.04.1 Copyright"),
                          ["is ffmpeg 4.4", "needs ffmpeg 5.1 or newer"]),
                         (tmp_path / "nowhere" / "ffmpeg", ["MMTOK_FFMPEG=", "no such executable"]),
                         (fake_ffmpeg(tmp_path / "other", "something else 1.0"), ["not an ffmpeg binary"])]:
        chosen_ffmpeg(value)
        with pytest.raises(ValueError, match=words[-1]):
            ffmpeg_exe()
        res = CliRunner().invoke(app, ["extract-keyframes", str(v), "--out", str(tmp_path / "o")])
        assert res.exit_code == 2 and all(w in res.output for w in words) and "Traceback" not in res.output, res.output
        assert not (tmp_path / "o").exists()  # refused before any video is touched


def test_output_is_identical_whatever_the_worker_count(tmp_path):
    (tmp_path / "in").mkdir()
    for i in range(3):
        counter_video(tmp_path / "in" / f"v{i}.mp4", seconds=1 + i)
    a, b = tmp_path / "a", tmp_path / "b"
    extract_keyframes([str(tmp_path / "in")], str(a), FrameOptions(size=24), progress=False, workers=1)
    extract_keyframes([str(tmp_path / "in")], str(b), FrameOptions(size=24), progress=False, workers=2)
    assert (a / "image-jpg-000000.tar").read_bytes() == (b / "image-jpg-000000.tar").read_bytes()


def test_cli_extract_keyframes(tmp_path):
    from typer.testing import CliRunner

    from mmtok.cli.app import app

    counter_video(tmp_path / "v.mp4", seconds=2)
    res = CliRunner().invoke(app, ["extract-keyframes", str(tmp_path / "v.mp4"), "--out", str(tmp_path / "o"),
                                   "--frames", "4", "--size", "32", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["samples"] == 4 and summary["by_modality"] == {"image": 4}
    bad = CliRunner().invoke(app, ["extract-keyframes", str(tmp_path / "v.mp4"), "--out", str(tmp_path / "o2"),
                                   "--mode", "bogus"])
    assert bad.exit_code == 2 and "unknown mode" in bad.output
