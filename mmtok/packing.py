"""Packing samples into shards, the runner's writer: one open shard per group (every sample
of a group has the same member names, so stock readers open the group), closed at
`max_count` samples or `max_size` bytes, streamed to a temporary name (memory holds index
rows, never payloads), fsynced, recorded in `_stats/` (size, sha256, frontier) and then
renamed into place. mmtok/runner.py drives it."""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from mmtok.dispatch import StageError
from mmtok.shards import SHARD_RE, atomic_write, dumps_meta, naming, temp_path
from mmtok.shardwriter import ShardWriter
from mmtok.stagelog import _Log

STATS_DIR = "_stats"
DUPLICATES = "duplicates.jsonl"


@dataclass
class Sample:
    """One output sample. `members` are payloads by extension; the runner adds `json`
    from `meta`. `index` holds extra scalar columns for index.parquet."""

    key: str
    group: str
    members: dict[str, bytes]
    meta: dict
    index: dict = field(default_factory=dict)


class _OpenShard:
    """A shard being written: its members go to a temporary file as they come, so memory
    holds its index rows, never its payloads (a shard may be `--max-size` 1 GiB)."""

    def __init__(self, out: Path, group: str, number: int):
        self.group, self.number = group, number
        self.path = out / self.name
        self.tmp = temp_path(self.path)
        self.file = open(self.tmp, "wb")
        self.writer = ShardWriter(self.file)
        self.index: list[dict] = []
        self.first_item: int | None = None
        self.bytes = 0

    @property
    def name(self) -> str:
        return f"{self.group}-{self.number:06d}.tar"

    def add(self, item_index: int, sub: int, s: Sample, meta_bytes: bytes) -> None:
        with naming(self.path):
            locs = self.writer.add(s.key, {**s.members, "json": meta_bytes})
        if self.first_item is None:
            self.first_item = item_index
        self.index.append({
            "key": s.key,
            "shard": self.name,
            "group": self.group,
            "modality": s.meta.get("modality"),
            "sha256": s.meta.get("sha256"),
            "members": [{"ext": e, "offset": l.offset, "size": l.size} for e, l in sorted(locs.items())],
            "_item": [item_index, sub],
            **s.index,
        })

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def _sample_bytes(members: dict[str, bytes]) -> int:
    return sum(512 + (len(v) + 511) // 512 * 512 for v in members.values())


def _intact(path: Path, st: dict) -> bool:
    """The finished shard is on disk with the size and sha256 its stats record wrote down."""
    import hashlib

    try:
        if path.stat().st_size != st["bytes"]:
            return False
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest() == st["sha256"]
    except FileNotFoundError:
        return False


class _Writer:
    def __init__(self, out: Path, max_count: int, max_size: int, dedup: bool, workers: int = 1):
        self.out = out
        self.max_count, self.max_size, self.dedup = max_count, max_size, dedup
        self.stats_dir = out / STATS_DIR
        self.stats_dir.mkdir(parents=True, exist_ok=True)
        self.open: dict[str, _OpenShard] = {}
        self.done: set[tuple[int, int]] = set()
        self.seen: dict[str, str] = {}
        self.next_number: dict[str, int] = collections.Counter()
        self.frontier = 0
        self.finished = self._load_finished(workers)

    def _load_finished(self, workers: int) -> list[dict]:
        """Trust finished shards only as far as they check out. From the first one that is
        missing, truncated or altered (in closing order), it and every later shard are
        dropped, which is the state right after the shard before it closed: the replay from
        that shard's frontier rebuilds them, byte for byte."""
        records = []
        for p in self.stats_dir.glob("*.json"):
            try:
                st = json.loads(p.read_text())
                if f"{st['name']}.json" != p.name or not SHARD_RE.match(st["name"]):
                    raise ValueError("names another file")  # it must name a shard here, never a path
                records.append((int(st["seq"]), st))
            except (ValueError, KeyError, TypeError):
                raise StageError(f"{p}: unreadable resume record; rerun with --overwrite to start this job again, "
                                 "or use a new --out") from None
        records = [st for _, st in sorted(records, key=lambda r: r[0])]
        with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:  # hashing releases the GIL
            ok = list(pool.map(lambda st: _intact(self.out / st["name"], st), records))
        keep = records[:ok.index(False)] if False in ok else records
        for st in records[len(keep):]:
            (self.out / st["name"]).unlink(missing_ok=True)  # named by our own record: ours to delete
            (self.stats_dir / f"{st['name']}.json").unlink()
        for st in keep:
            self.frontier = max(self.frontier, st["frontier"])
            self.next_number[st["group"]] = max(self.next_number[st["group"]], st["number"] + 1)
            for row in st["index"]:
                self.done.add(tuple(row["_item"]))
                if self.dedup and row.get("sha256"):
                    self.seen[row["sha256"]] = row["key"]
        return keep

    def add(self, item_index: int, sub: int, sample: Sample, dup_log: _Log, name: str) -> bool:
        if (item_index, sub) in self.done:
            return True
        h = sample.meta.get("sha256")
        if self.dedup and h:
            if h in self.seen:
                dup_log.add({"index": item_index, "input": name, "sha256": h, "duplicate_of": self.seen[h]})
                return False
            self.seen[h] = sample.key
        meta_bytes = dumps_meta(sample.meta)
        size = _sample_bytes(sample.members) + 512 + len(meta_bytes)
        shard = self.open.get(sample.group)
        if shard and shard.index and (len(shard.index) >= self.max_count or shard.bytes + size > self.max_size):
            self._flush(shard, item_index)
            shard = None
        if shard is None:
            shard = self.open[sample.group] = _OpenShard(self.out, sample.group, self.next_number[sample.group])
            self.next_number[sample.group] += 1
        shard.add(item_index, sub, sample, meta_bytes)
        shard.bytes += size
        return True

    def _flush(self, shard: _OpenShard, current_item: int) -> None:
        del self.open[shard.group]
        target = shard.path
        with naming(target):
            shard.writer.close()
            shard.file.flush()
            os.fsync(shard.file.fileno())
        shard.file.close()
        if target.exists():  # no record of ours names it (those are gone by now): a user's file
            shard.tmp.unlink()
            raise StageError(f"{target} is in the way: this job did not write it and will not replace it; "
                             "move it elsewhere, or use a new --out")
        index = shard.index
        frontier = min([current_item] + [o.first_item for o in self.open.values() if o.first_item is not None])
        stats = {
            "name": shard.name,
            "group": shard.group,
            "number": shard.number,
            "seq": len(self.finished),
            "samples": len(index),
            "bytes": shard.writer.offset,
            "sha256": shard.writer.sha256.hexdigest(),
            "by_modality": dict(collections.Counter(r["modality"] for r in index)),
            "frontier": frontier,
            "index": index,
        }
        # the record first, then the rename: a shard file under its name always has a record,
        # so whatever in OUT has none was not written here (a record without its shard is redone)
        atomic_write(self.stats_dir / f"{shard.name}.json", json.dumps(stats, sort_keys=True).encode())
        os.replace(shard.tmp, target)
        self.finished.append(stats)

    def close(self, end: int) -> None:
        for shard in sorted(self.open.values(), key=lambda s: s.group):
            self._flush(shard, end)

    def abort(self) -> None:
        """A failed run: free the open shards' temporary files (the disk may be full)."""
        for shard in self.open.values():
            shard.discard()
        self.open.clear()
