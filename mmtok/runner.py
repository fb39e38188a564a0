"""The one stage runner every data stage uses.

A stage is a function from one input item to output samples (or quarantine records),
optionally followed by a batched function run in the main process (for model-backed
stages on a GPU). The runner owns everything else:

- workers: items go to a process pool (or Ray tasks) in bounded windows; results come
  back in input order, so the output bytes never depend on `--workers` or `--backend`;
- packing: samples are appended to one open shard per group (every sample of a group has
  the same member names, so stock readers open the group) and a shard closes at
  `max_count` samples or `max_size` bytes;
- atomic writes and resume: a shard streams to a temporary name as its samples come
  (memory never holds a shard), is fsynced, its stats record (size, sha256) is written,
  then it is renamed. A shard whose record checks out (size and sha256) is finished and
  never redone. Each stats record carries a frontier: every item before it was fully
  resolved when the shard closed. A rerun replays from the newest frontier, dropping
  outputs already in finished shards, which rebuilds exactly the open shards of the
  killed run; a missing or damaged shard drops it and the shards closed after it, and
  the replay starts from the frontier before it;
- safety: one job per OUT (`mmtok.locks`); an OUT that overlaps an input is refused; the
  input listing is fingerprinted and a rerun over changed inputs is refused; --overwrite
  and the sweep of temporary files delete only what this stage's records name;
- quarantine: a bad item becomes a record (input, stage, reason); an exception inside a
  stage function is turned into one too. `max_error_rate` decides the exit status;
- dedup (optional): samples whose content hash was already written are dropped and logged;
- a manifest (`manifest.json`) and a per-sample index (`index.parquet`) at the end.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

# BACKENDS, Item, Quarantined, StageError and progress_bar are imported from here across the tree
from mmtok.dispatch import BACKENDS, Item, Quarantined, StageError, _ordered_map, _tasks
from mmtok.locks import exclusive
from mmtok.packing import DUPLICATES, STATS_DIR, Sample, _Writer  # noqa: F401 (Sample: imported from here across the tree)
from mmtok.shards import INDEX, MANIFEST, QUARANTINE, SHARD_RE, STAGE_FILE, atomic_write, is_stage_output, remove_temps
from mmtok.stagelog import _Log, progress_bar


class Stage(Protocol):
    """A data stage as a picklable object (mmtok.tokenize.ImageCodes and Tokenize, ...):
    `config` names all that decides its output, `items(start, end)` lists its input items
    (of input shards `start:end`), calling it maps one item's payload in a worker, and
    `batch` (or None) maps a batch of those results in this process (a model on a GPU).
    run_stage takes its parts: `run_stage(s.name, s.items(0, None), s, out, config=s.config,
    batch_fn=s.batch)`."""

    name: str
    config: dict
    batch: Callable[[list], list] | None

    def items(self, start: int = 0, end: int | None = None) -> Iterable[Item]: ...

    def __call__(self, payload: Any) -> Any: ...



@dataclass
class Summary:
    stage: str
    out: str
    items: int = 0
    samples: int = 0
    shards: int = 0
    bytes: int = 0
    quarantined: int = 0
    duplicates: int = 0
    by_modality: dict = field(default_factory=dict)
    by_group: dict = field(default_factory=dict)
    resumed_shards: int = 0
    seconds: float = 0.0
    error_rate: float = 0.0
    max_error_rate: float = 0.0

    @property
    def failed(self) -> bool:
        return self.error_rate > self.max_error_rate

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["failed"] = self.failed
        return d



_RECORDS = (MANIFEST, INDEX, QUARANTINE, DUPLICATES, STAGE_FILE)  # the fixed names a stage writes in OUT


def check_paths(inputs: Iterable[str | Path], out: str | Path | None = None) -> None:
    """Refuse an empty input path (Path("") would mean the current directory), and an OUT
    that is, holds or sits inside an input: a stage would read its own output (and a walk
    of OUT would never end). Every stage runs this (run_stage, and the CLI before it)."""
    inputs = list(inputs)
    if any(not str(spec).strip() for spec in inputs):
        raise StageError("an input path is empty (\"\"); name a file or directory")
    if out is None:
        return
    from mmtok.fs import as_location, is_url

    if is_url(out):  # only a URL input can overlap it; compared as names under one prefix
        out = str(as_location(out))
        for spec in map(str, inputs):
            p = str(as_location(spec)) if is_url(spec) else None
            if p is not None and (p == out or out.startswith(p + "/") or p.startswith(out + "/")):
                raise StageError(f"--out {out} and input {spec} overlap: the stage would read its own output; "
                                 "choose an --out outside the inputs")
        return
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise StageError(f"--out {out} is a file, not a directory")
    for spec in inputs:
        if is_url(spec):  # a local OUT is never inside a bucket
            continue
        p = Path(spec).resolve()
        if p == out or p in out.parents:
            raise StageError(f"--out {out} is inside input {spec}: the stage would read its own output; "
                             "choose an --out outside the inputs")
        if out in p.parents:
            raise StageError(f"input {spec} is inside --out {out}; choose an --out that holds no inputs")


def input_listing(inputs: Iterable[str | Path]) -> list[dict]:
    """A fingerprint of what the inputs hold, per input: file count, bytes and a sha256 of
    (path, size, mtime) rows. An mmtok output directory is fingerprinted by the bytes of its
    manifest and index and its shards' sizes and mtimes, since a rerun of the stage that
    wrote it rewrites those two with the same bytes. Dot files are skipped, as the input
    walkers skip them. An input at a URL is fingerprinted the same way, by the sizes its
    store lists (objects have no mtime to trust), its manifest and index by their bytes."""
    import hashlib

    from mmtok.fs import as_location

    listing = []
    for spec in inputs:
        root = as_location(spec)
        rows = []
        if root.is_dir() and is_stage_output(p.name for p in root.iterdir()):
            for name in (MANIFEST, INDEX):
                data = (root / name).read_bytes() if (root / name).is_file() else b""
                rows.append([name, len(data), hashlib.sha256(data).hexdigest()])
            files = [p for p in root.iterdir() if SHARD_RE.match(p.name)] if isinstance(root, Path) else None
        elif isinstance(root, Path):
            files = ([p for p in root.rglob("*") if not p.name.startswith(".") and p.is_file()] if root.is_dir()
                     else [root] if root.exists() else [])
        else:
            files = None
        if files is None:  # at a URL: one listing, sizes only (objects have no mtime to trust)
            stage_out = bool(rows)
            rows += [[rel, size] for rel, size in _remote_files(root)
                     if not stage_out or SHARD_RE.match(rel)]
        for p in files or ():
            st = p.stat()
            rows.append([p.relative_to(root).as_posix() if p != root else "", st.st_size, st.st_mtime_ns])
        rows.sort()
        listing.append({"input": str(spec), "files": len(rows), "bytes": sum(r[1] for r in rows),
                        "sha256": hashlib.sha256(json.dumps(rows).encode()).hexdigest()})
    return listing


def _remote_files(root) -> list[tuple[str, int]]:
    """(name under `root`, size) of the objects at a URL, dot files left out; a single
    object is named ""."""
    fs, base = root.fs, root.path
    fs.invalidate_cache(base)
    found = fs.find(base, detail=True) if fs.isdir(base) else ({base: fs.info(base)} if fs.exists(base) else {})
    out = []
    for path, info in found.items():
        rel = path[len(base):].strip("/")
        if info.get("type", "file") == "file" and not any(part.startswith(".") for part in rel.split("/")):
            out.append((rel, int(info.get("size") or 0)))
    return out


def _changed_inputs(have: list[dict], want: list[dict]) -> str:
    then = {d["input"]: d for d in have}
    parts = []
    for d in want:
        old = then.get(d["input"])
        if old is None:
            parts.append(f"{d['input']} is new")
        elif old["sha256"] != d["sha256"] and (old["files"], old["bytes"]) == (d["files"], d["bytes"]):
            # the fingerprint has each file's mtime: a copy made again counts, same bytes or not
            parts.append(f"{d['input']} changed: the same {d['files']} files and {d['bytes']:,} bytes as then, but "
                         "a file was modified, renamed or copied again (a new modification time counts)")
        elif old["sha256"] != d["sha256"]:
            parts.append(f"{d['input']} changed ({old['files']} files, {old['bytes']:,} bytes then; "
                         f"{d['files']} files, {d['bytes']:,} bytes now)")
    return "; ".join(parts) or "the inputs changed"


def _remove_own_output(out: Path) -> None:
    """--overwrite: delete what this stage's records say it wrote, and nothing else."""
    stats_dir = out / STATS_DIR
    for p in stats_dir.glob("*.json") if stats_dir.is_dir() else []:
        try:
            name = json.loads(p.read_text())["name"]
        except (ValueError, KeyError, TypeError):
            name = None  # a torn record names nothing we can trust
        if isinstance(name, str) and SHARD_RE.match(name) and p.name == f"{name}.json":
            (out / name).unlink(missing_ok=True)
        p.unlink()
    for name in _RECORDS:
        (out / name).unlink(missing_ok=True)


