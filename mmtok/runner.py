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
import concurrent.futures
import contextlib
import errno
import json
import multiprocessing
import multiprocessing.pool
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from mmtok.locks import exclusive
from mmtok.shards import (INDEX, MANIFEST, QUARANTINE, SHARD_RE, ShardWriter, atomic_write, dumps_meta, naming,
                          remove_temps, temp_path)

STATS_DIR = "_stats"
STAGE_FILE = "_stage.json"
DUPLICATES = "duplicates.jsonl"
BACKENDS = ("local", "ray")  # where stage functions run: this machine's pool, or Ray tasks


@dataclass
class Sample:
    """One output sample. `members` are payloads by extension; the runner adds `json`
    from `meta`. `index` holds extra scalar columns for index.parquet."""

    key: str
    group: str
    members: dict[str, bytes]
    meta: dict
    index: dict = field(default_factory=dict)


@dataclass
class Quarantined:
    input: str
    reason: str
    counts: bool = True  # False: recorded, but not a bad input (a row img2dataset never fetched)


@dataclass
class Item:
    """One unit of input: `name` identifies it in logs; `payload` is what the stage needs."""

    name: str
    payload: Any


class StageError(Exception):
    """A problem with the job as a whole (bad output dir, bad options); exit status 2."""


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


def _apply(fn: Callable, items: list[tuple[int, Item]]) -> list[tuple[int, list]]:
    """Run the stage function on a task of items; never let one item kill the job."""
    out = []
    for i, item in items:
        try:
            res = fn(item.payload)
            res = res if isinstance(res, list) else [res]
        except Exception as e:  # a bug or an unforeseen bad input: quarantine, keep going
            tb = traceback.extract_tb(e.__traceback__)[-1]
            res = [Quarantined(item.name, f"{type(e).__name__}: {e} (at {Path(tb.filename).name}:{tb.lineno})")]
        for r in res:
            if isinstance(r, Quarantined) and not r.input:
                r.input = item.name
        out.append((i, res))
    return out


_FORKED_FN: Callable | None = None


def _apply_forked(items):
    return _apply(_FORKED_FN, items)


def _ordered_map(fn, tasks: Iterator[list], workers: int, threads: bool = False,
                 backend: str = "local") -> Iterator[list]:
    """Map over tasks with a pool, in order, with a bounded number in flight.

    Processes by default. The pool is forked after `fn` is stored in a global, so stage
    functions may be closures: only the items travel to the workers. `threads=True` suits
    stages whose work releases the GIL (file reads, hashing, image and audio decoders,
    ffmpeg subprocesses): no payload bytes cross a pipe. `backend="ray"` runs each task
    as a Ray task instead (see `_ray_tasks`); results still come back in input order.
    """
    global _FORKED_FN
    if backend == "local" and workers <= 1:
        for t in tasks:
            yield _apply(fn, t)
        return
    with contextlib.ExitStack() as stack:
        if backend == "ray":
            submit, result = _ray_tasks(fn, workers, stack)
        elif threads:
            pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(workers))
            submit = lambda t: pool.submit(_apply, fn, t)  # noqa: E731
            result = concurrent.futures.Future.result
        else:
            _FORKED_FN = fn
            pool = stack.enter_context(multiprocessing.get_context("fork").Pool(workers))
            submit = lambda t: pool.apply_async(_apply_forked, (t,))  # noqa: E731
            result = multiprocessing.pool.AsyncResult.get
        pending: collections.deque = collections.deque()
        for t in tasks:
            pending.append(submit(t))
            if len(pending) >= workers * 4:
                yield result(pending.popleft())
        while pending:
            yield result(pending.popleft())


def _ray_tasks(fn, workers: int, stack: contextlib.ExitStack):
    """(submit, result) for running `_apply(fn, task)` as Ray tasks.

    Joins the cluster named by RAY_ADDRESS, or starts a local instance of `workers` CPUs,
    unless Ray is already initialized (then it is the caller's, and left running). `fn` goes
    to the object store once; Ray's cloudpickle carries closures.
    """
    try:
        import ray
    except ImportError:
        raise StageError("--backend ray needs Ray: pip install 'mmtok[ray]'") from None
    if not ray.is_initialized():
        local = {} if os.environ.get("RAY_ADDRESS") else {"num_cpus": workers}
        ray.init(include_dashboard=False, log_to_driver=False, **local)
        stack.callback(ray.shutdown)
    fn_ref = ray.put(fn)
    apply = ray.remote(_apply)

    def result(ref):
        try:
            return ray.get(ref)
        except ray.exceptions.RayError as e:  # a worker died or a node was lost, not a bad item
            raise StageError(f"a Ray task failed ({type(e).__name__}: {e}); "
                             "rerun the same command to resume") from None

    return (lambda t: apply.remote(fn_ref, t)), result


