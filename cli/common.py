"""Shared CLI plumbing: error reporting, exit codes, summaries. Heavy imports stay out."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
import threading
from enum import IntEnum
from pathlib import Path

import typer


# Options every data stage shares (typer reads them as defaults of the command's parameters).
WORKERS = typer.Option(1, "--workers", "-w", min=1, help="Workers (processes, or threads where the work releases "
                       "the GIL). Output bytes do not depend on it.")
MAX_ERROR_RATE = typer.Option(0.05, "--max-error-rate", min=0.0, max=1.0,
                              help="Share of inputs that may be quarantined before the command exits with status 3.")
MAX_COUNT = typer.Option(10_000, "--max-count", min=1, help="Samples per output shard at most.")
OVERWRITE = typer.Option(False, "--overwrite", help="Start again if OUT holds a different job or its inputs "
                         "changed: deletes only the files that job's records say it wrote.")
JSON_OUT = typer.Option(False, "--json", help="Print a machine-readable summary on stdout.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar.")


def _check_backend(value: str) -> str:
    from mmtok.runner import BACKENDS

    if value not in BACKENDS:
        raise typer.BadParameter(f"{value!r}: use one of {', '.join(BACKENDS)}")
    return value


BACKEND = typer.Option("local", "--backend", callback=_check_backend, metavar="local|ray",
                       help="Where the per-item work runs. local: processes or threads on this machine. "
                       "ray: tasks on the Ray cluster named by RAY_ADDRESS, or on a local Ray instance "
                       "(pip install 'mmtok[ray]'); every Ray node must see the input paths as this machine does "
                       "(a shared filesystem), since items may be file paths; this process writes the output. "
                       "Output bytes do not depend on it. See docs/DISTRIBUTED.md.")


def positive(value):
    """Option callback for numbers that must be above 0 (typer's min= admits the bound itself)."""
    if value is not None and value <= 0:
        raise typer.BadParameter(f"{value} is not above 0")
    return value


def check_inputs(inputs, out=None, shard_dirs: bool = False) -> list:
    """Name an empty or missing input, or an --out that overlaps an input, before any work
    starts (the stage runner checks the overlap again). Returns the inputs as Paths, or
    RemotePaths for URLs (mmtok.fs)."""
    from mmtok.fs import as_location, remote_errors
    from mmtok.runner import check_paths

    check_paths(inputs, out)
    locations = [as_location(spec) for spec in inputs]
    for spec, loc in zip(inputs, locations):
        with remote_errors(spec):  # no credentials, no bucket: one line naming the URL
            # a shard directory at a URL is known by its manifest (object stores have no directories)
            if shard_dirs and not (loc.is_dir() if isinstance(loc, Path) else (loc / "manifest.json").exists()):
                raise FileNotFoundError(f"input {spec} is not a shard directory")
            if not loc.exists():
                raise FileNotFoundError(f"input {spec} does not exist")
    return locations


def pulled(stack: contextlib.ExitStack, value: str | None) -> Path | None:
    """The local directory to read for a RUN or --tokenizer value: itself, or for a URL a
    copy pulled into the cache for as long as `stack` lasts (mmtok.mirror.remote_input)."""
    from mmtok.mirror import remote_input

    if value is None:
        return None
    not_a_file(value)
    return stack.enter_context(remote_input(value))


def not_a_file(value: str | None) -> None:
    """Refuse a local file given where a directory goes (what typer's file_okay=False did)."""
    from mmtok.fs import is_url

    if value is not None and not is_url(value) and Path(value).is_file():
        raise FileNotFoundError(f"{value} is a file; give a directory")


class Exit(IntEnum):
    OK = 0
    FAILED = 1  # an unexpected failure inside mmtok (a bug: please report it)
    USAGE = 2  # bad options or input paths; nothing was done
    ERROR_BUDGET = 3  # the job finished but more inputs were quarantined than --max-error-rate allows
    INTERRUPTED = 130  # Ctrl-C or SIGTERM (128 + SIGINT, as shells report it): rerun to resume


def fail(message: str, code: Exit = Exit.USAGE) -> None:
    from rich.console import Console
    from rich.markup import escape

    # escaped: messages quote paths and commands, and rich would eat "[ray]" or "[a].png" as markup
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(int(code))


class Terminated(KeyboardInterrupt):
    """SIGTERM, ending a command the way Ctrl-C does (the trainer's loop sets its own)."""


@contextlib.contextmanager
def _terminate_as_interrupt():
    main = os.getpid()

    def handler(signum, frame):
        if os.getpid() != main:  # a worker forked before it set its own: end as the signal would
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Terminated

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set one
        yield
        return
    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        if old is not None:  # None: set outside Python, and not restorable from here
            signal.signal(signal.SIGTERM, old)


def friendly_errors(fn):
    """Turn the library's expected errors into a one-line message and exit status 2, and
    Ctrl-C or SIGTERM into exit status 130 (what a stage finished is kept: rerun to resume)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from mmtok.runner import StageError
        from mmtok.shards import ShardError

        try:
            with _terminate_as_interrupt():
                return fn(*args, **kwargs)
        except (StageError, ShardError, FileNotFoundError, ValueError) as e:
            fail(str(e))
        except KeyboardInterrupt:
            fail("interrupted; rerun the same command to resume", Exit.INTERRUPTED)

    return wrapper


def eval_report(result: dict, out, title: str, columns: tuple[str, ...], rows: list[tuple], as_json: bool) -> None:
    """`mmtok eval`'s output: the result as JSON on stdout, or a table and where the report is."""
    if as_json:
        sys.stdout.write(json.dumps(result, indent=1, sort_keys=True) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for col in columns:
        t.add_column(col)
    for row in rows:
        t.add_row(*row)
    Console(stderr=True).print(t)
    Console(stderr=True).print(f"report: {out}/eval.md")


def report(summary, as_json: bool) -> None:
    """Print a stage summary (a rich table, or JSON on stdout) and exit with its status."""
    d = summary.as_dict()
    if as_json:
        sys.stdout.write(json.dumps(d, indent=1, sort_keys=True) + "\n")
    else:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"mmtok {summary.stage}: {summary.out}", show_header=False)
        t.add_column(style="bold")
        t.add_column()
        t.add_row("inputs", str(summary.items))
        t.add_row("samples", str(summary.samples))
        for k, v in summary.by_modality.items():
            t.add_row(f"  {k}", str(v))
        t.add_row("shards", f"{summary.shards} ({summary.resumed_shards} already done before this run)")
        t.add_row("bytes", f"{summary.bytes:,}")
        t.add_row("duplicates dropped", str(summary.duplicates))
        t.add_row("quarantined", f"{summary.quarantined} ({summary.error_rate:.1%} of inputs; budget {summary.max_error_rate:.1%})")
        t.add_row("seconds", f"{summary.seconds:.2f}")
        Console(stderr=True).print(t)
        if summary.quarantined:
            Console(stderr=True).print(f"reasons: {summary.out}/quarantine.jsonl")
    if summary.failed:
        if not as_json:
            fail(f"{summary.error_rate:.1%} of inputs were quarantined, over --max-error-rate {summary.max_error_rate:.1%}",
                 Exit.ERROR_BUDGET)
        raise typer.Exit(int(Exit.ERROR_BUDGET))


def renamed(value, old_value, new: str, old: str):
    """The value of an option or argument that had another spelling: `old` still works for
    one release (hidden from --help), with a warning on stderr."""
    if old_value is None:
        return value
    if value is not None:
        fail(f"give {new} or {old} (its old spelling), not both")
    deprecated(old, new)
    return old_value


def deprecated(old: str, new: str) -> None:
    """The one-line warning on stderr for an old spelling that still works."""
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(f"warning: {old} is deprecated; use {new}", highlight=False, markup=False)
