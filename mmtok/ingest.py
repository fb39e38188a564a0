"""`mmtok shard`: turn raw files, manifests and tar archives into validated shards.

Enumeration (main process) turns the inputs into items in a fixed order; `ShardFn`
(worker processes) sniffs, validates and hashes one item into samples or quarantine
records. Modality is decided from the bytes, not the file name.
"""

from __future__ import annotations

import csv
import datetime
import decimal
import io
import json
import os
import re
import stat
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mmtok.media import AUDIO_EXTS as MEDIA_AUDIO_EXTS
from mmtok.runner import DUPLICATES, STAGE_FILE, STATS_DIR, Item, Quarantined, Sample, StageError
from mmtok.shards import (INDEX, MANIFEST, PICKLE_EXTS, QUARANTINE, SHARD_RE, content_hash, dumps_meta, group_samples,
                          iter_tar, printable)

MANIFEST_EXTS = (".jsonl", ".csv", ".parquet")
TAR_EXTS = (".tar", ".tar.gz", ".tgz")
IMAGE_EXTS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
AUDIO_EXTS = set(MEDIA_AUDIO_EXTS)  # the member names extract-audio reads
# what other names and sniffed types mean: opus and vorbis share the ogg container
_AUDIO_ALIASES = {"x-wav": "wav", "aif": "aiff", "aifc": "aiff", "x-aiff": "aiff", "snd": "au",
                  "opus": "ogg", "oga": "ogg"}
VIDEO_EXTS = {"mp4": "mp4", "webm": "webm", "mkv": "mkv", "avi": "avi", "mov": "mov", "m4v": "mp4"}


class Bad(Exception):
    """A part of an input that fails validation; becomes a quarantine record."""


# ---------------------------------------------------------------- enumeration

MAX_MEMBER_BYTES = 4 << 30  # `--max-member-bytes`' default: the largest payload held in memory
# what an mmtok output directory holds besides its shards: bookkeeping, never input
_OUTPUT_RECORDS = {MANIFEST, INDEX, QUARANTINE, DUPLICATES, STAGE_FILE, STATS_DIR}


def _is_tar(path: Path) -> bool:
    return path.name.endswith(TAR_EXTS)


def _file_kind(mode: int) -> str | None:
    """What a non-regular file is, in words; None for a regular file."""
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return kind
    return None if stat.S_ISREG(mode) else "not a regular file"


def _not_regular(path: Path, mode: int) -> Item:
    return _bad(str(path), f"{_file_kind(mode)}, not a regular file: skipped, never opened")


def enumerate_inputs(inputs: list[str], max_member_bytes: int = MAX_MEMBER_BYTES,
                     columns: "Columns | None" = None) -> Iterator[Item]:
    """Yield items in a fixed order: inputs as given, directories walked sorted."""
    columns = columns or Columns()
    for spec in inputs:
        path = Path(spec)
        if not path.exists():
            raise FileNotFoundError(f"input {spec} does not exist")
        if printable(spec) != spec:
            yield _bad(printable(spec), "name is not valid UTF-8: rename it to include it")
        elif path.is_dir():
            yield from _walk_dir(path, os.path.realpath(path), max_member_bytes, columns)
        else:
            yield from _file_items(path, max_member_bytes, columns)


