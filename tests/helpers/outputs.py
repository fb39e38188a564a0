"""Reading a stage's output directory back: its samples by key, its quarantine records and
the bytes of its files (for the tests that compare two runs)."""

from __future__ import annotations

import json
from pathlib import Path

from mmtok.shards import ShardReader


def read_all(d: Path) -> dict[str, dict]:
    return {s.key: s.members for s in ShardReader(d)}


def quarantine(d: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(d) / "quarantine.jsonl").read_text().splitlines()]


def tree_bytes(d: Path) -> dict[str, bytes]:
    # not the resume records, nor the lock file (it holds the pid of the last writer)
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())
            if p.is_file() and not p.name.startswith("_") and p.name != ".mmtok.lock"}


def files(d: Path) -> dict[str, bytes]:
    """Every file under `d` by relative path, but the lock (it holds a pid)."""
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != ".mmtok.lock"}
