"""The CLI's own surface: version, exit codes that scripts rely on."""

from importlib.metadata import version

from typer.testing import CliRunner

from mmtok.cli.app import app


def test_version_prints_the_installed_version():
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0
    assert r.output.strip() == f"mmtok {version('mmtok')}"


def test_a_command_run_off_the_main_thread_still_runs():
    """Only the main thread may set a signal handler: off it (an embedding app's worker
    thread), the SIGTERM-as-interrupt handler is skipped, not turned into a usage error."""
    import threading

    from mmtok.cli.common import friendly_errors

    got = []
    t = threading.Thread(target=lambda: got.append(friendly_errors(lambda: "ran")()))
    t.start()
    t.join()
    assert got == ["ran"]


def test_sigterm_in_the_main_thread_is_an_interrupt():
    import os
    import signal
    import time

    import pytest
    import typer

    from mmtok.cli.common import Exit, friendly_errors

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(typer.Exit) as e:
        friendly_errors(lambda: os.kill(os.getpid(), signal.SIGTERM) or time.sleep(30))()
    assert e.value.exit_code == Exit.INTERRUPTED
    assert signal.getsignal(signal.SIGTERM) is before  # put back afterwards


def test_help_on_an_80_column_terminal_keeps_option_names_whole():
    """rich's tables cut names like --max-member-bytes to stubs under ~100 columns; there
    the command switches to click's plain layout, which wraps instead."""
    import os
    import subprocess
    import sys

    def shard_help(columns: int) -> str:
        env = dict(os.environ, COLUMNS=str(columns))
        return subprocess.run([sys.executable, "-c", "from mmtok.cli.app import main; main()", "shard", "--help"],
                              capture_output=True, text=True, env=env, check=True).stdout

    narrow = shard_help(80)
    assert "--max-member-bytes <str>" in narrow and "…" not in narrow
    assert max(map(len, narrow.splitlines())) <= 80
    assert "╭─ Options" in shard_help(160)  # wide terminals keep rich's panels