def _walk_dir(d: Path, root: str, limit: int, cols: "Columns") -> Iterator[Item]:
    """Walk `d` (inside the real input directory `root`): its files first, then its folders,
    each sorted. Only regular files are read; anything else gets a record, as does a
    symlink that leads outside `root`. A symlink inside `root` to a file is read like the
    file; one to a folder is not descended (that folder is walked where it is)."""
    try:
        with os.scandir(d) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        yield _bad(printable(str(d)), f"cannot list this folder ({e.strerror})")
        return
    names = {e.name for e in entries}
    # re-sharding mmtok's own output: its shards are tars like any other, its records are not input
    own_output = STAGE_FILE in names or (MANIFEST in names and INDEX in names and any(map(SHARD_RE.match, names)))
    files, folders = [], []
    for e in entries:
        if own_output and e.name in _OUTPUT_RECORDS:
            continue
        if e.name.startswith(".") and not e.is_dir(follow_symlinks=False):  # hidden files: never input
            continue
        path = Path(e.path)
        if printable(e.path) != e.path:
            yield _bad(printable(e.path), "name is not valid UTF-8: rename it to include it")
            continue
        if e.is_dir(follow_symlinks=False):
            folders.append(path)
            continue
        if e.is_symlink():
            target = os.path.realpath(e.path)
            if os.path.commonpath([root, target]) != root:
                yield _bad(e.path, f"symlink to {printable(target)}, outside the input tree: not followed")
                continue
            if e.is_dir():
                continue
        try:
            if not e.is_file():  # the directory entry's type: no stat for a plain file
                yield _not_regular(path, e.stat().st_mode)
                continue
        except OSError as err:  # a dangling symlink
            yield _bad(e.path, f"cannot read ({err.strerror})")
            continue
        files.append(path)
    i2d = _img2dataset_shards(names)
    if i2d:  # img2dataset's output folder: its per-shard counters are not input
        files = [f for f in files if f.name not in {f"{s}_stats.json" for s in i2d}]
    plain = [f for f in files if not (_is_tar(f) or f.name.endswith(MANIFEST_EXTS))]
    for f in files:
        stem = f.name.removesuffix(".parquet")
        if stem in i2d and f"{stem}.parquet" == f.name and (f"{stem}.tar" in names or f"{stem}" in names):
            yield from _img2dataset_stats(f)  # its samples are in the tar (or folder) beside it
        elif _is_tar(f) or f.name.endswith(MANIFEST_EXTS):
            yield from _file_items(f, limit, cols)
    # files sharing a stem in one folder are one sample (image + caption), as in webdataset
    by_stem: dict[str, list[Path]] = {}
    for f in plain:
        by_stem.setdefault(f.name.split(".")[0], []).append(f)
    for stem in sorted(by_stem):
        group, dropped, kept = [], [], {}
        for f in by_stem[stem]:  # sorted by name: of `x.PNG` and `x.png`, `x.PNG` comes first and is kept
            ext = f.name.partition(".")[2].lower()
            if ext in kept:
                dropped.append(_bad(str(f), f"same stem and extension as {kept[ext].name} but for case; "
                                            f"{kept[ext].name} is kept"))
            else:
                kept[ext] = f
                group.append(f)
        yield Item(str(group[0].with_name(stem)), {"kind": "files", "paths": [str(p) for p in group]})
        yield from dropped
    for folder in folders:
        yield from _walk_dir(folder, root, limit, cols)


def _file_items(path: Path, limit: int, cols: "Columns") -> Iterator[Item]:
    try:
        mode = path.stat().st_mode
    except OSError as e:
        yield _bad(str(path), f"cannot read ({e.strerror})")
        return
    if not stat.S_ISREG(mode):  # a FIFO would block the open forever; a device may never end
        yield _not_regular(path, mode)
        return
    name = path.name.lower()
    if _is_tar(path):
        yield from _tar_items(path, limit)
    elif name.endswith(".jsonl"):
        yield from _jsonl_items(path, cols)
    elif name.endswith(".csv"):
        yield from _csv_items(path, limit, cols)
    elif name.endswith(".parquet"):
        yield from _parquet_items(path, cols)
    else:
        yield Item(str(path), {"kind": "files", "paths": [str(path)]})


def _bad(name: str, reason: str) -> Item:
    return Item(name, {"kind": "bad", "reason": reason})


def _tar_items(path: Path, limit: int) -> Iterator[Item]:
    for s in group_samples(iter_tar(path, max_member_bytes=limit, strict=False)):
        name = f"{path}:{s[0]}" if s[0] else str(path)
        if len(s) == 3:
            yield _bad(name, s[2])
        else:
            yield Item(name, {"kind": "members", "members": s[1]})