def _own_name(name: str) -> bool:
    return name in _RECORDS or bool(SHARD_RE.match(name))


def _check_stage_file(out: Path, stage: str, config: dict, inputs: list[dict], overwrite: bool) -> None:
    want = {"stage": stage, "config": config, "inputs": inputs}
    path = out / STAGE_FILE
    if path.exists():
        try:
            have = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            have = {}
        if not overwrite:
            if {k: have.get(k) for k in ("stage", "config")} != {"stage": stage, "config": config}:
                raise StageError(
                    f"{out} holds output of a different job ({have.get('stage')} with other inputs or options); "
                    "use a new --out directory, or --overwrite to start it again"
                )
            if have.get("inputs") != inputs:
                raise StageError(f"the inputs of the job in {out} changed since it started: "
                                 f"{_changed_inputs(have.get('inputs') or [], inputs)}; resuming would mix old and "
                                 "new inputs: rerun with --overwrite to start it again, or use a new --out")
        elif have != want:
            _remove_own_output(out)
    else:
        theirs = [n for n in _RECORDS + (STATS_DIR,) if (out / n).exists()]
        if theirs:
            raise StageError(f"{out} holds {', '.join(theirs)} that no mmtok stage recorded writing there; "
                             "use a new --out (mmtok never deletes files it did not write)")
    remove_temps(out, _own_name)  # leftovers of a killed run
    if (out / STATS_DIR).is_dir():
        remove_temps(out / STATS_DIR, lambda n: n.endswith(".json") and bool(SHARD_RE.match(n[:-5])))
    atomic_write(path, json.dumps(want, sort_keys=True, indent=1).encode())


