"""One writer per output directory.

Every stage and `train` hold an exclusive lock on their `--out` while they run, so a
second job (or an `--overwrite` of a running one) is refused instead of racing it. The
lock is an `flock` on `<out>/.mmtok.lock`, which the kernel releases when the process
dies, so a killed job never leaves a stale lock behind; the file holds the holder's pid
so the refusal can name it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

LOCK_FILE = ".mmtok.lock"


class LockHeld(ValueError):
    """Another live process writes to this directory; the message names its pid."""


@contextlib.contextmanager
def exclusive(directory: str | Path, *, wait: bool = False) -> Iterator[Path]:
    """Hold `directory`'s lock (creating the directory) for the `with` block.

    Raises LockHeld at once when another process holds it, or with `wait` waits for it.
    A block that raises (a refused --out, a failed job) takes back the lock file, and the
    directory if this call made it and it is empty: a refusal leaves nothing behind.
    """
    directory = Path(directory)
    made = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    ours = not path.exists()  # this call makes the lock file (only the holder ever acts on it)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise LockHeld(f"{directory} is in use by another mmtok process (pid {holder}); "
                           "wait for it to finish, or stop it, then rerun") from None
        if not _same_file(fd, path):  # its holder took the file back between our open and our lock
            raise LockHeld(f"{directory} was in use by another mmtok process a moment ago; rerun")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield path
        except BaseException:
            # Still held here, so no other job is inside. Not with `wait`: a waiter would then
            # hold a lock on the removed file while a newcomer locks a new one.
            if ours and not wait:
                path.unlink(missing_ok=True)
                if made and not any(directory.iterdir()):
                    directory.rmdir()
            raise
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False
