"""WebDataset shard files: deterministic writing, safe reading, random access.

A shard directory holds `<group>-NNNNNN.tar` files, `manifest.json`, `index.parquet`
and `quarantine.jsonl` (see docs/FORMATS.md). Every sample in one group has the same
member names, so stock readers (webdataset, Hugging Face `datasets`) open each group.

Reading never unpickles and never uses a member name as a path: members come back as
raw bytes keyed by their extension.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import queue
import re
import tarfile
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

MANIFEST = "manifest.json"
INDEX = "index.parquet"
QUARANTINE = "quarantine.jsonl"
SHARD_RE = re.compile(r"^(?P<group>[a-z0-9_-]+?)-(?P<num>\d{6})\.tar$")
# Extensions a reader must never hand to a decoder that unpickles.
PICKLE_EXTS = {"pyd", "pickle", "pkl", "pth", "pt", "ckpt"}


class ShardError(Exception):
    """A shard directory or file that cannot be read; the message names it."""


def dumps_meta(meta: dict) -> bytes:
    """Canonical JSON so that equal metadata gives equal bytes."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def content_hash(members: dict[str, bytes]) -> str:
    """A sample's `sha256`: its payload members (never the `json` metadata member) in
    extension order, each as `<ext>\\0<length>\\0` + bytes, hashed with sha256.

    The length prefix keeps member boundaries apart ({"a": b"xy", "b": b""} differs
    from {"a": b"x", "b": b"y"}). Every stage computes a sample's `sha256` with this, so
    dedup and content-addressed lookups agree across stages. A `doc` sample has no
    payload; it hashes `{"segments": dumps_meta(segments)}`.
    """
    h = hashlib.sha256()
    for ext in sorted(members):
        h.update(f"{ext}\0{len(members[ext])}\0".encode())
        h.update(members[ext])
    return h.hexdigest()


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


@dataclass
class MemberLoc:
    offset: int  # byte offset of the member's data in the tar file
    size: int