@contextlib.contextmanager
def disk_full_resumes(out: Path) -> Iterator[None]:
    """A full disk (or quota) becomes a one-line StageError naming the file: the work done so
    far is kept, and rerunning the same command resumes it."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise StageError(f"{e.filename or out}: no space left on device; free some space, then rerun the same "
                         "command: it resumes where it stopped") from None


class _Results:
    """Where each item's results go, in input order: samples to the writer, quarantine
    records to the log; with `batch_fn`, the stage's values wait for a batch first (a
    quarantined item flushes the batch before it, so the order holds)."""

    def __init__(self, stage: str, writer: _Writer, qlog: _Log, dlog: _Log, batch_fn, batch_size: int):
        self.stage, self.writer, self.qlog, self.dlog = stage, writer, qlog, dlog
        self.batch_fn, self.batch_size = batch_fn, batch_size
        self.names: dict[int, str] = {}
        self.pending: list[tuple[int, Any]] = []

    def named(self, tasks):
        """The tasks, remembering each item's name for its records."""
        for t in tasks:
            for i, item in t:
                self.names[i] = item.name
            yield t

    def add(self, i: int, res: list) -> None:
        if self.batch_fn is None or (res and isinstance(res[0], Quarantined)):
            if self.batch_fn is not None:
                self.flush()
            self._emit(i, res)
        else:
            self.pending.append((i, res[0]))
            if len(self.pending) >= self.batch_size:
                self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        outs = self.batch_fn([v for _, v in self.pending])
        for (i, _), res in zip(self.pending, outs):
            self._emit(i, res)
        self.pending.clear()

    def _emit(self, i: int, results: list) -> None:
        name, sub = self.names.pop(i), 0
        for r in results:
            if isinstance(r, Quarantined):
                rec = {"index": i, "input": r.input or name, "stage": self.stage, "reason": r.reason}
                self.qlog.add(rec if r.counts else {**rec, "counts": False})
            else:
                self.writer.add(i, sub, r, self.dlog, name)
                sub += 1


