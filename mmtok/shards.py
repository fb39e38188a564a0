"""WebDataset shard files: deterministic writing, safe reading, random access.

A shard directory holds `<group>-NNNNNN.tar` files, `manifest.json`, `index.parquet`
and `quarantine.jsonl` (see docs/FORMATS.md). Every sample in one group has the same
member names, so stock readers (webdataset, Hugging Face `datasets`) open each group.

Reading never unpickles and never uses a member name as a path: members come back as
raw bytes keyed by their extension. The writer (`ShardWriter`) lives in mmtok.shardwriter.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from mmtok.fs import RemotePath, as_location, read_parquet, read_range

MANIFEST = "manifest.json"
INDEX = "index.parquet"
QUARANTINE = "quarantine.jsonl"
STAGE_FILE = "_stage.json"  # the job record a stage keeps in its OUT (mmtok.runner writes it)
SHARD_RE = re.compile(r"^(?P<group>[a-z0-9_-]+?)-(?P<num>\d{6})\.tar\Z")  # \Z: no trailing newline
# A sample key as every mmtok stage writes it: a plain name (no dots, slashes or spaces). A
# key read from a shard directory names members and files downstream, so no other passes.
KEY_RE = re.compile(r"[A-Za-z0-9_-]+")  # whole keys: fullmatch (and ^...$ in pyarrow's RE2)
TEMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-\d+$")  # what `temp_path` names
# Extensions a reader must never hand to a decoder that unpickles.
PICKLE_EXTS = {"pyd", "pickle", "pkl", "pth", "pt", "ckpt"}


def is_stage_output(names: Iterable[str]) -> bool:
    """Whether a directory holding `names` is an mmtok stage's output: it has a stage's job
    record, or a finished shard set (manifest, index and shards). The one rule for "this is
    our own output": its records are bookkeeping, never input, and it is fingerprinted by
    its manifest, index and shards."""
    names = set(names)
    return STAGE_FILE in names or (MANIFEST in names and INDEX in names and any(map(SHARD_RE.match, names)))


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
        _hash_member(h, ext, members[ext])
    return h.hexdigest()


def pair_hashes(members: dict[str, bytes], ext: str) -> tuple[str, str]:
    """`content_hash(members)` and `content_hash({ext: members[ext]})`: a pair's hash and its
    image's own. Where `ext` sorts first (jpg or png before txt) the image's bytes are hashed
    once, its own hash being the pair's state after it (sharding is bound by hashing)."""
    if min(members) != ext:
        return content_hash(members), content_hash({ext: members[ext]})
    h = hashlib.sha256()
    _hash_member(h, ext, members[ext])
    alone = h.hexdigest()  # hashlib goes on updating after a digest
    for other in sorted(members)[1:]:
        _hash_member(h, other, members[other])
    return h.hexdigest(), alone


def _hash_member(h, ext: str, data: bytes) -> None:
    h.update(f"{ext}\0{len(data)}\0".encode())
    h.update(data)


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


@dataclass
class ShardSample:
    key: str
    members: dict[str, bytes]
    shard: str = ""

    @property
    def meta(self) -> dict:
        raw = self.members.get("json")
        return json.loads(raw) if raw else {}


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


def list_shards(directory: str | Path) -> list[Path | RemotePath]:
    d = as_location(directory)
    if not d.is_dir():
        raise ShardError(f"{d}: not a directory")
    return sorted(p for p in d.iterdir() if SHARD_RE.match(p.name))


def require_keys(obj, keys, where) -> None:
    """Refuse a (hand-edited) JSON object that lacks a key mmtok reads, naming the file and key."""
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise ShardError(f"{where}: missing key {missing[0]!r}; restore the file, or rerun the command that wrote it")


