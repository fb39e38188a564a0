"""Peak memory (RSS) of `mmtok shard --no-validate` as a command, sharding ~370 MB of JPEGs.

The shard writer streams each member to its temporary file and never holds a shard, so the
peak should not grow with `--max-size` or the corpus: runs into 1 GiB shards (the issue's
case; aim < 300 MB) and into 64 MiB shards are set beside a run over a single file, which
is what the interpreter and its imports take. Peak RSS is the child's own (os.wait4's
ru_maxrss), --repeat runs each; the median and the spread are reported.

Usage: python benchmarks/bench_shard_rss.py [--files 2000]  (the JPEGs of bench_shard.py, kept in $BENCH_DIR)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_shard import jpeg_corpus
from benchutil import finish_cpu_run, load_average


def peak_rss_mb(src: Path, out: Path, max_size: str, workers: int) -> float:
    """The peak RSS of one `mmtok shard` process, in MB (ru_maxrss is in KiB on Linux)."""
    cmd = [sys.executable, "-m", "mmtok.cli.app", "shard", str(src), "--out", str(out), "--quiet", "--json",
           "--no-validate", "--max-size", max_size, "--workers", str(workers)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} exited with status {proc.returncode}")
    shutil.rmtree(out)
    return usage.ru_maxrss * 1024 / 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=2000, help="JPEGs (~185 KB each; 2000: ~370 MB)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/shard_rss"))
    a = ap.parse_args()
    src = jpeg_corpus(a.files, 1200)
    work = Path(tempfile.mkdtemp(prefix="mmtok-bench-", dir=os.environ.get("BENCH_DIR")))
    one = work / "one"
    one.mkdir()
    shutil.copy(sorted(src.iterdir())[0], one)
    runs = {"one_file": (one, "1G"), "corpus_1GiB_shards": (src, "1G"), "corpus_64MiB_shards": (src, "64M")}
    peaks: dict[str, list[float]] = {k: [] for k in runs}
    load_before = load_average()
    for _ in range(a.repeat):
        for name, (inp, max_size) in runs.items():
            peaks[name].append(peak_rss_mb(inp, work / "out", max_size, a.workers))
    res = {"files": a.files, "bytes": sum(p.stat().st_size for p in src.iterdir()), "workers": a.workers,
           "repeat": a.repeat}
    for name, v in peaks.items():
        res[name] = {"median_mb": round(statistics.median(v), 1), "min_mb": round(min(v), 1),
                     "max_mb": round(max(v), 1)}
    res["corpus_over_one_file_mb"] = round(res["corpus_1GiB_shards"]["median_mb"] - res["one_file"]["median_mb"], 1)
    finish_cpu_run(a.out, res, load_before, work)


if __name__ == "__main__":
    main()
