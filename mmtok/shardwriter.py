"""The shard writer: one WebDataset tar, written member by member with fixed metadata, so
its bytes depend only on its content, hashed on the way and handed to the disk as it goes.
`mmtok.shards` re-exports its names; readers are there.
"""

from __future__ import annotations

import functools
import hashlib
import tarfile
from dataclasses import dataclass


@dataclass
class MemberLoc:
    offset: int  # byte offset of the member's data in the tar file
    size: int


class ShardWriter:
    """Writes one tar with fixed metadata so the bytes depend only on the content.

    Each member goes straight from the caller's bytes to the file (header, data, padding;
    never copied, so memory holds the member being written, never the shard) and is hashed
    on the way in this thread: hashlib releases the GIL on large blocks, so worker threads
    keep reading while it hashes, and the shard is never read back. Every WRITEBACK bytes
    the kernel is asked to start writing the file out (`_start_writeback`), so the fsync
    before the rename waits for the last stretch, not for the whole of a 1 GiB shard.
    """

    WRITEBACK = 8 << 20

    def __init__(self, fileobj):
        self._f = fileobj
        self.offset = 0
        self.sha256 = hashlib.sha256()
        try:
            self._fd = fileobj.fileno()
        except (AttributeError, OSError):  # an in-memory file: nothing to write back
            self._fd = None
        self._written_back = 0

    def _write(self, data: bytes) -> None:
        self._f.write(data)
        self.sha256.update(data)
        self.offset += len(data)
        if self._fd is not None and self.offset - self._written_back >= self.WRITEBACK:
            self._f.flush()
            _start_writeback(self._fd, self._written_back, self.offset - self._written_back)
            self._written_back = self.offset

    def add(self, key: str, members: dict[str, bytes]) -> dict[str, MemberLoc]:
        locs = {}
        for ext in sorted(members):
            data = members[ext]
            self._write(member_header(f"{key}.{ext}", len(data)))
            locs[ext] = MemberLoc(self.offset, len(data))
            self._write(data)
            if len(data) % 512:
                self._write(bytes(512 - len(data) % 512))
        return locs

    def close(self) -> None:
        # end-of-archive: two zero blocks, padded to tarfile's 10 KiB record size
        end = self.offset + 1024
        self._write(bytes(1024 + (-end) % tarfile.RECORDSIZE))


def member_header(name: str, size: int) -> bytes:
    """The tar header ShardWriter writes for a member: what `tarfile.TarInfo(name).tobuf(GNU_FORMAT,
    "utf-8", "surrogateescape")` gives with size `size`, mode 0644, mtime, uid and gid 0 and
    no owner names. Packed here from a fixed block for names of up to 100 bytes and sizes
    under 8 GiB (only the name, size and checksum vary; tarfile takes ~9x as long, on the
    writer's path once per member); a longer name or a larger size goes to tarfile."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > 100 or size >= 8 ** 11:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
        return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
    size_field = b"%011o\0" % size
    # the checksum: the sum of every byte, its own field counted as spaces
    checksum = b"%06o\0 " % (_HEADER_SUM + sum(raw) + sum(size_field))
    return raw + _HEADER[len(raw):124] + size_field + _HEADER[136:148] + checksum + _HEADER[156:]


# the fixed fields of `member_header` (GNU magic, regular file, mode 0644, uid, gid and mtime 0),
# checksum as eight spaces
_HEADER = bytes(100) + b"0000644\0" + b"0000000\0" * 2 + bytes(12) + b"00000000000\0" + b" " * 8 + b"0" + bytes(100) \
    + tarfile.GNU_MAGIC + bytes(512 - 265)
_HEADER_SUM = sum(_HEADER)


@functools.cache
def _sync_file_range():
    """libc's sync_file_range (Linux), or None where there is none."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError, TypeError):  # not Linux (Windows has no CDLL(None))
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range of the file to disk, without waiting
    (SYNC_FILE_RANGE_WRITE): the disk works while the stage goes on. Only a hint: durability
    still comes from the fsync before the rename, which also reports any write error."""
    fn = _sync_file_range()
    if fn is not None:
        fn(fd, offset, length, 2)  # 2: SYNC_FILE_RANGE_WRITE