def run_stage(
    stage: str,
    items: Iterable[Item],
    fn: Callable[[Any], Any],
    out: str | Path,
    *,
    config: dict,
    workers: int = 1,
    max_count: int = 10_000,
    max_size: int = 1 << 30,
    max_error_rate: float = 0.05,
    dedup: bool = False,
    batch_fn: Callable[[list], list] | None = None,
    batch_size: int = 32,
    task_size: int = 4,
    threads: bool = False,
    backend: str = "local",
    total: int | None = None,
    count: Iterable | None = None,
    progress: bool | Callable[[int], None] = True,
    overwrite: bool = False,
) -> Summary:
    """Map `fn` over `items` and write shards into `out`; see the module docstring.

    `fn(payload)` returns a Sample, a Quarantined, or a list of them. With `batch_fn`,
    `fn` returns an intermediate value (or Quarantined) and `batch_fn(list_of_values)`
    returns, per value, a list of Sample/Quarantined; it runs in this process.
    `config` names everything that decides the output (not `workers`, not `backend`).
    `threads` runs the workers as threads instead of processes (see `_ordered_map`).
    `count`, where `total` is unknown: the items again (a cheap listing), counted in a thread
    while the work runs, for the progress bar's total. `progress` may be a function instead
    of the bar, told the items already done, then 1 per item (a Ray actor's counter).
    `backend="ray"` runs `fn` as Ray tasks (a cluster named by RAY_ADDRESS, or a local
    instance); `batch_fn` and the writing stay in this process (docs/DISTRIBUTED.md).
    """
    if backend not in BACKENDS:
        raise StageError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    t0 = time.perf_counter()
    out = Path(out)
    check_paths(config.get("inputs", ()), out)
    # the lock comes first: an --overwrite must not delete under a running job
    with disk_full_resumes(out), exclusive(out):
        _check_stage_file(out, stage, config, input_listing(config.get("inputs", ())), overwrite)
        writer = _Writer(out, max_count, max_size, dedup, workers)
        results = _Results(stage, writer, _Log(out / QUARANTINE), _Log(out / DUPLICATES), batch_fn, batch_size)
        summary = Summary(stage=stage, out=str(out), max_error_rate=max_error_rate, resumed_shards=len(writer.finished))
        start = writer.frontier
        n_items = start
        try:
            with progress_bar(stage, total, start, progress, count) as bar:
                tasks = results.named(_tasks(items, start, task_size))
                for task_out in _ordered_map(fn, tasks, workers, threads, backend):
                    for i, res in task_out:
                        n_items = i + 1
                        results.add(i, res)
                        bar.advance()
                results.flush()
            writer.close(n_items)
        except BaseException:
            writer.abort()
            raise
        finally:
            q_rows, d_rows = results.qlog.finish(), results.dlog.finish()

        n_items = max(n_items, max((r["index"] + 1 for r in q_rows), default=0))
        summary.items = n_items if total is None else max(total, n_items)
        bad_items = {r["index"] for r in q_rows if r.get("counts", True)}
        summary.quarantined = len(q_rows)
        summary.duplicates = len(d_rows)
        summary.error_rate = len(bad_items) / summary.items if summary.items else 0.0
        _finish(out, stage, config, writer.finished, summary)
        summary.seconds = round(time.perf_counter() - t0, 3)
        return summary



def _finish(out: Path, stage: str, config: dict, finished: list[dict], summary: Summary) -> None:
    from mmtok.indexfile import index_bytes

    finished = sorted(finished, key=lambda s: s["name"])
    rows = []
    for st in finished:
        for r in st["index"]:
            # sorted columns: rows of resumed shards come back from JSON with sorted keys
            rows.append({k: r[k] for k in sorted(r) if k != "_item"})
    by_mod, by_group = collections.Counter(), collections.Counter()
    for st in finished:
        by_group[st["group"]] += st["samples"]
        by_mod.update(st["by_modality"])
    summary.samples = len(rows)
    summary.shards = len(finished)
    summary.bytes = sum(s["bytes"] for s in finished)
    summary.by_modality = dict(sorted(by_mod.items()))
    summary.by_group = dict(sorted(by_group.items()))
    atomic_write(out / INDEX, index_bytes(rows))
    manifest = {
        "format": "mmtok-shards/1",
        "stage": stage,
        "config": config,
        "shards": [{k: s[k] for k in ("name", "group", "samples", "bytes", "sha256", "by_modality")} for s in finished],
        "totals": {
            "inputs": summary.items,
            "samples": summary.samples,
            "shards": summary.shards,
            "bytes": summary.bytes,
            "by_modality": summary.by_modality,
            "by_group": summary.by_group,
            "quarantined": summary.quarantined,
            "duplicates": summary.duplicates,
        },
    }
    atomic_write(out / MANIFEST, json.dumps(manifest, sort_keys=True, indent=1).encode())
