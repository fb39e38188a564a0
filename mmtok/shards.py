"""WebDataset shard files: deterministic writing, safe reading, random access.

A shard directory holds `<group>-NNNNNN.tar` files, `manifest.json`, `index.parquet`
and `quarantine.jsonl` (see docs/FORMATS.md). Every sample in one group has the same
member names, so stock readers (webdataset, Hugging Face `datasets`) open each group.

Reading never unpickles and never uses a member name as a path: members come back as
raw bytes keyed by their extension (the tar reader is mmtok.tars). The writer
(`ShardWriter`) lives in mmtok.shardwriter.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from mmtok.fs import RemotePath, as_location, read_parquet, read_range
from mmtok.tars import ShardError, group_samples, iter_tar  # noqa: F401 (ShardError: imported from here across the tree)

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


@dataclass
class ShardSample:
    key: str
    members: dict[str, bytes]
    shard: str = ""

    @property
    def meta(self) -> dict:
        raw = self.members.get("json")
        return json.loads(raw) if raw else {}


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