MEDIA_FIELDS = ("image", "audio", "video")
# the manifest columns read as each field when no --<field>-col option names one: the
# first one a row has wins (`jpg` and friends: img2dataset's Parquet output, image bytes)
DEFAULT_COLUMNS = {"image": ("image", "jpg", "png", "webp"), "audio": ("audio",), "video": ("video",),
                   "text": ("text", "caption", "transcript")}
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_FETCH = "URL: fetch it first (img2dataset), then shard the folder it writes"


@dataclass(frozen=True)
class Columns:
    """Which manifest column holds each field (`mmtok shard --image-col url` ...); None
    means DEFAULT_COLUMNS. `key` names a row (`source`, quarantine records) by that column's
    value instead of its row number."""

    image: str | None = None
    audio: str | None = None
    video: str | None = None
    text: str | None = None
    key: str | None = None

    def of(self, field: str) -> tuple[str, ...]:
        col = getattr(self, field)
        return (col,) if col else DEFAULT_COLUMNS[field]

    def check(self, path: Path, columns: list[str]) -> None:
        """Refuse a manifest that lacks a column an option names, or whose columns hold no
        field at all: row by row it would give nothing but quarantine records."""
        have = set(columns)
        listed = ", ".join(columns) or "none"
        for field in (*DEFAULT_COLUMNS, "key"):
            col = getattr(self, field)
            if col and col not in have:
                raise StageError(f"{path}: --{field}-col {col} is not a column of this manifest (columns: {listed})")
        if "segments" not in have and not any(c in have for f in DEFAULT_COLUMNS for c in self.of(f)):
            raise StageError(f"{path}: no column holds a field mmtok reads (columns: {listed}); name them with "
                             "--image-col, --text-col, --audio-col or --video-col (a document is a `segments` column)")


def check_manifest(path: str | Path, cols: Columns) -> None:
    """`Columns.check` on a manifest file's header (the CLI's check before any work)."""
    path = Path(path)
    name = path.name.lower()
    if not path.is_file() or not name.endswith(MANIFEST_EXTS):
        return
    try:
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            columns = pq.ParquetFile(path).schema_arrow.names
        elif name.endswith(".csv"):
            with open(path, newline="", encoding="utf-8-sig") as f:
                columns = next(csv.reader(f), [])
        else:
            with open(path, "rb") as f:
                row = next((json.loads(line) for line in f if line.strip()), {})
            columns = list(row) if isinstance(row, dict) else []
    except Exception:  # unreadable: the reader quarantines it with the reason
        return
    cols.check(path, columns)


