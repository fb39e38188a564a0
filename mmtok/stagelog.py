"""A stage's logs (append-only JSONL, finished sorted) and its progress bar."""

from __future__ import annotations

import json
from pathlib import Path

from mmtok.shards import atomic_write, naming


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


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def advance(self):
        pass

    def set(self, done: int):
        pass

    def describe(self, text: str):
        pass


class _Told(_NoBar):
    def __init__(self, tell, done: int):
        self.tell = tell
        tell(done)

    def advance(self):
        self.tell(1)


class _Bar(_NoBar):
    def __init__(self, stage, total, done, count=None):
        import threading

        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        # stderr, so that `--json` output on stdout stays machine-readable
        self.p = Progress(TextColumn(f"[bold]{stage}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          TimeRemainingColumn(), TextColumn("{task.description}"), console=Console(stderr=True))
        self.task = self.p.add_task("", total=total, completed=done)
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

    def set(self, done: int):
        self.p.update(self.task, completed=done)

    def describe(self, text: str):
        self.p.update(self.task, description=text)


def progress_bar(stage, total, done, enabled, count=None):
    """A rich progress bar for a stage or a training job (a no-op when disabled): `advance()`
    per item or step done, or `set(n)` items done in all; `describe(text)` shows the latest
    metrics beside it. `count`: where `total` is None, an iterable counted in a
    thread to find it. `enabled` may be a function instead, told the items done so far and
    then each one (a Ray actor's counter, which the driver's bar reads)."""
    if callable(enabled):
        return _Told(enabled, done)
    return _Bar(stage, total, done, count) if enabled else _NoBar()
