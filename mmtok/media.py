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


_ERROR_WORDS = ("rror", "nvalid", "not found", "no such", "matches no streams", "corrupt")
_LOG_PREFIX = re.compile(r"^\[[^\]]+ @ 0x[0-9a-f]+\] ")


def error_reason(stderr: bytes | str) -> str:
    """ffmpeg's own reason, from its log: the first two distinct error lines (the first is
    usually the specific one, e.g. 'moov atom not found', the next its consequence)."""
    text = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else stderr
    lines = [_LOG_PREFIX.sub("", l.strip()) for l in text.splitlines() if l.strip()]
    # "Terminating thread ..." repeats a thread's error, racing with the other threads' lines:
    # left out, so that the reason (and the quarantine log) is the same on every run
    errs = list(dict.fromkeys(l for l in lines if any(w in l.lower() for w in _ERROR_WORDS)
                              and not l.startswith("Terminating thread")))
    return "; ".join(errs[:2])[:300] if errs else (lines[-1][:300] if lines else "ffmpeg failed without a message")


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
        raise MediaError(error_reason(e.stderr)) from None
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


def run_ffmpeg(stream) -> tuple[bytes, str]:
    """Run an ffmpeg-python command (one process, no shell); return (stdout, stderr text).

    Raises MediaError with ffmpeg's own reason when it fails."""
    import ffmpeg

    cmd = stream.global_args("-hide_banner", "-nostdin")
    try:
        out, err = cmd.run(cmd=ffmpeg_exe(), capture_stdout=True, capture_stderr=True)
    except ffmpeg.Error as e:
        raise MediaError(error_reason(e.stderr)) from None
    return out, err.decode("utf-8", "replace")


_TIME = re.compile(r"time=(\d+):(\d+):(\d+(?:\.\d+)?)")
_FRAMES = re.compile(r"frame=\s*(\d+)")


def stream_duration(path: str, fps: float | None = None) -> float | None:
    """Duration of the first video stream found by reading its packets without decoding
    them, for containers whose header states none (streamed webm/mkv, raw h264). Packets
    without timestamps (raw streams) give frame count / fps, as ffmpeg itself assumes."""
    import ffmpeg

    cmd = ffmpeg.input(path).output("-", format="null", map="0:v:0", c="copy").global_args("-stats")
    _, err = run_ffmpeg(cmd)
    times = _TIME.findall(err)
    if times:
        h, m, s = times[-1]
        return int(h) * 3600 + int(m) * 60 + float(s)
    frames = _FRAMES.findall(err)
    return int(frames[-1]) / fps if frames and fps else None


# --- inputs: shard directories made by `mmtok shard`, or plain files -------------------

VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")
AUDIO_EXTS = ("wav", "flac", "mp3", "ogg")
_KEY_SAFE = re.compile(r"[^A-Za-z0-9_-]+")


def file_key(path: str, data: bytes) -> str:
    """A key for a plain file: its readable stem plus a content hash (no dots or slashes)."""
    import hashlib
    import os

    stem = _KEY_SAFE.sub("_", os.path.splitext(os.path.basename(path))[0]).strip("_")[:40] or "file"
    return f"{stem}-{hashlib.sha256(data).hexdigest()[:12]}"


def media_items(inputs: list[str], modalities: tuple[str, ...], exts: tuple[str, ...]):
    """Enumerate media inputs as runner Items, lazily, in a deterministic order.

    Each input is a shard directory (it has a manifest.json; groups `<modality>-<ext>` and
    `<modality>_pair-<ext>` are read with ShardReader), a directory of plain files (walked
    recursively, by extension), or a single file. Payloads are
    `(key, ext, data_or_path, parent_meta)`. Returns (items, total).
    """
    from pathlib import Path

    from mmtok.shards import MANIFEST, ShardReader

    readers, files, total = [], [], 0
    for inp in inputs:
        p = Path(inp)
        if not p.exists():
            raise FileNotFoundError(f"{inp}: no such file or directory")
        if p.is_dir() and (p / MANIFEST).exists():
            r = ShardReader(p)
            groups = tuple(sorted({s["group"] for s in r.manifest["shards"]
                                   if s["group"].split("-")[0] in modalities + tuple(m + "_pair" for m in modalities)}))
            r.groups = groups
            r.check()
            readers.append(r)
            total += sum(s["samples"] for s in r.manifest["shards"] if s["group"] in groups)
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower().lstrip(".") in exts)
            files += found
            total += len(found)
        else:
            files.append(p)
            total += 1

    def gen():
        from mmtok.runner import Item

        for r in readers:
            for s in r:
                ext = next((e for e in s.members if e in exts), None)
                yield Item(f"{r.directory}/{s.shard}:{s.key}", (s.key, ext, s.members.get(ext), s.meta))
        for f in files:
            yield Item(str(f), (None, f.suffix.lower().lstrip("."), str(f), {}))

    return gen(), total


class MediaSource:
    """Context manager giving a stage a path for ffmpeg plus the source's key and hash.

    Shard payloads are bytes: they go to a temporary file, since ffmpeg cannot seek in a
    pipe (an mp4 whose index sits at the end would not open)."""

    def __init__(self, payload):
        self.key, self.ext, self.data, self.parent_meta = payload
        self._tmp = None

    def __enter__(self):
        import tempfile

        from mmtok.shards import content_hash

        if self.ext is None or self.data is None:
            raise MediaError("no media member in this sample")
        if isinstance(self.data, str):  # a plain file
            self.source = self.data
            with open(self.data, "rb") as f:
                raw = f.read()
            self.key = file_key(self.data, raw)
            self.path = self.data
        else:
            raw = self.data
            self.source = self.parent_meta.get("source", self.key)
            self._tmp = tempfile.NamedTemporaryFile(suffix=f".{self.ext}")
            self._tmp.write(raw)
            self._tmp.flush()
            self.path = self._tmp.name
        # the parent sample's sha256, so the parent is found by it in index.parquet
        self.sha256 = self.parent_meta.get("sha256") or content_hash({self.ext: raw})
        return self

    def __exit__(self, *a):
        if self._tmp is not None:
            self._tmp.close()
        return False