def _row_item(path: Path, n: int, row, cols: Columns, blobs: dict[str, bytes] | None = None) -> Item:
    """A manifest row as an item: its columns mapped to the fields `ShardFn` reads; a URL
    where a file should be, or a row img2dataset did not fetch, never becomes a sample.
    `blobs`: media held in the row itself (bytes columns), by field."""
    name = f"{path}:{n}"
    if not isinstance(row, dict):
        return _bad(name, "manifest row is not an object")
    if cols.key and row.get(cols.key) not in (None, ""):
        name = f"{path}:{row[cols.key]}"
    if row.get("status") not in (None, "success") and "error_message" in row:  # img2dataset's failed rows
        return _not_fetched(name, row)
    row = dict(row)
    for field in (*MEDIA_FIELDS, "text"):
        col = next((c for c in cols.of(field) if c in row), None)
        if (col is None and field == "image" and cols.image is None and "url" in row and "caption" in row
                and not blobs and not any(f in row for f in MEDIA_FIELDS)):
            col = "url"  # LAION's layout: the caption describes the image at the URL, which is not here
        if col is not None and col != field:
            row[field] = row.pop(col)
    refs = [row.get(f) for f in MEDIA_FIELDS]
    if isinstance(row.get("segments"), list):
        refs += [s.get("image") for s in row["segments"] if isinstance(s, dict)]
    url = next((r for r in refs if isinstance(r, str) and _URL.match(r)), None)
    if url is not None:
        return _bad(name, f"{_FETCH} ({url})")
    try:
        dumps_meta(row)  # the row's fields become metadata: they must be JSON and valid Unicode
    except (TypeError, ValueError, UnicodeEncodeError) as e:
        return _bad(name, f"manifest row cannot be kept as JSON metadata ({e})")
    if blobs:  # the media are in the row: an item like a tar sample's members
        members = dict(blobs)
        text = row.pop("text", None)
        if text is not None:
            if not isinstance(text, str):
                return _bad(name, "text field is not a string")
            members["txt"] = text.encode()
        extra = {k: v for k, v in row.items() if k not in (*MEDIA_FIELDS, "caption", "transcript")}
        if extra:
            members["json"] = dumps_meta(extra)  # kept as source_meta, as a row's other columns are
        return Item(name, {"kind": "members", "members": members})
    return Item(name, {"kind": "row", "row": row, "base": str(path.parent)})


def _jsonl_items(path: Path, cols: Columns) -> Iterator[Item]:
    try:
        f = open(path, "rb")
    except OSError as e:
        yield _bad(str(path), f"cannot read ({e.strerror})")
        return
    checked = False
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield _bad(f"{path}:{n}", f"malformed manifest line: {e}")
                continue
            if not checked and isinstance(row, dict):  # rows may differ: the first one stands for the file
                cols.check(path, list(row))
                checked = True
            yield _row_item(path, n, row, cols)


def _csv_items(path: Path, limit: int, cols: Columns) -> Iterator[Item]:
    # a caption may be as long as any payload (csv refuses fields over 128 KiB by default)
    csv.field_size_limit(min(limit, sys.maxsize))
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a BOM must not rename the first column
            reader = csv.DictReader(f)
            cols.check(path, [c for c in reader.fieldnames or [] if c])
            for n, row in enumerate(reader, 2):
                row = {k: v for k, v in row.items() if k and v not in (None, "")}
                if "segments" in row:
                    try:
                        row["segments"] = json.loads(row["segments"])
                    except json.JSONDecodeError as e:
                        yield _bad(f"{path}:{n}", f"segments column is not JSON: {e}")
                        continue
                yield _row_item(path, n, row, cols)
    except (UnicodeDecodeError, csv.Error, OSError) as e:
        yield _bad(str(path), f"unreadable CSV manifest: {e}")


def _json_value(v):
    """A Parquet value as JSON: text from bytes (UnicodeDecodeError when they are not
    UTF-8), decimals as exact strings, dates and times in ISO 8601, durations in seconds."""
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, decimal.Decimal):
        return str(v)
    if isinstance(v, (datetime.date, datetime.time)):
        return v.isoformat()
    if isinstance(v, datetime.timedelta):
        return v.total_seconds()
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    return v


def _parquet_row(path: Path, n: int, row: dict, cols: Columns) -> Item:
    blobs = {}
    for field in MEDIA_FIELDS:  # a bytes column named as a media field holds the file itself
        col = next((c for c in cols.of(field) if isinstance(row.get(c), bytes)), None)
        if col is not None:
            blobs[field] = row.pop(col)
    out = {}
    for k, v in row.items():
        if v is None:
            continue
        try:
            out[k] = _json_value(v)
        except UnicodeDecodeError:
            return _bad(f"{path}:{n}", f"column {k!r} holds binary data that is not UTF-8 text")
    return _row_item(path, n, out, cols, blobs)


