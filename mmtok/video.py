"""Video frames for image tokenizers and video encoders: the `extract-keyframes` stage.

One ffmpeg process decodes each video and hands back only the chosen frames, already
resized, as raw RGB on a pipe (a second, much cheaper one first reads the header:
duration; skipped for shard inputs, whose duration `mmtok shard` recorded). Modes:

- `uniform`: N frames, the frame shown at the centre of each of N equal segments of the
  duration (the `fps` filter with rate N/duration, offset half a segment, rounding up:
  for each target time it keeps the last frame that starts at or before it). Videos with
  fewer than N frames repeat frames, so the count is always N.
- `keyframes`: I-frames only; the decoder skips every other frame (`-skip_frame nokey`),
  which is what makes it fast. At most N: the first I-frame in each 1/N of the duration.
- `scene`: the first frame and every frame whose scene-change score exceeds a threshold;
  at most N (the first N in time).

ffmpeg applies rotation metadata itself (autorotate) and copes with variable frame rates
(all selection is by timestamp). Frames are resized so the short side is `size` and
centre-cropped to a square (or, with crop=False, fitted inside a size x size box), then
encoded as JPEG.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass

from mmtok.media import MediaError, MediaSource, error_reason, probe_video, run_ffmpeg, stream_duration
from mmtok.runner import Quarantined, Sample

MODES = ("uniform", "keyframes", "scene")
_SHOWINFO = re.compile(r"\] n:\s*\d+ pts:\s*-?\d+ pts_time:(-?[\d.e+-]+).*? s:(\d+)x(\d+)")


@dataclass(frozen=True)
class FrameOptions:
    mode: str = "uniform"
    frames: int = 8
    size: int = 336
    crop: bool = True
    scene_threshold: float = 0.3
    quality: int = 95

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.frames < 1:
            raise ValueError("--frames must be at least 1")
        if not 16 <= self.size <= 4096:
            raise ValueError("--size must be between 16 and 4096 pixels")
        if not 0.0 < self.scene_threshold < 1.0:
            raise ValueError("--scene-threshold must be between 0 and 1")
        if not 1 <= self.quality <= 100:
            raise ValueError("--quality must be between 1 and 100")


def uniform_times(duration: float, n: int) -> list[float]:
    """Centres of n equal segments of [0, duration]."""
    return [(i + 0.5) * duration / n for i in range(n)]


def _command(path: str, opts: FrameOptions, duration: float):
    import ffmpeg

    n = opts.frames
    inp = ffmpeg.input(path, skip_frame="nokey") if opts.mode == "keyframes" else ffmpeg.input(path)
    v = inp["v:0"]
    if opts.mode == "uniform":
        v = v.filter("fps", fps=f"{n}/{duration:.6f}", start_time=f"{duration / (2 * n):.6f}", round="up")
    elif opts.mode == "keyframes":
        # the first keyframe in each 1/n of the duration
        slot = f"floor(t*{n / duration:.9f})"
        v = v.filter("select", f"isnan(prev_selected_t)+gt({slot},{slot.replace('t*', 'prev_selected_t*')})")
    if opts.crop:
        v = v.filter("scale", opts.size, opts.size, force_original_aspect_ratio="increase").filter("crop", opts.size, opts.size)
    else:
        v = v.filter("scale", opts.size, opts.size, force_original_aspect_ratio="decrease")
    if opts.mode == "scene":  # scored on the small frames: same cuts, far less work
        v = v.filter("select", f"eq(n,0)+gt(scene,{opts.scene_threshold})")
    v = v.filter("showinfo")
    return v.output("pipe:", format="rawvideo", pix_fmt="rgb24", fps_mode="passthrough", an=None, sn=None,
                    **{"frames:v": n})


def extract_frames(path: str, opts: FrameOptions, duration: float | None) -> list[tuple[float, "object"]]:
    """Decode the chosen frames of one video: [(timestamp_seconds, PIL image)], in time order."""
    from PIL import Image

    raw, err = run_ffmpeg(_command(path, opts, duration))
    infos = [(float(t), int(w), int(h)) for t, w, h in _SHOWINFO.findall(err)]
    frames, pos = [], 0
    for t, w, h in infos:
        size = w * h * 3
        if pos + size > len(raw):
            break
        frames.append((t, Image.frombuffer("RGB", (w, h), raw[pos:pos + size], "raw", "RGB", 0, 1)))
        pos += size
    if not frames:
        raise MediaError(f"no frame could be decoded ({error_reason(err)})")
    if opts.mode == "uniform":
        # the fps filter stamps its own slot times; name each frame by the time it shows.
        # Past the last frame's end (videos shorter than N frames) the last frame repeats.
        times = uniform_times(duration, opts.frames)
        frames = [(t, frames[min(i, len(frames) - 1)][1]) for i, t in enumerate(times)]
    return frames


def keyframes_stage(payload, opts: FrameOptions) -> list:
    """Stage function: one video -> frame samples (group image-jpg), or a quarantine record."""
    try:
        with MediaSource(payload) as src:
            # `mmtok shard` has already probed shard inputs; plain files are probed here
            duration = src.parent_meta.get("duration")
            if not duration and opts.mode != "scene":
                info = probe_video(src.path)
                duration = info["duration"] or stream_duration(src.path, info["fps"])
                if not duration or duration <= 0:
                    return Quarantined("", "video duration is unknown and its packets carry no timestamps")
            frames = extract_frames(src.path, opts, duration)
    except MediaError as e:
        return Quarantined("", f"ffmpeg: {e}")
    out = []
    for i, (t, img) in enumerate(frames):
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=opts.quality)
        data = buf.getvalue()
        meta = {
            "modality": "image",
            "source": src.source,
            "parent": src.key,
            "parent_sha256": src.sha256,
            "sha256": hashlib.sha256(data).hexdigest(),
            "timestamp": round(t, 4),
            "frame_index": i,
            "mode": opts.mode,
            "width": img.width,
            "height": img.height,
            "format": "jpg",
            "video_duration": round(duration, 4) if duration else None,
        }
        out.append(Sample(f"{src.key}_f{i:03d}", "image-jpg", {"jpg": data}, meta,
                          {"parent": src.key, "timestamp": meta["timestamp"]}))
    return out


def extract_keyframes(inputs: list[str], out: str, opts: FrameOptions, **run_kw):
    """Run the extract-keyframes stage over shard dirs / files; returns the runner Summary."""
    import functools

    from mmtok.media import VIDEO_EXTS, media_items
    from mmtok.runner import run_stage

    items, total = media_items(inputs, ("video",), VIDEO_EXTS)
    config = {"inputs": [str(i) for i in inputs], **opts.__dict__}
    return run_stage("extract-keyframes", items, functools.partial(keyframes_stage, opts=opts), out,
                     config=config, total=total, **run_kw)
