"""Sniffing and validation: a payload's modality from its bytes, never its name, and (with
validation on) a decode as the later stages decode it. `ShardFn` (mmtok.ingest) calls
`sniff` on every payload; a payload that fails raises `Bad`, which becomes a quarantine
record.
"""

from __future__ import annotations

import io
import tempfile
import warnings
from dataclasses import dataclass

from mmtok.media import AUDIO_EXTS as MEDIA_AUDIO_EXTS
from mmtok.shards import PICKLE_EXTS

IMAGE_EXTS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
AUDIO_EXTS = set(MEDIA_AUDIO_EXTS)  # the member names extract-audio reads
# what other names and sniffed types mean: opus and vorbis share the ogg container
_AUDIO_ALIASES = {"x-wav": "wav", "aif": "aiff", "aifc": "aiff", "x-aiff": "aiff", "snd": "au",
                  "opus": "ogg", "oga": "ogg"}
VIDEO_EXTS = {"mp4": "mp4", "webm": "webm", "mkv": "mkv", "avi": "avi", "mov": "mov", "m4v": "mp4"}


class Bad(Exception):
    """A part of an input that fails validation; becomes a quarantine record."""


@dataclass
class Part:
    """One payload with what sniffing/validation learned about it."""

    kind: str  # text | image | audio | video
    ext: str
    data: bytes
    meta: dict


def _looks_pickled(data: bytes) -> bool:
    return len(data) > 2 and data[0] == 0x80 and 2 <= data[1] <= 5


def sniff(data: bytes, name: str, validate: bool, max_pixels: int, path: str | None = None) -> Part:
    """Decide a payload's modality from its bytes and (optionally) fully decode it."""
    import filetype

    ext_hint = name.rsplit(".", 1)[-1].lower()
    if ext_hint in PICKLE_EXTS or _looks_pickled(data):
        raise Bad(f"{name}: pickle data is never loaded (it can run code)")
    if not data:
        raise Bad(f"{name}: empty")
    kind = filetype.guess(data[:8192])
    mime, sniffed = (kind.mime, kind.extension) if kind else _audio_signature(data)
    claimed = _claimed_kind(ext_hint)
    found = mime.split("/")[0] if mime else "text"
    if claimed and claimed != found and not (claimed == "video" and mime == "audio/mp4"):
        raise Bad(f"{name}: the name says {claimed} but the content is not ({mime or 'no known media signature'})")
    if mime.startswith("image/"):
        return _image_part(data, name, validate, max_pixels, sniffed)
    if mime.startswith("video/") or (mime == "audio/mp4" and ext_hint in VIDEO_EXTS):
        return _video_part(data, name, sniffed, validate, path)
    if mime.startswith("audio/"):
        return _audio_part(data, name, sniffed, validate, path)
    if mime:
        raise Bad(f"{name}: unsupported content type {mime}")
    return _text_part(data, name)


# audio containers that libsndfile and ffmpeg read but `filetype` does not know
_AUDIO_SIGNATURES = ((b".snd", "au"), (b"caff", "caf"), (b"riff\x2e\x91\xcf\x11", "w64"))


def _audio_signature(data: bytes) -> tuple[str, str | None]:
    """(mime, extension) of the audio formats `filetype` misses; ("", None) for anything else."""
    ext = next((e for magic, e in _AUDIO_SIGNATURES if data.startswith(magic)), None)
    return (f"audio/{ext}", ext) if ext else ("", None)


_SNIFFED_IMAGE_EXTS = {"jpg": "jpg", "png": "png", "webp": "webp", "gif": "gif", "bmp": "bmp", "tif": "tiff"}


def _claimed_kind(ext: str) -> str | None:
    if ext in ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"):
        return "image"
    if ext in AUDIO_EXTS or ext in _AUDIO_ALIASES:
        return "audio"
    if ext in VIDEO_EXTS:
        return "video"
    return None


def _text_part(data: bytes, name: str) -> Part:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Bad(f"{name}: not valid UTF-8 text ({e.reason} at byte {e.start})") from None
    if "\x00" in text:
        raise Bad(f"{name}: binary data (NUL bytes), not text")
    return Part("text", "txt", data, {"chars": len(text)})