def _parquet_items(path: Path, cols: Columns) -> Iterator[Item]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        yield _bad(str(path), f"unreadable Parquet manifest: {e}")
        return
    cols.check(path, pf.schema_arrow.names)
    n = 0
    try:
        for batch in pf.iter_batches(batch_size=4096):
            try:
                rows = batch.to_pylist()
            except Exception:  # a value Python cannot hold (a date out of range): find its row
                rows = None
            for i in range(batch.num_rows):
                n += 1
                try:
                    row = rows[i] if rows is not None else batch.slice(i, 1).to_pylist()[0]
                except Exception as e:
                    yield _bad(f"{path}:{n}", f"a value in this row cannot be read ({e})")
                    continue
                yield _parquet_row(path, n, row, cols)
    except Exception as e:  # a corrupt page further on: the rows before it are kept
        yield _bad(str(path), f"unreadable Parquet manifest after row {n}: {e}")


def _img2dataset_shards(names: set[str]) -> set[str]:
    """The shards of an img2dataset output folder: NNNNN_stats.json beside NNNNN.tar,
    NNNNN.parquet or a NNNNN/ folder (its webdataset, parquet and files formats)."""
    out = set()
    for name in names:
        stem = name.removesuffix("_stats.json")
        if stem != name and stem.isdigit() and {f"{stem}.tar", f"{stem}.parquet", stem} & names:
            out.add(stem)
    return out


def _img2dataset_stats(path: Path) -> Iterator[Item]:
    """img2dataset's table of every row it tried for one shard. The rows it fetched are in
    the tar (or folder) beside it; each other one gets a record, not counted as a bad input
    (there never was a file)."""
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:
        yield _bad(str(path), f"unreadable img2dataset stats table: {e}")
        return
    for n, row in enumerate(rows, 1):
        if row.get("status") != "success":
            yield _not_fetched(f"{path}:{row.get('key', n)}", row)


def _not_fetched(name: str, row: dict) -> Item:
    """A row img2dataset failed to download: recorded, but no bad input (nothing to read)."""
    return Item(name, {"kind": "skip", "reason": f"img2dataset did not fetch it ({row.get('status')}: "
                                                f"{row.get('error_message')}): {row.get('url')}"})


# ---------------------------------------------------------------- validation

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
    from PIL import Image, UnidentifiedImageError

    from mmtok.images import rgb_image

    if not validate:  # sniffed only: nothing is decoded here, so there is no bomb to defuse
        if sniffed_ext not in _SNIFFED_IMAGE_EXTS:
            raise Bad(f"{name}: unsupported image format {sniffed_ext}")
        return Part("image", _SNIFFED_IMAGE_EXTS[sniffed_ext], data, {})
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


# ---------------------------------------------------------------- samples

