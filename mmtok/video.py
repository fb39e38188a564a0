"""Video frames for image tokenizers and video encoders: the `extract-keyframes` stage.

One ffmpeg process decodes each video and streams back only the chosen frames, already
resized, as raw RGB on a pipe (a second, much cheaper one first reads the header:
duration, or where the header states none, the packets' timestamps; skipped for shard
inputs, whose duration `mmtok shard` recorded). Modes:

- `uniform`: N frames, the frame shown at the centre of each of N equal segments of the
  duration (the `fps` filter with rate N/duration, offset half a segment, rounding up:
  for each target time it keeps the last frame that starts at or before it). Videos with
  fewer than N frames repeat frames, so the count is always N.
- `keyframes`: I-frames only; the decoder skips every other frame (`-skip_frame nokey`),
  which is what makes it fast. At most N: the first I-frame in each 1/N of the duration.
- `scene`: the first frame and the N-1 strongest scene changes, in time order. ffmpeg
  passes on only the frames whose scene-change score exceeds a threshold, with their
  scores; the N-1 best of those are kept while they stream in, so memory stays at N frames
  however many cuts a video has. The whole video is decoded (a strong cut may come last).

ffmpeg applies rotation metadata itself (autorotate) and copes with variable frame rates
(all selection is by timestamp). Frames are resized so the short side is `size` and
centre-cropped to a square (or, with crop=False, fitted inside a size x size box), then
encoded as JPEG.
"""

from __future__ import annotations

import heapq
import io
import queue
import re
import threading
from dataclasses import dataclass
from typing import NamedTuple

from mmtok.media import MediaError, MediaSource, error_reason, ffmpeg_exe, probe_video
from mmtok.runner import Quarantined, Sample
from mmtok.shards import content_hash

MODES = ("uniform", "keyframes", "scene")
_SHOWINFO = re.compile(r"\] n:\s*\d+ pts:\s*-?\d+ pts_time:(-?[\d.e+-]+).*? s:(\d+)x(\d+)")
_SCENE_SCORE = re.compile(r"lavfi\.scene_score=([\d.]+)")
_FILTER_LOG = ("[Parsed_showinfo", "[Parsed_metadata")  # per-frame lines: parsed, not kept for errors


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


class Frame(NamedTuple):
    time: float  # seconds
    image: "object"  # PIL image
    scene_score: float | None = None  # scene mode: ffmpeg's score of the cut this frame starts


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
    cap = {"frames:v": n}
    if opts.mode == "scene":  # scored on the small frames: same cuts, far less work
        # Every frame is scaled and scored here. Left to itself ffmpeg scales straight from
        # YUV to RGB, a slow path costing twice the whole decode; scaling in YUV and then
        # converting at the small size is ~3x faster, and the scores stay RGB ones.
        v = v.filter("format", "yuv420p").filter("format", "rgb24")
        v = v.filter("select", f"eq(n,0)+gt(scene,{opts.scene_threshold})")
        v = v.filter("metadata", mode="print", key="lavfi.scene_score")  # logs each candidate's score
        cap = {}  # every candidate: the strongest are chosen afterwards
    v = v.filter("showinfo")
    return v.output("pipe:", format="rawvideo", pix_fmt="rgb24", fps_mode="passthrough", an=None, sn=None, **cap)


def _decoded_frames(cmd):
    """Run one ffmpeg-python command; yield (timestamp, width, height, scene score or None,
    rgb24 bytes) for each frame as it arrives on the pipe.

    The log is read on a thread, since both pipes must drain or ffmpeg blocks. A frame's
    showinfo line (and, before it, its score) is logged before the frame reaches the pipe,
    so each frame's size is known before it is read. Raises MediaError with ffmpeg's reason
    when it fails or gives no frame."""
    proc = cmd.global_args("-hide_banner", "-nostdin", "-nostats").run_async(
        cmd=ffmpeg_exe(), pipe_stdout=True, pipe_stderr=True)
    infos, log = queue.SimpleQueue(), []

    def read_log():
        score = None
        for line in io.TextIOWrapper(proc.stderr, errors="replace"):
            if m := _SHOWINFO.search(line):
                infos.put((float(m[1]), int(m[2]), int(m[3]), score))
                score = None
            elif m := _SCENE_SCORE.search(line):
                score = float(m[1])
            elif not line.startswith(_FILTER_LOG):
                log.append(line)
        infos.put(None)

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    count, finished = 0, False
    try:
        for t, w, h, score in iter(infos.get, None):
            data = proc.stdout.read(w * h * 3)
            if len(data) < w * h * 3:  # more frames went through the filters than were output
                break
            count += 1
            yield t, w, h, score, data
        finished = True
    finally:
        if not finished:  # the caller gave up: stop decoding
            proc.kill()
        proc.stdout.close()
        returncode = proc.wait()
        reader.join()
    if returncode != 0:
        raise MediaError(error_reason("".join(log)))
    if not count:
        raise MediaError(f"no frame could be decoded ({error_reason(''.join(log))})")