def read_json(path: str | Path) -> dict:
    """A JSON object file (a run's config.json, train_state.json, ...); a damaged one is
    refused naming the file."""
    try:
        obj = json.loads(as_location(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ShardError(f"{path}: corrupt JSON ({e}); restore it, or rerun the command that wrote it") from None
    if not isinstance(obj, dict):
        raise ShardError(f"{path}: not a JSON object; restore it, or rerun the command that wrote it")
    return obj


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines log (metrics.jsonl, quarantine.jsonl); a line that is not a
    JSON object is refused naming the file and line."""
    out = []
    with as_location(path).open("r", encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ShardError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno}); "
                                 "fix or delete that line") from None
            except RecursionError:
                raise ShardError(f"{path} line {n}: JSON nested too deeply to read; fix or delete that line") from None
            if not isinstance(rec, dict):
                raise ShardError(f"{path} line {n}: not a JSON object; fix or delete that line")
            out.append(rec)
    return out


def read_record(directory, name: str, missing: str, not_a_dir: str, what: str) -> tuple[dict, object]:
    """`directory/name` parsed as JSON, and its location; a missing file, a file given for the
    directory and bad JSON are each one ShardError naming the input."""
    path = as_location(directory) / name
    try:
        return json.loads(path.read_text()), path
    except FileNotFoundError:
        raise ShardError(f"{directory}: no {name}; {missing}") from None
    except NotADirectoryError:
        raise ShardError(f"{directory}: a file, not {not_a_dir}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ShardError(f"{path}: corrupt {what} ({e})") from None


def load_manifest(directory: str | Path) -> dict:
    manifest, path = read_record(directory, MANIFEST, "is this a finished mmtok shard directory?",
                                 "a shard directory", "manifest")
    require_keys(manifest, ("stage", "shards", "totals"), path)
    redo = "restore the file, or rerun the command that wrote it"
    if not isinstance(manifest["shards"], list):
        raise ShardError(f"{path}: `shards` is not a list; {redo}")
    for i, s in enumerate(manifest["shards"]):
        require_keys(s, ("name", "group", "samples", "bytes"), f"{path} (shards[{i}])")
        # the name is joined to the directory: only a shard's own name may be read
        if not (isinstance(s["name"], str) and SHARD_RE.match(s["name"]) and isinstance(s["group"], str)
                and is_count(s["samples"]) and is_count(s["bytes"])):
            raise ShardError(f"{path} (shards[{i}]): not a shard record (a name GROUP-NNNNNN.tar in this directory, "
                             f"a group, sample and byte counts); {redo}")
    totals = manifest["totals"]
    if not isinstance(manifest["stage"], str) or not isinstance(totals, dict) or not all(
            is_count(v) or (isinstance(v, dict) and all(map(is_count, v.values()))) for v in totals.values()):
        raise ShardError(f"{path}: `stage` is not a name or `totals` not counts; {redo}")
    return manifest


def is_count(v) -> bool:
    """A count as a JSON record holds one: a non-negative int (not a bool)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


@dataclass
class ShardReader:
    """Iterate or randomly access an mmtok shard directory, split by rank and worker.

    Iteration assigns whole shards round-robin to (rank, worker) slots, so every sample is
    seen exactly once across all slots. Random access reads one member by seek using the
    byte offsets kept in `index.parquet`.
    """

    directory: Path | RemotePath  # a str is taken as a local path or an fsspec URL
    groups: tuple[str, ...] | None = None
    _index: dict | None = field(default=None, repr=False)

    def __post_init__(self):
        self.directory = as_location(self.directory)
        self.manifest = load_manifest(self.directory)

    @property
    def shards(self) -> list[Path | RemotePath]:
        names = [s["name"] for s in self.manifest["shards"]]
        if self.groups is not None:
            names = [n for n in names if SHARD_RE.match(n)["group"] in self.groups]
        return [self.directory / n for n in names]

    def check(self) -> None:
        """Fail early, naming the shard, when a listed shard is missing or has the wrong size."""
        for s in self.manifest["shards"]:
            p = self.directory / s["name"]
            try:
                size = p.stat().st_size  # one request per shard where the directory is remote
            except FileNotFoundError:
                raise ShardError(f"{p}: listed in the manifest but missing") from None
            if size != s["bytes"]:
                raise ShardError(f"{p}: {size} bytes on disk, manifest says {s['bytes']} (corrupt or truncated)")

    def __iter__(self) -> Iterator[ShardSample]:
        return self.iter_samples()

    def iter_samples(self, rank: int = 0, world_size: int = 1, worker: int = 0, num_workers: int = 1) -> Iterator[ShardSample]:
        slot, slots = rank * num_workers + worker, world_size * num_workers
        for i, shard in enumerate(self.shards):
            if i % slots != slot:
                continue
            for item in group_samples(iter_tar(shard)):
                if len(item) == 2:
                    check_key(item[0], shard)
                    yield ShardSample(item[0], item[1], shard.name)

    def index(self):
        """The per-sample index as a pyarrow Table, checked against the manifest (`check_index`)."""
        if self._index is None:
            index = read_parquet(self.directory / INDEX)
            check_index(index, self.manifest, self.directory / INDEX)
            self._index = index
        return self._index

    def lookup(self) -> dict[str, tuple[str, dict]]:
        """key -> (shard name, {ext: (offset, size)})."""
        t = self.index().select(["key", "shard", "members"]).to_pylist()
        return {r["key"]: (r["shard"], {m["ext"]: (m["offset"], m["size"]) for m in r["members"]}) for r in t}

    def read_member(self, shard: str, offset: int, size: int) -> bytes:
        data = read_range(self.directory / shard, offset, size)
        if len(data) != size:
            raise ShardError(f"{self.directory / shard}: truncated at offset {offset}")
        return data


def check_key(key: str, where) -> None:
    """Refuse a sample key read from a shard (`where`) that is not a plain name (KEY_RE)."""
    if not KEY_RE.fullmatch(key):
        raise ShardError(f"{where}: sample key {key!r} is not one mmtok writes (edited or damaged); rerun the stage "
                         "that wrote this directory")


def check_index(index, manifest: dict, where) -> None:
    """Refuse an index.parquet whose rows name a shard the manifest does not list, or a key
    that is not a plain name: an index is read by offset, so a row naming `../secret.txt` or
    `/etc/passwd` would be read as a shard (and a key names members and files downstream)."""
    import pyarrow.compute as pc

    names = {s["name"] for s in manifest["shards"]}
    if "shard" in index.column_names:
        unknown = set(pc.unique(index.column("shard")).to_pylist()) - names
        if unknown:
            raise ShardError(f"{where}: names {sorted(map(str, unknown))[0]!r}, not a shard its manifest lists (edited "
                             "or damaged); rerun the stage that wrote this directory")
    if "key" in index.column_names and index.num_rows:
        keys = index.column("key")
        if keys.null_count or not pc.all(pc.match_substring_regex(keys, f"^{KEY_RE.pattern}$")).as_py():
            raise ShardError(f"{where}: a sample key is not one mmtok writes (edited or damaged); "
                             "rerun the stage that wrote this directory")


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


def temp_path(path: Path) -> Path:
    """The temporary name a file is written under before its rename (matches TEMP_RE)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_temps(directory: Path, ours: Callable[[str], bool]) -> None:
    """Delete a killed run's leftovers: only `temp_path` names of files that `ours(name)`
    says this job writes, so a user's file is never taken for one."""
    for p in directory.iterdir():
        m = TEMP_RE.match(p.name)
        if m and ours(m["name"]) and p.is_file():
            p.unlink()


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """Give an OSError raised inside the block the file name `path` when it has none (a
    failed write() names no file), so the error message can say where it happened."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, then rename: readers never see half a file.
    On failure (a full disk) the temporary file is removed."""
    tmp = temp_path(path)
    try:
        with naming(path), open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