def _read_file(path: str | Path, limit: int) -> bytes:
    """A regular file's bytes. Anything else is refused without being opened (opening a
    FIFO blocks; /dev/zero never ends), and so is a file over `limit` bytes: its size is
    checked first, and the read stops at `limit + 1` in case it grows. OSError when it
    cannot be read at all."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise Bad(f"{path}: {_file_kind(st.st_mode)}, not a regular file: never opened")
    if st.st_size <= limit:
        # O_NONBLOCK: a FIFO put in its place since the stat must not block the open
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise Bad(f"{path}: not a regular file: not read")
            data = f.read(limit + 1)
        if len(data) <= limit:
            return data
    raise Bad(f"{path}: over the --max-member-bytes limit of {limit:,} bytes: not read")


class ShardFn:
    """The `shard` stage function: one item -> samples and/or quarantine records."""

    def __init__(self, validate: bool = True, max_pixels: int = 89_478_485, max_member_bytes: int = MAX_MEMBER_BYTES):
        self.validate, self.max_pixels, self.max_member_bytes = validate, max_pixels, max_member_bytes

    def __call__(self, payload: dict) -> list:
        index, kind = payload["index"], payload["kind"]
        try:
            if kind == "bad":
                raise Bad(payload["reason"])
            if kind == "skip":
                return [Quarantined(payload["source"], payload["reason"], counts=False)]
            if kind == "files":
                parts, extra, dropped = self._file_parts(payload["paths"])
                return self._build(index, payload["source"], parts, extra) + dropped
            if kind == "members":
                return self._members(index, payload["source"], payload["members"])
            return self._row(index, payload["source"], payload["row"], Path(payload["base"]))
        except Bad as e:
            return [Quarantined(payload["source"], str(e))]

    def _sniff(self, data: bytes, name: str, path: str | None = None) -> Part:
        return sniff(data, name, self.validate, self.max_pixels, path)

    def _file_parts(self, paths: list[str]) -> tuple[list[Part], dict, list[Quarantined]]:
        """The payloads of files sharing a stem, the sidecar JSON's fields, and a record for
        each payload file left out as bad (`_left_out`)."""
        parts, extra, bad = [], {}, []
        for p in paths:
            try:
                data = _read_file(p, self.max_member_bytes)
            except OSError as e:
                bad.append((p, Bad(f"{p}: cannot read ({e.strerror})")))
                continue
            if p.endswith(".json"):  # the sidecar describes the whole sample: a bad one quarantines it
                extra.update(_json_extra(data, p))
                continue
            try:
                parts.append(self._sniff(data, p, p))
            except Bad as e:
                bad.append((p, e))
        return parts, extra, _left_out(parts, bad)

    def _members(self, index: int, source: str, members: dict[str, bytes]) -> list:
        extra = {}
        if "json" in members:
            extra = _json_extra(members.pop("json"), f"{source}.json")
            if extra.get("modality") == "doc" and "segments" in extra:  # re-sharding an mmtok doc
                return self._doc(index, source, extra["segments"], {}, resolve_by_hash=True)
        parts, bad = [], []
        for ext, data in sorted(members.items()):
            try:
                parts.append(self._sniff(data, f"{source}.{ext}"))
            except Bad as e:
                bad.append((f"{source}.{ext}", e))
            else:
                parts[-1].meta["member"] = ext
        dropped = _left_out(parts, bad)
        return self._build(index, source, parts, {k: v for k, v in extra.items() if k == "source_meta"}) + dropped

    def _row(self, index: int, source: str, row: dict, base: Path) -> list:
        if "segments" in row:
            return self._doc(index, source, row["segments"], base)
        parts = []
        for field in ("image", "audio", "video"):
            if field in row:
                path = base / str(row[field])
                try:
                    data = _read_file(path, self.max_member_bytes)
                except OSError:
                    raise Bad(f"row points to a missing or unreadable file: {row[field]}") from None
                part = self._sniff(data, str(path), str(path))
                if part.kind != field:
                    raise Bad(f"{row[field]}: the row says {field} but the content is {part.kind}")
                parts.append(part)
        text = next((row[k] for k in ("text", "caption", "transcript") if k in row), None)
        if text is not None:
            if not isinstance(text, str):
                raise Bad("text field is not a string")
            parts.append(Part("text", "txt", text.encode(), {"chars": len(text)}))
        if not parts:
            raise Bad("row has none of the fields text, caption, image, audio, video, segments")
        extra = {k: v for k, v in row.items() if k not in ("image", "audio", "video", "text", "caption", "transcript")}
        return self._build(index, source, parts, {"source_meta": extra} if extra else {})

    def _doc(self, index: int, source: str, segments, base, resolve_by_hash: bool = False) -> list:
        if not isinstance(segments, list) or not segments:
            raise Bad("segments must be a non-empty list of {text} / {image} objects")
        out_segments, images = [], []
        for j, seg in enumerate(segments):
            if isinstance(seg, dict) and isinstance(seg.get("text"), str):
                out_segments.append({"text": seg["text"]})
            elif isinstance(seg, dict) and isinstance(seg.get("image"), str):
                if resolve_by_hash:  # already content-addressed: the image samples come along
                    out_segments.append({"image": seg["image"]})
                    continue
                path = base / seg["image"]
                try:
                    data = _read_file(path, self.max_member_bytes)
                except OSError:
                    raise Bad(f"segment {j} points to a missing or unreadable image: {seg['image']}") from None
                part = self._sniff(data, str(path), str(path))
                if part.kind != "image":
                    raise Bad(f"segment {j}: {seg['image']} is {part.kind}, not an image")
                members = {part.ext: part.data}
                h = content_hash(members)
                out_segments.append({"image": h})
                images.append(Sample(
                    key=f"{index:09d}i{j}", group=f"image-{part.ext}", members=members,
                    meta={"modality": "image", "role": "doc_image", "parent": f"{index:09d}", "source": str(path),
                          "sha256": h, "bytes": len(part.data), **part.meta}))
            else:
                raise Bad(f"segment {j} is neither {{'text': str}} nor {{'image': path}}")
        meta = {"modality": "doc", "source": source, "segments": out_segments}
        meta["sha256"] = content_hash({"segments": dumps_meta(out_segments)})
        return images + [Sample(key=f"{index:09d}", group="doc", members={}, meta=meta)]

    def _build(self, index: int, source: str, parts: list[Part], extra: dict) -> list:
        texts = [p for p in parts if p.kind == "text"]
        media = [p for p in parts if p.kind != "text"]
        if len(media) == 1 and len(texts) <= 1:
            return [self._sample(f"{index:09d}", source, media[0], texts[0] if texts else None, extra)]
        if not media and len(texts) == 1:
            return [self._sample(f"{index:09d}", source, texts[0], None, extra)]
        if not parts:
            raise Bad("no payload")
        # several payloads that don't form a pair: keep each as its own sample
        return [self._sample(f"{index:09d}p{j}", source, p, None, extra) for j, p in enumerate(parts)]

    def _sample(self, key: str, source: str, part: Part, caption: Part | None, extra: dict) -> Sample:
        members = {part.ext: part.data}
        modality = part.kind
        group = "text" if part.kind == "text" else f"{part.kind}-{part.ext}"
        if caption is not None:
            members["txt"] = caption.data
            modality = {"image": "pair", "audio": "audio_pair", "video": "video_pair"}[part.kind]
            group = f"{modality}-{part.ext}"
        meta = {k: v for k, v in part.meta.items() if k != "member"}
        meta.update({"modality": modality, "source": source, "sha256": content_hash(members),
                     "bytes": sum(len(v) for v in members.values()), **extra})
        return Sample(key=key, group=group, members=members, meta=meta)


def _left_out(parts: list[Part], bad: list[tuple[str, Bad]]) -> list[Quarantined]:
    """Quarantine records for the bad members of a sample whose other members are kept.

    A bad member costs only itself while a media payload is left (a broken `x.aiff` beside
    a good `x.wav` and its caption `x.txt`: the audio-caption pair is kept); a caption whose
    image or audio is bad is no sample on its own, so then the whole sample is quarantined
    (raises the first member's Bad)."""
    if bad and not any(p.kind != "text" for p in parts):
        raise bad[0][1]
    return [Quarantined(name, str(e)) for name, e in bad]


def _json_extra(data: bytes, name: str) -> dict:
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Bad(f"{name}: sidecar JSON does not parse ({e})") from None
    if not isinstance(obj, dict):
        raise Bad(f"{name}: sidecar JSON is not an object")
    if obj.get("modality") == "doc":
        return obj
    return {"source_meta": obj}


def shard_items(inputs: list[str], max_member_bytes: int = MAX_MEMBER_BYTES,
                columns: Columns | None = None) -> Iterator[Item]:
    """Items for the runner, each payload carrying its position (the sample key) and source."""
    for i, item in enumerate(enumerate_inputs(inputs, max_member_bytes, columns)):
        item.payload["index"] = i
        item.payload["source"] = item.name
        yield item