def _strongest_cuts(decoded, n: int) -> list:
    """The first frame and the n-1 highest-scoring frames after it, in time order, holding
    at most n frames at any time. Ties keep the earlier frame."""
    t, w, h, _, data = next(decoded)
    best = []  # min-heap on (score, -arrival): its root is the frame to drop next
    for i, frame in enumerate(decoded):
        if len(best) < n - 1:
            heapq.heappush(best, (frame[3], -i, frame))
        else:
            heapq.heappushpop(best, (frame[3], -i, frame))
    return [(t, w, h, None, data)] + [frame for *_, frame in sorted(best, key=lambda b: -b[1])]


def extract_frames(path: str, opts: FrameOptions, duration: float | None) -> list[Frame]:
    """Decode the chosen frames of one video, in time order."""
    from PIL import Image

    decoded = _decoded_frames(_command(path, opts, duration))
    if opts.mode == "scene":
        decoded = _strongest_cuts(decoded, opts.frames)
    frames = [Frame(t, Image.frombuffer("RGB", (w, h), data, "raw", "RGB", 0, 1), score)
              for t, w, h, score, data in decoded]
    if opts.mode == "uniform":
        # the fps filter stamps its own slot times; name each frame by the time it shows.
        # Past the last frame's end (videos shorter than N frames) the last frame repeats.
        times = uniform_times(duration, opts.frames)
        frames = [Frame(t, frames[min(i, len(frames) - 1)].image) for i, t in enumerate(times)]
    return frames


def keyframes_stage(payload, opts: FrameOptions) -> list:
    """Stage function: one video -> frame samples (group image-jpg), or a quarantine record."""
    try:
        with MediaSource(payload) as src:
            # `mmtok shard` has already probed shard inputs; plain files are probed here
            duration = src.parent_meta.get("duration")
            if not duration and opts.mode != "scene":
                duration = probe_video(src.path)["duration"]
                if not duration or duration <= 0:
                    return Quarantined("", "video duration is unknown: neither its header nor its packets give one")
            frames = extract_frames(src.path, opts, duration)
    except MediaError as e:
        return Quarantined("", f"ffmpeg: {e}")
    out = []
    for i, (t, img, score) in enumerate(frames):
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=opts.quality)
        data = buf.getvalue()
        meta = {
            "modality": "image",
            "source": src.source,
            "parent": src.key,
            "parent_sha256": src.sha256,
            "sha256": content_hash({"jpg": data}),
            "timestamp": round(t, 4),
            "frame_index": i,
            "mode": opts.mode,
            "width": img.width,
            "height": img.height,
            "format": "jpg",
            "video_duration": round(duration, 4) if duration else None,
        }
        if opts.mode == "scene":
            meta["scene_score"] = None if score is None else round(score, 4)
        out.append(Sample(f"{src.key}_f{i:03d}", "image-jpg", {"jpg": data}, meta,
                          {"parent": src.key, "timestamp": meta["timestamp"], "image_sha256": meta["sha256"]}))
    return out


def extract_keyframes(inputs: list[str], out: str, opts: FrameOptions, **run_kw):
    """Run the extract-keyframes stage over shard dirs / files; returns the runner Summary."""
    import functools

    from mmtok.media import VIDEO_EXTS, media_items
    from mmtok.mirror import run_stage_to

    ffmpeg_exe()  # a missing or too old ffmpeg stops the command here, not each video
    items, total = media_items(inputs, ("video",), VIDEO_EXTS)
    config = {"inputs": [str(i) for i in inputs], **opts.__dict__}
    return run_stage_to(out, "extract-keyframes", items, functools.partial(keyframes_stage, opts=opts),
                        config=config, total=total, **run_kw)