def _tasks(items: Iterable[Item], start: int, size: int) -> Iterator[list[tuple[int, Item]]]:
    task = []
    for i, item in enumerate(items):
        if i < start:
            continue
        task.append((i, item))
        if len(task) >= size:
            yield task
            task = []
    if task:
        yield task


class _Log:
    """An append-only JSONL log that is sorted and de-duplicated when the run ends, so a
    resumed run leaves the same file as an uninterrupted one."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "a", encoding="utf-8")

    def add(self, record: dict) -> None:
        with naming(self.path):
            self._f.write(json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n")
            self._f.flush()

    def finish(self) -> list[dict]:
        self._f.close()
        seen, rows = set(), []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if line.strip() and line not in seen:
                seen.add(line)
                rows.append(json.loads(line))
        rows.sort(key=lambda r: (r["index"], json.dumps(r, sort_keys=True)))
        atomic_write(self.path, "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows).encode())
        return rows


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
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise StageError(f"--out {out} is a file, not a directory")
    for spec in inputs:
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
    walkers skip them."""
    import hashlib

    listing = []
    for spec in inputs:
        root = Path(spec)
        rows = []
        if (root / STAGE_FILE).is_file() and (root / MANIFEST).is_file():  # an mmtok stage's output
            for name in (MANIFEST, INDEX):
                data = (root / name).read_bytes() if (root / name).is_file() else b""
                rows.append([name, len(data), hashlib.sha256(data).hexdigest()])
            files = [p for p in root.iterdir() if SHARD_RE.match(p.name)]
        elif root.is_dir():
            files = [p for p in root.rglob("*") if not p.name.startswith(".") and p.is_file()]
        else:
            files = [root] if root.exists() else []
        for p in files:
            st = p.stat()
            rows.append([p.relative_to(root).as_posix() if p != root else "", st.st_size, st.st_mtime_ns])
        rows.sort()
        listing.append({"input": str(spec), "files": len(rows), "bytes": sum(r[1] for r in rows),
                        "sha256": hashlib.sha256(json.dumps(rows).encode()).hexdigest()})
    return listing


