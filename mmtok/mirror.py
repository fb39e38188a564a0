"""Writing a stage's output (or a run) to an fsspec URL: the stage keeps writing to a local
directory (atomic renames, the lock and resume stay exactly as they are), and
`remote_output(url)` hands it a staging directory mirrored to the URL: pulled before the
stage starts, pushed every few seconds and at exit, each file once it is complete, in an
order that keeps the remote side consistent (docs/REMOTE.md). Locations and reads are
mmtok/fs.py's."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Callable, Iterator

from mmtok.fs import RemoteError, RemotePath, as_location, remote_errors

TEMP_DIR_RE = re.compile(r"^\..+\.(tmp|old)$")  # the trainer's checkpoint dirs before their rename, set aside
SYNC_STATE = "sync.json"
CHUNK = 8 << 20


def cache_root() -> Path:
    return Path(os.environ.get("MMTOK_CACHE") or Path.home() / ".cache" / "mmtok")


def stage_files(rel: str) -> bool:
    """The files an mmtok stage writes in its OUT (shards, their `_stats` records, the fixed
    record names), also inside a rank's `_parts/<part>/`: the only ones a stage's mirror
    pulls, pushes or deletes."""
    from mmtok.ranks import PARTS
    from mmtok.runner import DUPLICATES, STAGE_FILE, STATS_DIR
    from mmtok.shards import INDEX, MANIFEST, QUARANTINE, SHARD_RE

    parts = rel.split("/")
    if len(parts) > 2 and parts[0] == PARTS:
        parts = parts[2:]
    if len(parts) == 1:
        return parts[0] in (MANIFEST, INDEX, QUARANTINE, DUPLICATES, STAGE_FILE) or bool(SHARD_RE.match(parts[0]))
    return (len(parts) == 2 and parts[0] == STATS_DIR and parts[1].endswith(".json")
            and bool(SHARD_RE.match(parts[1][:-5])))


def all_files(rel: str) -> bool:
    """Every file of the directory (a training run: config, metrics, checkpoints)."""
    return True


def _plain(rel: str) -> bool:
    """A key that names a file under the mirrored prefix: object keys may hold `..` or empty
    segments, and a key never decides where anything is written outside the local copy."""
    return bool(rel) and all(p not in ("", ".", "..") and "\\" not in p for p in rel.split("/"))


def _skipped(rel: str) -> bool:
    """Names that are never complete files of their own: temporaries and the lock."""
    from mmtok.locks import LOCK_FILE
    from mmtok.shards import TEMP_RE

    return any(p == LOCK_FILE or TEMP_RE.match(p) or TEMP_DIR_RE.match(p) for p in rel.split("/"))


def _rank(rel: str) -> int:
    """Upload order (deletions go in reverse): what a reader or a resume trusts goes after
    what it vouches for. The job description before the shard records, the records before
    their shards (a shard without its record is taken for a user's file), the data, then
    the summaries and a checkpoint's checksums, and `manifest.json` / `latest` last: a
    remote reader that sees them sees a complete directory."""
    name = rel.rpartition("/")[2]
    if name == "_stage.json":
        return 0
    if rel.startswith("_stats/") or "/_stats/" in rel:
        return 1
    if name in ("index.parquet", "quarantine.jsonl", "duplicates.jsonl", "checksums.json"):
        return 3
    if name in ("manifest.json", "latest"):
        return 4
    if rel == "plan.json":  # a plan's, after its arrays and held-out shards: a finished plan
        return 5
    return 2


def _fingerprint(info: dict) -> list:
    """What tells a remote object's versions apart: its size and its store's version tag."""
    tag = next((info[k] for k in ("ETag", "etag", "md5Hash", "generation", "blob_id", "LastModified", "mtime",
                                  "created") if info.get(k) is not None), None)
    return [int(info.get("size") or 0), str(tag)]


class Mirror:
    """A local directory kept equal to a remote one for the files `ours(rel)` accepts.

    `sync.json` beside the local copy records, per mirrored file, the remote fingerprint and
    the local (size, mtime) it had when last pulled or pushed: that is how a push knows what
    changed, and the set of files it may delete remotely (only those it mirrored)."""

    def __init__(self, remote: RemotePath, home: Path, ours: Callable[[str], bool]):
        self.remote, self.home, self.ours = remote, home, ours
        self.local = home / "out"
        self._lock = threading.Lock()
        self.state: dict[str, dict] = {}

    def _remote_files(self) -> dict[str, dict]:
        fs, root = self.remote.fs, self.remote.path
        fs.invalidate_cache(root)
        found = fs.find(root, detail=True)
        files = {}
        for p, info in found.items():
            rel = p[len(root):].strip("/")
            if (info.get("type", "file") == "file" and _plain(rel) and self.ours(rel) and not _skipped(rel)):
                files[rel] = info
        return files

    def _local_files(self) -> list[str]:
        out = []
        for d, dirs, names in os.walk(self.local):  # top-down: a shard seen here has its record written
            dirs[:] = [n for n in dirs if not _skipped(n)]
            for n in names:
                rel = os.path.relpath(os.path.join(d, n), self.local).replace(os.sep, "/")
                if self.ours(rel) and not _skipped(rel):
                    out.append(rel)
        return out

    def _save(self) -> None:
        from mmtok.shards import atomic_write

        atomic_write(self.home / SYNC_STATE, json.dumps({"url": self.remote.url, "files": self.state},
                                                        sort_keys=True).encode())

    def pull(self) -> None:
        """Make the local copy equal to the remote one: fetch what is new or changed there,
        delete local files the remote lacks (a run killed here before pushing, or files
        another machine's run removed since); those are redone, never trusted."""
        from mmtok.shards import temp_path

        try:
            saved = json.loads((self.home / SYNC_STATE).read_text())
            self.state = saved["files"] if saved.get("url") == self.remote.url else {}
        except (OSError, ValueError, KeyError, TypeError):
            self.state = {}
        if not self.state and self.local.exists():
            shutil.rmtree(self.local)  # our own cache, of unknown provenance: start it again
        self.local.mkdir(parents=True, exist_ok=True)
        remote = self._remote_files()
        for rel in self._local_files():
            if rel not in remote:
                (self.local / rel).unlink()
                self.state.pop(rel, None)
        for rel, info in sorted(remote.items()):
            fp, dest = _fingerprint(info), self.local / rel
            st = self.state.get(rel)
            if st and st["remote"] == fp and dest.exists() and _local_fp(dest) == st["local"]:
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_path(dest)
            self.remote.fs.get_file(f"{self.remote.path}/{rel}", str(tmp))
            os.replace(tmp, dest)
            self.state[rel] = {"remote": fp, "local": _local_fp(dest)}
        self.state = {k: v for k, v in self.state.items() if k in remote}
        self._save()

    def push(self) -> None:
        """Upload what is new or changed here, each file by one PUT (or multipart upload)
        that makes it appear whole, in `_rank` order, then oldest first; delete remotely, in reverse order,
        the mirrored files that are gone here (the stage deleted its own files)."""
        with self._lock, contextlib.ExitStack() as held:
            fs, root = self.remote.fs, self.remote.path
            # the files uploaded last (manifest.json, latest) are opened before the listing of
            # the rest: what they name was complete before them, so it goes up in this push
            # too, even if the job writes a newer one meanwhile
            last = {}
            for rel in self._local_files():
                if _rank(rel) >= 4:
                    with contextlib.suppress(FileNotFoundError):
                        last[rel] = held.enter_context(open(self.local / rel, "rb"))
            local = self._local_files()
            try:
                for rel in sorted(set(self.state) - set(local), key=lambda r: (-_rank(r), r)):
                    with contextlib.suppress(FileNotFoundError):
                        fs.rm_file(f"{root}/{rel}")
                    del self.state[rel]
                for rel in sorted(local, key=lambda r: (_rank(r), _mtime(self.local / r), r)):
                    if _rank(rel) >= 4 and rel not in last:
                        continue  # new since the first listing: the next push takes it
                    try:
                        src = last.pop(rel) if rel in last else open(self.local / rel, "rb")
                    except FileNotFoundError:  # deleted by the stage since the listing
                        continue
                    with src:
                        st = os.fstat(src.fileno())  # the open file's: a rename since then changes nothing
                        fp = [st.st_size, st.st_mtime_ns]
                        if self.state.get(rel, {}).get("local") == fp:
                            continue
                        with fs.open(f"{root}/{rel}", "wb") as dst:
                            shutil.copyfileobj(src, dst, CHUNK)
                    self.state[rel] = {"remote": _fingerprint(fs.info(f"{root}/{rel}")), "local": fp}
            finally:
                self._save()


def _mtime(p: Path) -> int:
    """Files of one rank go up in the order they were finished, so the remote shards are
    always the first ones the stage closed: a resume from them replays the fewest items."""
    try:
        return p.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def _local_fp(p: Path) -> list:
    st = p.stat()
    return [st.st_size, st.st_mtime_ns]


@contextlib.contextmanager
def remote_output(out: str | os.PathLike, *, ours: Callable[[str], bool] = stage_files,
                  every: float | None = None) -> Iterator[Path]:
    """The local directory a stage writes for `out`. A local `out` is itself. A URL gets a
    staging directory under `$MMTOK_CACHE/remote/<hash of the URL>/out` (default cache
    `~/.cache/mmtok`), first made equal to what mmtok mirrored there before (so a resume on
    another machine goes on from the remote files, which the runner verifies by sha256),
    pushed every `every` seconds from a thread and once more when the block ends, also when
    it raises (so an interrupted run keeps its finished shards). `ours` names the files
    mirrored: `stage_files` for a stage's OUT, `all_files` for a training run. `every`
    defaults to $MMTOK_SYNC_SECONDS, else 30."""
    loc = as_location(out)
    if every is None:
        every = float(os.environ.get("MMTOK_SYNC_SECONDS") or 30)
    if isinstance(loc, Path):
        yield loc
        return
    from mmtok.locks import exclusive

    home = cache_root() / "remote" / hashlib.sha256(loc.url.encode()).hexdigest()[:24]
    with exclusive(home):  # one job per URL on this machine (the stage locks the staging dir itself)
        mirror = Mirror(loc, home, ours)
        with remote_errors(loc.url):
            mirror.pull()
        stop = threading.Event()

        def periodic() -> None:
            while not stop.wait(every):
                with contextlib.suppress(Exception):  # a passing outage; the final push reports failures
                    mirror.push()

        thread = threading.Thread(target=periodic, daemon=True)
        thread.start()
        failed = True
        try:
            yield mirror.local
            failed = False
        finally:
            stop.set()
            thread.join()
            try:
                with remote_errors(loc.url):
                    mirror.push()
            except RemoteError:
                if not failed:
                    raise  # else the block's own error is the one to report


def _input_home(loc: RemotePath) -> Path:
    return cache_root() / "remote" / hashlib.sha256(loc.url.encode()).hexdigest()[:24] / "in"


def _pull(loc: RemotePath, ours: Callable[[str], bool]) -> Path:
    """Pull `loc` into its copy in the cache (the caller holds the copy's lock)."""
    mirror = Mirror(loc, _input_home(loc), ours)
    with remote_errors(loc.url):
        mirror.pull()
    if not mirror.state:
        raise FileNotFoundError(f"{loc.url}: nothing there (no such run, export or tokenizer)")
    return mirror.local


def run_stage_to(out: str | os.PathLike, stage: str, items, fn, **kw):
    """`runner.run_stage` into `out`, a path or a URL (written through `remote_output`);
    the Summary's `out` names what was given, not the staging directory."""
    from mmtok.fs import is_url
    from mmtok.runner import run_stage

    with remote_output(out) as local:
        summary = run_stage(stage, items, fn, local, **kw)
    if is_url(str(out)):
        summary.out = str(out)
    return summary


@contextlib.contextmanager
def remote_input(src: str | os.PathLike, *, ours: Callable[[str], bool] = all_files) -> Iterator[Path]:
    """A local directory to read for `src` (a run, an export, a tokenizer): a local path is
    itself; a URL is pulled into `$MMTOK_CACHE/remote/<hash of the URL>/in`, fetching only
    what is new or changed since the last pull (a second read costs one listing), and is
    never pushed back: what the reader writes goes elsewhere. The copy stays locked for the
    block, so no other pull changes it under the reader."""
    loc = as_location(src)
    if isinstance(loc, Path):
        yield loc
        return
    from mmtok.locks import exclusive

    with exclusive(_input_home(loc)):
        yield _pull(loc, ours)


def local_copy(src: str | os.PathLike) -> Path:
    """`remote_input`'s copy of `src` for readers that load what they need at once and then
    let go (a tokenizer): the lock is held only while pulling, waiting for another process's
    pull, so every rank or actor of a stage on one machine pulls (the second pull costs one
    listing) and all of them read the same copy."""
    loc = as_location(src)
    if isinstance(loc, Path):
        return loc
    from mmtok.locks import exclusive

    with exclusive(_input_home(loc), wait=True):
        return _pull(loc, all_files)
