"""ffmpeg access: `$MMTOK_FFMPEG` when set, else the system binary when present, else the
one the imageio-ffmpeg wheel carries; ffmpeg 5.1 or newer. Commands are built with
ffmpeg-python and run as argument lists, never through a shell."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess

# -fps_mode, which every frame extraction passes, first came in ffmpeg 5.1
MIN_FFMPEG = (5, 1)
_VERSION = re.compile(r"ffmpeg version n?(\d+)\.(\d+)")


@functools.lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    """The ffmpeg binary to run. Raises ValueError (a one-line message) when $MMTOK_FFMPEG
    names no executable, or the binary is not ffmpeg or is older than MIN_FFMPEG."""
    exe = os.environ.get("MMTOK_FFMPEG")
    if exe:
        found = shutil.which(exe)
        if not found:
            raise ValueError(f"MMTOK_FFMPEG={exe}: no such executable; set it to an ffmpeg binary or unset it")
        exe = found
    else:
        exe = shutil.which("ffmpeg")
        if not exe:
            import imageio_ffmpeg

            exe = imageio_ffmpeg.get_ffmpeg_exe()
    try:
        first = subprocess.run([exe, "-version"], capture_output=True, timeout=30).stdout.decode("utf-8", "replace")
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ValueError(f"{exe}: cannot run it as ffmpeg ({e}); set MMTOK_FFMPEG to an ffmpeg binary") from None
    if not first.startswith("ffmpeg version"):
        raise ValueError(f"{exe}: not an ffmpeg binary (its -version says {first[:60]!r}); "
                         "set MMTOK_FFMPEG to an ffmpeg binary")
    m = _VERSION.match(first)
    # development builds name a commit ("ffmpeg version N-1234-g..."), not a release: let them run
    if m and (int(m[1]), int(m[2])) < MIN_FFMPEG:
        raise ValueError(f"{exe} is ffmpeg {m[1]}.{m[2]}; mmtok needs ffmpeg {MIN_FFMPEG[0]}.{MIN_FFMPEG[1]} "
                         "or newer: install one, or set MMTOK_FFMPEG to one (pip's imageio-ffmpeg carries one)")
    return exe


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
    duration = round(int(d.group(1)) * 3600 + int(d.group(2)) * 60 + float(d.group(3)), 3) if d else None
    fps = float(fps.group(1)) if fps else None
    if duration is None:  # no header states it: ffmpeg's own guesses differ by version
        duration, fps = packet_timing(path)
    return {
        "codec": m.group(1),
        "width": int(m.group(2)),
        "height": int(m.group(3)),
        "duration": duration,
        "fps": fps,
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


_TIME_BASE = re.compile(r"^#tb 0: (\d+)/(\d+)$", re.M)
_NO_PTS = -(2**63)  # AV_NOPTS_VALUE, as the framecrc listing prints a missing timestamp


def packet_timing(path: str) -> tuple[float | None, float | None]:
    """(duration, mean frame rate) of the first video stream, from its packets (listed, not
    decoded), for inputs whose header states no duration: streamed webm/mkv, raw h264.

    ffmpeg's own estimate for these depends on its version (a raw .h264 of 3 s: 5.1 says
    2.7 s, 9.0 assumes 25 fps and says 1.2 s), while the packets agree in both, and with
    the frame times the decoder gives: the span of the presentation times (each packet's
    end included), or, in raw streams whose packets carry none, the sum of their durations."""
    import ffmpeg

    listing, _ = run_ffmpeg(ffmpeg.input(path).output("pipe:", format="framecrc", map="0:v:0", c="copy"))
    text = listing.decode("utf-8", "replace")
    tb = _TIME_BASE.search(text)
    # one line per packet: stream, dts, pts, duration, size, checksum
    packets = [[int(f) for f in line.split(",")[1:4]] for line in text.splitlines() if line and line[0] != "#"]
    if not tb or not packets:
        return None, None
    if any(pts == _NO_PTS for _, pts, _ in packets):
        ticks = sum(d for _, _, d in packets)
    else:
        ticks = max(pts + d for _, pts, d in packets) - min(pts for _, pts, _ in packets)
    seconds = ticks * int(tb[1]) / int(tb[2])
    if seconds <= 0:
        return None, None
    return round(seconds, 3), round(len(packets) / seconds, 3)


# --- inputs: shard directories made by `mmtok shard`, or plain files -------------------

VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")
# what `mmtok shard` names audio members (ffmpeg decodes them all; opus comes in ogg)
AUDIO_EXTS = ("wav", "flac", "mp3", "ogg", "aiff", "au", "caf", "w64", "m4a")
_KEY_SAFE = re.compile(r"[^A-Za-z0-9_-]+")


def file_key(path: str, data: bytes) -> str:
    """A key for a plain file: its readable stem plus a content hash (no dots or slashes)."""
    import hashlib
    import os

    stem = _KEY_SAFE.sub("_", os.path.splitext(os.path.basename(path))[0]).strip("_")[:40] or "file"
    return f"{stem}-{hashlib.sha256(data).hexdigest()[:12]}"


def media_items(inputs: list[str], modalities: tuple[str, ...], exts: tuple[str, ...]):
    """Enumerate media inputs as runner Items, lazily, in a deterministic order.

    Each input is a shard directory, also at a URL (it has a manifest.json; groups
    `<modality>-<ext>` and `<modality>_pair-<ext>` are read with ShardReader), a directory of
    plain files (walked recursively, by extension), or a single file. Payloads are
    `(key, ext, data_or_path, parent_meta)`. Returns (items, total).
    """
    from mmtok.fs import RemotePath, as_location
    from mmtok.shards import MANIFEST, ShardReader

    readers, files, total = [], [], 0
    for inp in inputs:
        p = as_location(inp)
        if isinstance(p, RemotePath) and not (p / MANIFEST).exists():
            raise FileNotFoundError(f"{inp}: not a shard directory; at a URL these stages read the shards of "
                                    "`mmtok shard` (shard raw media first, into the bucket if you like)")
        if not p.exists():
            raise FileNotFoundError(f"{inp}: no such file or directory")
        if isinstance(p, RemotePath) or (p.is_dir() and (p / MANIFEST).exists()):
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
                data = s.members.get(ext)
                yield Item(f"{r.directory}/{s.shard}:{s.key}", (s.key, ext, data, s.meta), len(data or b""))
        for f in files:
            try:
                size = f.stat().st_size
            except OSError:  # gone since the listing: the stage's read reports it
                size = 0
            yield Item(str(f), (None, f.suffix.lower().lstrip("."), str(f), {}), size)

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