def _changed_inputs(have: list[dict], want: list[dict]) -> str:
    then = {d["input"]: d for d in have}
    parts = []
    for d in want:
        old = then.get(d["input"])
        if old is None:
            parts.append(f"{d['input']} is new")
        elif old["sha256"] != d["sha256"]:
            parts.append(f"{d['input']} changed ({old['files']} files, {old['bytes']:,} bytes then; "
                         f"{d['files']} files, {d['bytes']:,} bytes now; or files were modified)")
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
    progress: bool = True,
    overwrite: bool = False,
) -> Summary:
    """Map `fn` over `items` and write shards into `out`; see the module docstring.

    `fn(payload)` returns a Sample, a Quarantined, or a list of them. With `batch_fn`,
    `fn` returns an intermediate value (or Quarantined) and `batch_fn(list_of_values)`
    returns, per value, a list of Sample/Quarantined; it runs in this process.
    `config` names everything that decides the output (not `workers`, not `backend`).
    `threads` runs the workers as threads instead of processes (see `_ordered_map`).
    `count`, where `total` is unknown: the items again (a cheap listing), counted in a thread
    while the work runs, for the progress bar's total.
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
        qlog, dlog = _Log(out / QUARANTINE), _Log(out / DUPLICATES)
        summary = Summary(stage=stage, out=str(out), max_error_rate=max_error_rate, resumed_shards=len(writer.finished))
        start = writer.frontier
        n_items = start
        bar = progress_bar(stage, total, start, progress, count)

        def emit(i: int, name: str, results: list) -> None:
            sub = 0
            for r in results:
                if isinstance(r, Quarantined):
                    rec = {"index": i, "input": r.input or name, "stage": stage, "reason": r.reason}
                    qlog.add(rec if r.counts else {**rec, "counts": False})
                else:
                    writer.add(i, sub, r, dlog, name)
                    sub += 1

        names: dict[int, str] = {}

        def remember(tasks):
            for t in tasks:
                for i, item in t:
                    names[i] = item.name
                yield t

        pending: list[tuple[int, Any]] = []

        def run_batch():
            values = [v for _, v in pending]
            outs = batch_fn(values)
            for (i, _), res in zip(pending, outs):
                emit(i, names.pop(i), res)
            pending.clear()

        try:
            with bar:
                for task_out in _ordered_map(fn, remember(_tasks(items, start, task_size)), workers, threads, backend):
                    for i, res in task_out:
                        n_items = i + 1
                        if batch_fn is None or (res and isinstance(res[0], Quarantined)):
                            if batch_fn is not None and pending:
                                run_batch()  # keep output order: flush earlier items first
                            emit(i, names.pop(i), res)
                        else:
                            pending.append((i, res[0]))
                            if len(pending) >= batch_size:
                                run_batch()
                        bar.advance()
                if pending:
                    run_batch()
            writer.close(n_items)
        except BaseException:
            writer.abort()
            raise
        finally:
            q_rows, d_rows = qlog.finish(), dlog.finish()

        n_items = max(n_items, max((r["index"] + 1 for r in q_rows), default=0))
        summary.items = n_items if total is None else max(total, n_items)
        bad_items = {r["index"] for r in q_rows if r.get("counts", True)}
        summary.quarantined = len(q_rows)
        summary.duplicates = len(d_rows)
        summary.error_rate = len(bad_items) / summary.items if summary.items else 0.0
        _finish(out, stage, config, writer.finished, summary)
        summary.seconds = round(time.perf_counter() - t0, 3)
        return summary


# ---------------------------------------------------------------- several processes

PARTS = "_parts"  # in OUT: each rank's share, a stage output of its own, until rank 0 joins them
_INDEX_COLUMNS = ("key", "shard", "group", "modality", "sha256", "members", "_item")  # what _OpenShard.add sets


def split_shares(weights: list[int], world_size: int) -> list[tuple[int, int]]:
    """[start, end) runs of the input shards, one per rank, of about equal total weight
    (items). Contiguous, so the ranks' results, taken in rank order, are in input order."""
    cum = [0]
    for w in weights:
        cum.append(cum[-1] + w)
    starts = [0]
    for r in range(1, world_size):
        target = cum[-1] * r / world_size
        j = min(range(starts[-1], len(cum)), key=lambda j: (abs(cum[j] - target), j))
        starts.append(j)
    return list(zip(starts, starts[1:] + [len(weights)]))


def run_stage_ranks(stage: str, items_of: Callable[[int, int], Iterable[Item]], fn: Callable, out: str | Path, *,
                    config: dict, weights: list[int], rank: int, world_size: int, total: int | None = None,
                    progress: bool = True, overwrite: bool = False, max_error_rate: float = 0.05,
                    max_count: int = 10_000, max_size: int = 1 << 30, **kwargs) -> Summary | None:
    """`run_stage` on `world_size` processes (torchrun's ranks; a torch.distributed barrier).

    Rank r runs the stage over `items_of(start, end)`, its contiguous share of the input
    shards (`weights`: items per input shard), into OUT/_parts/rank-R-of-W, a stage output of
    its own that resumes like any other. When every rank is done, rank 0 feeds the parts'
    results, part after part, through `run_stage` into OUT: the same items, in the same
    order, with the same results as one process, so OUT (shards, index, manifest,
    quarantine, stats records) is byte for byte what one process writes, provided `fn`
    gives an item the same result whatever else is in its model batch (and the stage does
    not dedup: duplicates would be found per part). The join copies the parts' bytes once
    (rank 0's I/O, no model work), then deletes OUT/_parts. Returns the summary on rank 0,
    None on the others.
    """
    out = Path(out)
    check_paths(config.get("inputs", ()), out)
    listing = input_listing(config.get("inputs", ()))
    want = {"stage": stage, "config": config, "inputs": listing}
    try:
        finished = (out / MANIFEST).is_file() and json.loads((out / STAGE_FILE).read_text()) == want
    except (OSError, ValueError):
        finished = False
    parts = [out / PARTS / f"rank-{r:05d}-of-{world_size:05d}" for r in range(world_size)]
    if not finished:  # a rerun of a finished job has nothing to stage: its replay below is empty
        if rank == 0:  # refuse an OUT of another job now, not after the work
            with disk_full_resumes(out), exclusive(out):
                _check_stage_file(out, stage, config, listing, overwrite)
        start, end = split_shares(weights, world_size)[rank]
        run_stage(stage, items_of(start, end), fn, parts[rank], progress=progress and rank == 0, max_count=max_count,
                  max_size=max_size,
                  config={**config, "rank": rank, "world_size": world_size, "share": [start, end]},
                  overwrite=overwrite, max_error_rate=1.0, **kwargs)
    _barrier()
    if rank != 0:
        return None
    joined = (item for part in ([] if finished else parts) for item in _part_results(part))
    summary = run_stage(stage, joined, lambda results: results, out, config=config, total=total, progress=False,
                        overwrite=overwrite, max_error_rate=max_error_rate, max_count=max_count, max_size=max_size)
    import shutil

    shutil.rmtree(out / PARTS, ignore_errors=True)  # our own staging area: every part is in OUT now
    return summary


