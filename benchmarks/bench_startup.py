"""Start-up cost of `mmtok` commands, and what a second typer version changes about it.

Each contender is a command run as a user runs it (a fresh interpreter each time), run in
turn --repeat times (interleaved, so a change in the machine's load hits all alike):
- `python -c pass`: the interpreter alone, the floor;
- `mmtok inspect DIR --json` on a small shard directory (made once): a command whose work is
  a few JSON and Parquet reads, so its time is nearly all start-up;
- `mmtok shard SRC --out OUT --no-validate` of 50 small files (a fresh OUT each run).
Each mmtok command runs again with pandas hidden (as after `pip install mmtok`, where pandas
is absent: it comes with the test extras; the two should take the same time), and with `--typer DIR` (a folder holding another
typer, e.g. `pip install --no-deps --target DIR typer==0.28.0`) with DIR first on PYTHONPATH:
side by side in the same runs.

Usage: python benchmarks/bench_startup.py [--typer /tmp/typer28] [--repeat 10]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchutil import finish_cpu_run, load_average, without_pandas


def typer_version(env: dict) -> str:
    return subprocess.run([sys.executable, "-c", "import typer; print(typer.__version__)"], env=env,
                          capture_output=True, text=True, check=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--typer", help="a folder holding another typer version, measured side by side")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/startup"))
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mmtok-bench-startup-"))
    src = work / "src"
    src.mkdir()
    for i in range(50):
        (src / f"t{i:02d}.txt").write_text(f"caption number {i}\n")
    mmtok = [sys.executable, "-m", "mmtok.cli.app"]
    subprocess.run([*mmtok, "shard", str(src), "--out", str(work / "shards"), "--quiet", "--json"], check=True,
                   stdout=subprocess.DEVNULL)
    commands = {"inspect": [*mmtok, "inspect", str(work / "shards"), "--json"],
                "shard": [*mmtok, "shard", str(src), "--out", str(work / "out"), "--quiet", "--no-validate", "--json"]}
    here = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    envs = {"": here, "_no_pandas": without_pandas(work)}
    if a.typer:
        envs["_other_typer"] = {**here, "PYTHONPATH": a.typer}
    contenders = {"python": ([sys.executable, "-c", "pass"], here)}
    contenders |= {name + suffix: (cmd, env) for name, cmd in commands.items() for suffix, env in envs.items()}
    times: dict[str, list[float]] = {k: [] for k in contenders}
    load_before = load_average()
    for _ in range(a.repeat):
        for name, (cmd, env) in contenders.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - t0)
            shutil.rmtree(work / "out", ignore_errors=True)  # untimed
    res = {"repeat": a.repeat, "typer": typer_version(here)}
    res |= {k: {"median_s": round(statistics.median(v), 3), "min_s": round(min(v), 3), "max_s": round(max(v), 3)}
            for k, v in times.items()}
    if a.typer:
        res["other_typer"] = typer_version(envs["_other_typer"])
    for name in commands:  # what each change of environment saves, median against median
        for suffix in list(envs)[1:]:
            res[f"{name}_saved_s{suffix}"] = round(statistics.median(times[name])
                                                  - statistics.median(times[name + suffix]), 3)
    finish_cpu_run(a.out, res, load_before, work)


if __name__ == "__main__":
    main()
