"""Reading any tar archive as samples, safely: plain or gzip/bzip2/xz-compressed, member by
member, in archive order, grouped by key as webdataset groups them. A member that cannot be
a sample (an unsafe or non-UTF-8 name, a link, an oversized member, a repeat) comes back as
a record to quarantine, never as a path or a traceback; a damaged archive raises
ShardError or, not strict, ends in one such record after every complete member."""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import lzma
import tarfile
import zlib
from pathlib import Path
from typing import Iterator

from mmtok.fs import as_location


class ShardError(Exception):
    """A shard directory or file that cannot be read; the message names it."""


def split_member_name(name: str) -> tuple[str, str] | None:
    """`dir/key.ext.more` -> (key, 'ext.more') the way webdataset groups members.

    Returns None for names that are unsafe (absolute, `..`, empty) or have no extension.
    """
    if not name or name.startswith("/") or "\\" in name:
        return None
    parts = name.split("/")
    if any(p in ("", "..", ".") for p in parts):
        return None
    base = parts[-1]
    if "." not in base.lstrip("."):
        return None
    stem, _, ext = base.partition(".")
    if not stem:
        return None
    return "/".join(parts[:-1] + [stem]), ext


def printable(name: str) -> str:
    """A file or member name as valid UTF-8 text: bytes that are not UTF-8 (which Python
    keeps as surrogates) become `\\xNN`. Equal to `name` exactly when `name` is valid UTF-8,
    so it is also the test for one."""
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file system byte made
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


class _HeaderReads:
    """The file tarfile reads from, keeping its last block-sized read (tarfile reads each
    header as one block). When iteration stops, that read is the block that stopped it, and
    it must be the end-of-archive marker: tarfile also stops, silently, at a cut or garbled
    header."""

    def __init__(self, f):
        self._f, self.last_block = f, b""

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        if n == tarfile.BLOCKSIZE:
            self.last_block = data
        return data

    def seek(self, *args) -> int:
        return self._f.seek(*args)

    def tell(self) -> int:
        return self._f.tell()


def _decompressed(raw):
    """A tar file's bytes, decompressed here rather than by tarfile, so `_HeaderReads` sees
    them. Seeking forward (past a member that is not read) decompresses and drops; it ends
    at the end of the data, whatever size a header claims."""
    start = raw.tell()
    head = raw.read(6)
    raw.seek(start)
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw)
    if head.startswith(b"BZh"):
        return bz2.BZ2File(raw)
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(raw)
    return raw


def iter_tar(path: str | Path, fileobj=None, *, max_member_bytes: int | None = None,
             strict: bool = True) -> Iterator[tuple[str, str, bytes] | tuple[str, None, str]]:
    """Yield (key, ext, data) per regular member of the tar at `path` (or in `fileobj`, a
    seekable binary file), plain or gzip/bzip2/xz-compressed, in archive order.

    A member that cannot be a sample yields (name, None, reason) instead, so callers can
    quarantine it, and its data is never read: an unsafe, extension-less or non-UTF-8 name
    (`name` is then `printable`), a link or device, a member over `max_member_bytes`.
    A damaged archive (cut inside a member or between members, a garbled header, no
    end-of-archive marker) raises ShardError; with `strict=False` it yields one last
    (name, None, reason) instead, naming the member it cut ("" when the damage lies between
    members), so that every complete member before it is kept.
    """
    member, tar = "", None  # the member whose data is being read
    try:
        with contextlib.ExitStack() as stack:
            raw = fileobj if fileobj is not None else stack.enter_context(as_location(path).open("rb"))
            data_stream = _decompressed(raw)
            if data_stream is not raw:
                stack.callback(data_stream.close)
                end = None  # a compressed archive's length is known only once it is read
            else:  # a plain one's: a member's declared size is checked against it before its one read
                here = raw.tell()
                end = raw.seek(0, io.SEEK_END)
                raw.seek(here)
            stream = _HeaderReads(data_stream)
            # random-access mode: a member that is not read is seeked over, not looped over
            tar = tarfile.open(fileobj=stream, mode="r:")
            for info in tar:
                if not info.isfile():
                    if info.isdir():
                        continue
                    yield printable(info.name), None, "not a regular file (link or device)"
                    continue
                if printable(info.name) != info.name:
                    yield printable(info.name), None, "member name is not valid UTF-8"
                    continue
                parsed = split_member_name(info.name)
                if parsed is None:
                    yield info.name, None, "unsafe or unnamed archive member path"
                    continue
                if max_member_bytes is not None and info.size > max_member_bytes:
                    yield info.name, None, (f"{info.size:,} bytes, over the --max-member-bytes limit of "
                                            f"{max_member_bytes:,}; not read")
                    continue
                member = info.name
                if end is not None and info.offset_data + info.size <= end:
                    data = tar.extractfile(info).read()
                else:
                    data = _read_declared(tar.extractfile(info), info.size)
                member = ""
                yield parsed[0], parsed[1], data
            if stream.last_block != bytes(tarfile.BLOCKSIZE):
                raise tarfile.ReadError("it ends without its end-of-archive marker: cut short?")
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as e:
        if strict:
            raise ShardError(f"{path}: unreadable tar archive ({e})") from e
        if member:
            yield member, None, (f"the archive is cut short or corrupt inside this member ({e}); "
                                 "the members before it are kept")
        else:
            kept = "; the members before this point are kept" if tar is not None else ""
            yield "", None, f"unreadable tar archive ({e}){kept}"


def _read_declared(f, size: int) -> bytes:
    """A member's `size` bytes from an archive of unknown length, read in 64 MiB pieces: a
    header may declare gigabytes the archive does not hold, and one read of the declared
    size would allocate them first (the pieces are joined at the end: twice a large
    member's size for a moment, where a plain tar's member is read at once)."""
    chunks, left = [], size
    while left:
        chunk = f.read(min(left, 64 << 20))
        if not chunk:
            raise tarfile.ReadError("unexpected end of data")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def group_samples(members: Iterator) -> Iterator[tuple[str, dict[str, bytes]] | tuple[str, None, str]]:
    """Group consecutive members with one key into samples (webdataset's rule).

    Records (name, None, reason) pass through. A member name seen before in the archive
    yields a record instead: the first copy is kept (stock readers would fail on repeats).
    """
    cur_key, cur = None, {}
    seen = set()
    for item in members:
        key, ext, data = item
        if ext is None:
            yield key, None, data
            continue
        if (key, ext) in seen:
            yield f"{key}.{ext}", None, "duplicate member name in the archive; the first copy is kept"
            continue
        seen.add((key, ext))
        if key != cur_key and cur:
            yield cur_key, cur
            cur = {}
        cur_key = key
        cur[ext] = data
    if cur:
        yield cur_key, cur