def _barrier() -> None:
    import datetime

    import torch.distributed as dist

    ours = not dist.is_initialized()
    if ours:  # torchrun's env:// rendezvous; gloo runs on CPU-only machines too
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))  # shares may take hours
    dist.barrier()
    if ours:
        dist.destroy_process_group()


def _part_results(part: Path) -> Iterator[Item]:
    """A finished part's results, item by item in its input order, as run_stage emitted them."""
    from mmtok.shards import read_jsonl

    n = json.loads((part / MANIFEST).read_text())["totals"]["inputs"]
    samples: dict[int, list] = collections.defaultdict(list)
    for p in (part / STATS_DIR).glob("*.json"):
        st = json.loads(p.read_text())
        for row in st["index"]:
            samples[row["_item"][0]].append((row["_item"][1], st["name"], row))
    quarantined: dict[int, list] = collections.defaultdict(list)
    for rec in read_jsonl(part / QUARANTINE) if (part / QUARANTINE).exists() else []:
        quarantined[rec["index"]].append(Quarantined(rec["input"], rec["reason"], rec.get("counts", True)))
    with contextlib.ExitStack() as stack:
        files: dict[str, Any] = {}
        for i in range(n):
            results = []
            for _, shard, row in sorted(samples.pop(i, []), key=lambda t: t[0]):
                if shard not in files:
                    files[shard] = stack.enter_context(open(part / shard, "rb"))
                f, members = files[shard], {}
                for m in sorted(row["members"], key=lambda m: m["offset"]):  # the order they were written in
                    f.seek(m["offset"])
                    members[m["ext"]] = f.read(m["size"])
                meta = json.loads(members.pop("json"))
                results.append(Sample(row["key"], row["group"], members, meta,
                                      {k: v for k, v in row.items() if k not in _INDEX_COLUMNS}))
            yield Item(f"{part.name}:{i}", results + quarantined.pop(i, []))


def _finish(out: Path, stage: str, config: dict, finished: list[dict], summary: Summary) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

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
    table = pa.Table.from_pylist(rows) if rows else pa.table({"key": pa.array([], pa.string())})
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    atomic_write(out / INDEX, buf.getvalue().to_pybytes())
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


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def advance(self):
        pass


class _Bar(_NoBar):
    def __init__(self, stage, total, done, count=None):
        import threading

        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        # stderr, so that `--json` output on stdout stays machine-readable
        self.p = Progress(TextColumn(f"[bold]{stage}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          TimeRemainingColumn(), console=Console(stderr=True))
        self.task = self.p.add_task(stage, total=total, completed=done)
        self.stop = threading.Event()
        self.counter = threading.Thread(target=self._count, args=(count,), daemon=True) if count is not None else None

    def _count(self, items) -> None:
        n = 0
        try:
            for _ in items:
                if self.stop.is_set():
                    return
                n += 1
        except Exception:  # the work reads the same inputs and reports what is wrong with them
            return
        self.p.update(self.task, total=n)

    def __enter__(self):
        self.p.start()
        if self.counter is not None:
            self.counter.start()
        return self

    def __exit__(self, exc_type, *a):
        if self.counter is not None:
            if exc_type is not None:
                self.stop.set()
            self.counter.join()  # after the work the count is done, or nearly: the bar ends on its true total
        self.p.stop()
        return False

    def advance(self):
        self.p.advance(self.task)


def progress_bar(stage, total, done, enabled, count=None):
    """A rich progress bar for a stage (a no-op when disabled): `advance()` per item done.
    `count`: where `total` is None, an iterable counted in a thread to find it."""
    return _Bar(stage, total, done, count) if enabled else _NoBar()