def _image_part(data: bytes, name: str, validate: bool, max_pixels: int, sniffed_ext: str) -> Part:
    if not validate:  # sniffed only: nothing is decoded here, so there is no bomb to defuse (nor PIL to import)
        if sniffed_ext not in _SNIFFED_IMAGE_EXTS:
            raise Bad(f"{name}: unsupported image format {sniffed_ext}")
        return Part("image", _SNIFFED_IMAGE_EXTS[sniffed_ext], data, {})
    from PIL import Image, UnidentifiedImageError

    from mmtok.images import rgb_image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))  # reads the header only
            w, h = im.size
            if w * h > max_pixels:
                raise Bad(f"{name}: {w}x{h} = {w * h:,} pixels is over the {max_pixels:,} limit "
                          "(possible decompression bomb; raise --max-pixels to accept it)")
            fmt = im.format
            # decoded as tokenize-images decodes it (aspect-ratio limit, EXIF turn, 16-bit and
            # alpha to RGB), so that an image kept here is one every image stage reads
            rgb_image(data, max_pixels)
    except Bad:
        raise
    except Image.DecompressionBombError as e:
        raise Bad(f"{name}: decompression bomb refused ({e})") from None
    except UnidentifiedImageError:  # its message holds a buffer's address: not the same on a rerun
        raise Bad(f"{name}: image does not decode (not a known image format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise Bad(f"{name}: image does not decode ({e})") from None
    ext = IMAGE_EXTS.get(fmt)
    if ext is None:
        raise Bad(f"{name}: unsupported image format {fmt}")
    return Part("image", ext, data, {"width": w, "height": h, "format": ext})


def _audio_part(data: bytes, name: str, ext: str, validate: bool, path: str | None) -> Part:
    import soundfile as sf

    ext = _AUDIO_ALIASES.get(ext, ext)
    if ext not in AUDIO_EXTS:
        raise Bad(f"{name}: unsupported audio format {ext}")
    try:
        info = sf.info(io.BytesIO(data))  # the header's facts, where libsndfile reads the format
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        info = None  # m4a, or a broken header: ffmpeg decides below
    if info is not None and info.frames <= 0:
        raise Bad(f"{name}: audio has no samples")
    meta = {} if info is None else {"duration": round(info.frames / info.samplerate, 4),
                                    "sample_rate": info.samplerate, "channels": info.channels}
    if validate:  # decoded as extract-audio decodes it (ffmpeg, 16 kHz mono, as many seconds), with its checks
        from mmtok.audio import CHUNK_SECONDS, SAMPLE_RATE, AudioOptions, decode_audio, wave_problem

        wave, _ = _ffmpeg(lambda f: decode_audio(f, AudioOptions().max_chunks * CHUNK_SECONDS), data, ext, path,
                          f"{name}: audio does not decode")
        problem = wave_problem(wave)
        if problem:
            raise Bad(f"{name}: {problem}")
        meta = meta or {"duration": round(len(wave) / SAMPLE_RATE, 4)}
    return Part("audio", ext, data, meta)


def _ffmpeg(fn, data: bytes, ext: str, path: str | None, failure: str):
    """`fn(file)` on the input file, or on a temporary copy of an archive member (ffmpeg needs
    a seekable file: an mp4 index may sit at the end). A MediaError becomes Bad(failure + reason),
    without the temporary file's name, so that the record is the same on a rerun."""
    from mmtok.media import MediaError

    if path is not None:
        try:
            return fn(path)
        except MediaError as e:
            raise Bad(f"{failure} (ffmpeg: {e})") from None
    with tempfile.NamedTemporaryFile(suffix=f".{ext}") as tmp:
        tmp.write(data)
        tmp.flush()
        try:
            return fn(tmp.name)
        except MediaError as e:
            raise Bad(f"{failure} (ffmpeg: {str(e).replace(tmp.name, 'the member')})") from None


def _video_part(data: bytes, name: str, ext: str, validate: bool, path: str | None) -> Part:
    from mmtok.media import probe_video

    ext = VIDEO_EXTS.get(ext, ext)
    if ext not in VIDEO_EXTS.values():
        raise Bad(f"{name}: unsupported video container {ext}")
    meta = {}
    if validate:
        meta = _ffmpeg(probe_video, data, ext, path, f"{name}: video does not decode")
        if not meta.get("duration"):  # extract-keyframes places its frames by the duration
            raise Bad(f"{name}: video duration is unknown: neither its header nor its packets give one")
    return Part("video", ext, data, meta)
