"""Processes for kill-and-resume tests."""

from __future__ import annotations

from pathlib import Path


def kill_midway(cmd: list[str], out, env=None) -> int:
    """Start `cmd + ["--out", out]` and SIGKILL it once 3 shards are finished but before the
    manifest is written (retried if a run was too fast to catch); returns the shards in place."""
    import signal

    return signal_midway(cmd, out, signal.SIGKILL, env)[0]


def signal_midway(cmd: list[str], out, sig: int, env=None) -> tuple[int, int, str]:
    """`kill_midway` with signal `sig`: (shards in place, the exit status, its stderr)."""
    import shutil
    import subprocess
    import time

    stats = Path(out) / "_stats"

    def in_place() -> int:  # a shard is finished once renamed: a kill may fall between its record and its rename
        return sum((Path(out) / rec.name[:-5]).is_file() for rec in stats.glob("*.json")) if stats.exists() else 0

    for _ in range(5):
        p = subprocess.Popen(cmd + ["--out", str(out)], env=env, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while time.time() < deadline and in_place() < 3:
            time.sleep(0.01)
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
        if not (Path(out) / "manifest.json").exists():
            break
        shutil.rmtree(out)
    assert not (Path(out) / "manifest.json").exists(), "could not kill the run mid-way"
    return in_place(), p.returncode, err