class ShardWriter:
    """Writes one tar with fixed metadata so the bytes depend only on the content.

    Headers come from tarfile; data is written directly (one write per member) and the
    file's sha256 is computed on the way, so the shard is never read back. The hashing
    runs in a thread (hashlib releases the GIL), beside the writing.
    """

    def __init__(self, fileobj):
        self._f = fileobj
        self.offset = 0
        self.sha256 = hashlib.sha256()
        self._chunks: queue.SimpleQueue = queue.SimpleQueue()
        self._hasher = threading.Thread(target=self._hash, daemon=True)
        self._hasher.start()

    def _hash(self) -> None:
        while (chunk := self._chunks.get()) is not None:
            self.sha256.update(chunk)

    def _write(self, data: bytes) -> None:
        self._f.write(data)
        self._chunks.put(data)
        self.offset += len(data)

    def add(self, key: str, members: dict[str, bytes]) -> dict[str, MemberLoc]:
        locs = {}
        for ext in sorted(members):
            data = members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._write(info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"))
            locs[ext] = MemberLoc(self.offset, len(data))
            self._write(data)
            if len(data) % 512:
                self._write(b"\0" * (512 - len(data) % 512))
        return locs

    def close(self) -> None:
        # end-of-archive: two zero blocks, padded to tarfile's 10 KiB record size
        end = self.offset + 1024
        self._write(b"\0" * (1024 + (-end) % tarfile.RECORDSIZE))
        self._chunks.put(None)
        self._hasher.join()


@dataclass
class ShardSample:
    key: str
    members: dict[str, bytes]
    shard: str = ""

    @property
    def meta(self) -> dict:
        raw = self.members.get("json")
        return json.loads(raw) if raw else {}


def iter_tar(path: str | Path, fileobj=None) -> Iterator[tuple[str, str, bytes] | tuple[str, None, str]]:
    """Yield (key, ext, data) per regular member, in archive order.

    Unsafe or extension-less member names yield (name, None, reason) instead, so callers can
    quarantine them; their data is never read. A truncated archive raises ShardError.
    """
    try:
        tar = tarfile.open(path if fileobj is None else None, mode="r|*", fileobj=fileobj)
        for info in tar:
            if not info.isfile():
                if info.isdir():
                    continue
                yield info.name, None, "not a regular file (link or device)"
                continue
            parsed = split_member_name(info.name)
            if parsed is None:
                yield info.name, None, "unsafe or unnamed archive member path"
                continue
            f = tar.extractfile(info)
            yield parsed[0], parsed[1], f.read() if f else b""
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise ShardError(f"{path}: unreadable tar archive ({e})") from e


def group_samples(members: Iterator) -> Iterator[tuple[str, dict[str, bytes]] | tuple[str, None, str]]:
    """Group consecutive members with one key into samples (webdataset's rule)."""
    cur_key, cur = None, {}
    for item in members:
        key, ext, data = item
        if ext is None:
            yield key, None, data
            continue
        if key != cur_key and cur:
            yield cur_key, cur
            cur = {}
        cur_key = key
        if ext in cur:  # a repeated member name: keep the first, as stock readers would fail
            continue
        cur[ext] = data
    if cur:
        yield cur_key, cur


def list_shards(directory: str | Path) -> list[Path]:
    d = Path(directory)
    if not d.is_dir():
        raise ShardError(f"{d}: not a directory")
    return sorted(p for p in d.iterdir() if SHARD_RE.match(p.name))


def load_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardError(f"{directory}: no {MANIFEST}; is this a finished mmtok shard directory?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: corrupt manifest ({e})") from e


@dataclass
class ShardReader:
    """Iterate or randomly access an mmtok shard directory, split by rank and worker.

    Iteration assigns whole shards round-robin to (rank, worker) slots, so every sample is
    seen exactly once across all slots. Random access reads one member by seek using the
    byte offsets kept in `index.parquet`.
    """

    directory: Path
    groups: tuple[str, ...] | None = None
    _index: dict | None = field(default=None, repr=False)

    def __post_init__(self):
        self.directory = Path(self.directory)
        self.manifest = load_manifest(self.directory)

    @property
    def shards(self) -> list[Path]:
        names = [s["name"] for s in self.manifest["shards"]]
        if self.groups is not None:
            names = [n for n in names if SHARD_RE.match(n)["group"] in self.groups]
        return [self.directory / n for n in names]

    def check(self) -> None:
        """Fail early, naming the shard, when a listed shard is missing or has the wrong size."""
        for s in self.manifest["shards"]:
            p = self.directory / s["name"]
            if not p.exists():
                raise ShardError(f"{p}: listed in the manifest but missing")
            if p.stat().st_size != s["bytes"]:
                raise ShardError(f"{p}: {p.stat().st_size} bytes on disk, manifest says {s['bytes']} (corrupt or truncated)")

    def __iter__(self) -> Iterator[ShardSample]:
        return self.iter_samples()

    def iter_samples(self, rank: int = 0, world_size: int = 1, worker: int = 0, num_workers: int = 1) -> Iterator[ShardSample]:
        slot, slots = rank * num_workers + worker, world_size * num_workers
        for i, shard in enumerate(self.shards):
            if i % slots != slot:
                continue
            for item in group_samples(iter_tar(shard)):
                if len(item) == 2:
                    yield ShardSample(item[0], item[1], shard.name)

    def index(self):
        """The per-sample index as a pyarrow Table."""
        import pyarrow.parquet as pq

        if self._index is None:
            self._index = pq.read_table(self.directory / INDEX)
        return self._index

    def lookup(self) -> dict[str, tuple[str, dict]]:
        """key -> (shard name, {ext: (offset, size)})."""
        t = self.index().select(["key", "shard", "members"]).to_pylist()
        return {r["key"]: (r["shard"], {m["ext"]: (m["offset"], m["size"]) for m in r["members"]}) for r in t}

    def read_member(self, shard: str, offset: int, size: int) -> bytes:
        with open(self.directory / shard, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise ShardError(f"{self.directory / shard}: truncated at offset {offset}")
        return data


def npy_bytes(array) -> bytes:
    """An array as a `.npy` member (never pickled objects)."""
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes):
    """A `.npy` member back to an array; refuses pickled object arrays."""
    import numpy as np

    return np.load(io.BytesIO(data), allow_pickle=False)


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
