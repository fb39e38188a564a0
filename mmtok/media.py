"""ffmpeg access: the system binary when present, else the one the imageio-ffmpeg wheel
carries. Commands are built with ffmpeg-python and run as argument lists, never
through a shell."""

from __future__ import annotations

import functools
import re
import shutil


@functools.lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    exe = shutil.which("ffmpeg")
    if exe:
        return exe
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


class MediaError(Exception):
    """ffmpeg could not read the input; the message carries ffmpeg's own reason."""


def _last_error_line(stderr: bytes) -> str:
    lines = [l.strip() for l in stderr.decode("utf-8", "replace").splitlines() if l.strip()]
    errs = [l for l in lines if "rror" in l or "nvalid" in l or "not found" in l or "no such" in l.lower()]
    return (errs or lines or ["ffmpeg failed without a message"])[-1][:300]


_DURATION = re.compile(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?)")
_VIDEO = re.compile(r"Stream #\d+:\d+.*?: Video: (\w+).*?, (\d{2,5})x(\d{2,5})")
_FPS = re.compile(r"([\d.]+) (?:fps|tbr)")
_ROTATION = re.compile(r"rotation of (-?[\d.]+) degrees")
_AUDIO = re.compile(r"Stream #\d+:\d+.*?: Audio: (\w+)")


def probe_video(path: str) -> dict:
    """Open a video and decode its first frame; return duration, size, codec, fps, rotation.

    Uses ffmpeg itself (ffprobe is not in the imageio-ffmpeg wheel). Raises MediaError with
    ffmpeg's reason when the file has no decodable video stream.
    """
    import ffmpeg

    cmd = (
        ffmpeg.input(path)
        .output("-", format="null", map="0:v:0", **{"frames:v": 1})
        .global_args("-hide_banner", "-nostdin")
    )
    try:
        _, err = cmd.run(cmd=ffmpeg_exe(), capture_stdout=True, capture_stderr=True)
    except ffmpeg.Error as e:
        raise MediaError(_last_error_line(e.stderr)) from None
    text = err.decode("utf-8", "replace")
    m = _VIDEO.search(text)
    if not m:
        raise MediaError("no video stream")
    d = _DURATION.search(text)
    fps = _FPS.search(text[m.start():])
    rot = _ROTATION.search(text)
    return {
        "codec": m.group(1),
        "width": int(m.group(2)),
        "height": int(m.group(3)),
        "duration": round(int(d.group(1)) * 3600 + int(d.group(2)) * 60 + float(d.group(3)), 3) if d else None,
        "fps": float(fps.group(1)) if fps else None,
        "rotation": float(rot.group(1)) if rot else 0.0,
        "has_audio": bool(_AUDIO.search(text)),
    }
