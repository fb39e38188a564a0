"""Dispatch: a stage's per-item function over items, on this machine's threads or
processes or as Ray tasks, with results back in input order (so output bytes never depend
on `--workers` or `--backend`), and the values that cross to the workers and back."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import multiprocessing
import multiprocessing.pool
import os
import signal
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

BACKENDS = ("local", "ray")  # where stage functions run: this machine's pool, or Ray tasks


@dataclass
class Quarantined:
    input: str
    reason: str
    counts: bool = True  # False: recorded, but not a bad input (a row img2dataset never fetched)


@dataclass
class Item:
    """One unit of input: `name` identifies it in logs; `payload` is what the stage needs;
    `nbytes`, where known, what it brings into memory (its files' sizes, its member bytes),
    which bounds the work in flight (`_tasks`, `_ordered_map`)."""

    name: str
    payload: Any
    nbytes: int = 0


# A task ends at its stage's task size or at TASK_BYTES of items; beyond one task per worker,
# tasks go in flight only while those in flight hold under IN_FLIGHT_BYTES. Memory then holds
# about max(IN_FLIGHT_BYTES, workers x the larger of TASK_BYTES and the largest item), whatever
# the item sizes (a folder of 1 GB videos), where a count bound alone would hold 4 x workers
# tasks of them.
TASK_BYTES = 16 << 20
IN_FLIGHT_BYTES = 256 << 20


class StageError(Exception):
    """A problem with the job as a whole (bad output dir, bad options); exit status 2."""



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


_WORKER_FN: Callable | None = None  # in a pool's worker process: the stage it runs


def _install(fn: Callable) -> None:
    # The pool stops its workers with SIGTERM. A handler the parent set (the trainer's, Ray's
    # driver's, a user's) survives the fork and would keep a worker alive, so the pool's exit
    # would wait for it forever.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    global _WORKER_FN
    _WORKER_FN = fn


def _apply_installed(items):
    return _apply(_WORKER_FN, items)


def _ordered_map(fn, tasks: Iterator[list], workers: int, threads: bool = False,
                 backend: str = "local") -> Iterator[list]:
    """Map over tasks with a pool, in order, with a bounded number in flight.

    Processes by default, forked with `fn` as their initializer's argument: it reaches each
    worker once, by fork, unpickled (a closure works; a Stage class also pickles, for Ray),
    and then only the items travel. `threads=True` suits
    stages whose work releases the GIL (file reads, hashing, image and audio decoders,
    ffmpeg subprocesses): no payload bytes cross a pipe. `backend="ray"` runs each task
    as a Ray task instead (see `_ray_tasks`); results still come back in input order.
    """
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
            pool = stack.enter_context(multiprocessing.get_context("fork").Pool(workers, _install, (fn,)))
            submit = lambda t: pool.apply_async(_apply_installed, (t,))  # noqa: E731
            result = multiprocessing.pool.AsyncResult.get
        pending: collections.deque = collections.deque()  # (future, its items' bytes), in input order
        held = 0
        for t in tasks:
            nbytes = sum(item.nbytes for _, item in t)
            pending.append((submit(t), nbytes))
            held += nbytes
            while len(pending) >= workers * 4 or (len(pending) > workers and held >= IN_FLIGHT_BYTES):
                future, nbytes = pending.popleft()
                held -= nbytes
                yield result(future)
        while pending:
            yield result(pending.popleft()[0])
        if backend == "local" and not threads:
            # Done: the workers leave on the pool's end marker. The SIGTERM of the pool's exit
            # is for errors only: a worker still starting may yet hold the parent's handler,
            # or a stage may set its own, and the pool would wait on it forever.
            pool.close()
            pool.join()


def _ray_tasks(fn, workers: int, stack: contextlib.ExitStack):
    """(submit, result) for running `_apply(fn, task)` as Ray tasks (on `ray_session`'s
    Ray). `fn` goes to the object store once; Ray's cloudpickle carries closures."""
    ray = ray_session(workers, stack)
    fn_ref = ray.put(fn)
    apply = ray.remote(_apply)

    def result(ref):
        try:
            return ray.get(ref)
        except ray.exceptions.RayError as e:  # a worker died or a node was lost, not a bad item
            raise StageError(f"a Ray task failed ({type(e).__name__}: {e}); "
                             "rerun the same command to resume") from None

    return (lambda t: apply.remote(fn_ref, t)), result


def ray_session(cpus: int, stack: contextlib.ExitStack):
    """The `ray` module, initialized: joins the cluster named by RAY_ADDRESS, or starts a
    local instance of `cpus` CPUs (shut down when `stack` closes), unless Ray is already
    initialized (then it is the caller's, and left running)."""
    try:
        import ray
    except ImportError:
        raise StageError("--backend ray needs Ray: pip install 'mmtok[ray]'") from None
    if not ray.is_initialized():
        local = {} if os.environ.get("RAY_ADDRESS") else {"num_cpus": cpus}
        # ray.init replaces this process's SIGTERM handler (an exit without the interrupted
        # message) and shutdown leaves it there: ours is put back at once, and again at the end
        ours = signal.getsignal(signal.SIGTERM)
        stack.callback(signal.signal, signal.SIGTERM, ours)
        ray.init(include_dashboard=False, log_to_driver=False, **local)
        signal.signal(signal.SIGTERM, ours)
        stack.callback(ray.shutdown)
    return ray


def _tasks(items: Iterable[Item], start: int, size: int) -> Iterator[list[tuple[int, Item]]]:
    """Tasks of `size` items from item `start` on, or fewer where they reach TASK_BYTES."""
    task, nbytes = [], 0
    for i, item in enumerate(items):
        if i < start:
            continue
        task.append((i, item))
        nbytes += item.nbytes
        if len(task) >= size or nbytes >= TASK_BYTES:
            yield task
            task, nbytes = [], 0
    if task:
        yield task
