"""extract-keyframes against plain ffmpeg, side by side on the same videos.

1. uniform 8 frames (mmtok's whole stage: one ffmpeg per video + JPEG + shard writing)
   against the equivalent single ffmpeg command line (fps filter, resize, crop, JPEG files,
   duration known in advance). Aim: at most 1.2x its time. Measured on a shard directory
   (the normal input: `mmtok shard` has recorded each duration) and on plain files (one
   extra ffmpeg process per video reads the duration).
2. `--mode keyframes` against decoding every frame of the same videos. Aim: >= 5x faster.
3. `--mode scene` 8 frames against the single ffmpeg command line that writes every frame
   passing the same scene threshold as a JPEG (mmtok decodes the same candidates, then
   keeps the 8 strongest). Aim: at most 1.2x its time. Run on videos that cut every 2 s
   (a hue jump), so there are far more candidates than frames asked for.

The videos are noisy testsrc2 clips (noise makes them decode like camera footage rather
than flat synthetic colour), H.264, one I-frame every 2 s.

Run: .venv/bin/python benchmarks/bench_keyframes.py [--videos 3 --seconds 60]
Writes benchmarks/results/keyframes.json.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from benchutil import best_of, save
from mmtok.media import ffmpeg_exe
from mmtok.video import FrameOptions, extract_frames, extract_keyframes


def make_videos(d: Path, n: int, seconds: int, size: str, cuts: bool = False) -> list[Path]:
    d.mkdir()
    paths = []
    for i in range(n):
        p = d / f"v{i}.mp4"
        hue = f"'{i * 40}+90*floor(t/2)'" if cuts else i * 40  # cuts: the hue jumps every 2 s
        subprocess.run([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                        f"testsrc2=s={size}:r=25:d={seconds},hue=h={hue},noise=alls=8:allf=t", "-c:v", "libx264",
                        "-preset", "veryfast", "-g", "50", "-pix_fmt", "yuv420p", str(p)], check=True)
        paths.append(p)
    return paths


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--videos", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--size", default="640x360")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        videos = make_videos(tmp / "videos", args.videos, args.seconds, args.size)
        subprocess.run([sys.executable, "-m", "mmtok.cli.app", "shard", str(tmp / "videos"), "--out",
                        str(tmp / "shards"), "--quiet", "--json"], check=True, capture_output=True)
        size, n = 336, 8

        def ffmpeg_jpegs(vids, prefix, vf, *extra):
            """The baseline: one ffmpeg command per video writing its frames as JPEGs."""
            for v in vids:
                out = tmp / f"{prefix}-{v.stem}"
                out.mkdir(exist_ok=True)
                subprocess.run([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", "-i", str(v),
                                "-vf", vf, "-an", *extra, "-q:v", "2", str(out / "%03d.jpg")], check=True)

        def ffmpeg_uniform():
            ffmpeg_jpegs(videos, "ff", f"fps={n}/{args.seconds}:start_time={args.seconds / (2 * n)}:round=up,"
                         f"scale={size}:{size}:force_original_aspect_ratio=increase,crop={size}:{size}",
                         "-frames:v", str(n))

        runs = iter(range(1000))

        def mmtok_uniform(source):
            extract_keyframes([str(tmp / source)], str(tmp / f"out{next(runs)}"), FrameOptions(size=size, frames=n),
                              progress=False)

        def decode_all():
            for v in videos:
                subprocess.run([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-i", str(v),
                                "-an", "-f", "null", "-"], check=True)

        def mmtok_keyframes():
            for v in videos:
                extract_frames(str(v), FrameOptions(mode="keyframes", size=size, frames=n), float(args.seconds))

        cut_videos = make_videos(tmp / "cuts", args.videos, args.seconds, args.size, cuts=True)

        def ffmpeg_scene():
            ffmpeg_jpegs(cut_videos, "ffs", f"scale={size}:{size}:force_original_aspect_ratio=increase,"
                         f"crop={size}:{size},select='eq(n,0)+gt(scene,0.3)'", "-fps_mode", "passthrough")

        def mmtok_scene():
            for v in cut_videos:
                extract_frames(str(v), FrameOptions(mode="scene", size=size, frames=n), None)

        t_ff = best_of(ffmpeg_uniform, args.repeat)
        t_mm = best_of(lambda: mmtok_uniform("shards"), args.repeat)
        t_files = best_of(lambda: mmtok_uniform("videos"), args.repeat)
        t_all, t_key = best_of(decode_all, args.repeat), best_of(mmtok_keyframes, args.repeat)
        t_ff_scene, t_scene = best_of(ffmpeg_scene, args.repeat), best_of(mmtok_scene, args.repeat)
    result = {
        "videos": args.videos, "seconds_each": args.seconds, "resolution": args.size, "fps": 25, "gop": 50,
        "uniform8_ffmpeg_cli_s": round(t_ff, 3), "uniform8_mmtok_shards_s": round(t_mm, 3),
        "uniform8_ratio_shards": round(t_mm / t_ff, 3), "uniform8_mmtok_files_s": round(t_files, 3),
        "uniform8_ratio_files": round(t_files / t_ff, 3), "uniform8_aim": "<= 1.2",
        "decode_every_frame_s": round(t_all, 3), "keyframes_mode_s": round(t_key, 3),
        "keyframes_speedup": round(t_all / t_key, 2), "keyframes_aim": ">= 5",
        "scene8_ffmpeg_cli_s": round(t_ff_scene, 3), "scene8_mmtok_s": round(t_scene, 3),
        "scene8_ratio": round(t_scene / t_ff_scene, 3), "scene8_aim": "<= 1.2",
    }
    save(Path(__file__).parent / "results" / "keyframes.json", result)


if __name__ == "__main__":
    main()
