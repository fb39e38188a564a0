"""Peak memory (RSS) of `mmtok shard --no-validate` as a command, sharding ~370 MB of JPEGs.

The shard writer streams each member to its temporary file and never holds a shard, so the
peak should not grow with `--max-size` or the corpus: runs into 1 GiB shards (the issue's
case; aim < 300 MB) and into 64 MiB shards are set beside a run over a single file, which
is what the interpreter and its imports take. Peak RSS is the child's own (os.wait4's
ru_maxrss), --repeat runs each; the median and the spread are reported.

`--videos N` adds a folder of N video files of `--video-mb` MB each (a short real mp4, then
padding: shard reads the whole file and sniffs its start), sharded with `--workers` and with
twice as many: memory in flight is bounded by bytes (mmtok/dispatch.py), so the peak should
stay near the imports plus IN_FLIGHT_BYTES whatever the file size and the worker count.

Usage: python benchmarks/bench_shard_rss.py [--files 2000] [--videos 120]  (corpora kept in $BENCH_DIR)
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


def video_corpus(n: int, mb: int) -> Path:
    """`n` distinct video files of about `mb` MB, made on first use and kept."""
    d = Path(os.environ.get("BENCH_DIR", tempfile.gettempdir())) / f"mmtok-bench-videos-{n}-{mb}"
    done = d.with_name(f"{d.name}.done")
    if not done.exists():
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        clip = d.with_name(f"{d.name}-clip.mp4")
        # mmtok's ffmpeg, asked of a child: imported here, mmtok would count in every run's ru_maxrss
        # (a forked child's high-water mark includes the parent's pages before its exec)
        ffmpeg = subprocess.run([sys.executable, "-c", "from mmtok.media import ffmpeg_exe; print(ffmpeg_exe())"],
                                check=True, capture_output=True, text=True).stdout.strip()
        subprocess.run([ffmpeg, "-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=320x240:rate=10",
                        "-t", "2", "-c:v", "libx264", "-preset", "ultrafast", str(clip)], check=True)
        head, pad = clip.read_bytes(), os.urandom(mb * 1_000_000)
        for i in range(n):
            (d / f"v{i:04d}.mp4").write_bytes(head + pad + i.to_bytes(4, "big"))  # distinct: not deduplicated
        clip.unlink()
        done.touch()
    return d


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=2000, help="JPEGs (~185 KB each; 2000: ~370 MB)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--videos", type=int, default=0, help="also shard this many video files")
    ap.add_argument("--video-mb", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/shard_rss"))
    a = ap.parse_args()
    src = jpeg_corpus(a.files, 1200)
    work = Path(tempfile.mkdtemp(prefix="mmtok-bench-", dir=os.environ.get("BENCH_DIR")))
    one = work / "one"
    one.mkdir()
    shutil.copy(sorted(src.iterdir())[0], one)
    runs = {"one_file": (one, "1G", a.workers), "corpus_1GiB_shards": (src, "1G", a.workers),
            "corpus_64MiB_shards": (src, "64M", a.workers)}
    if a.videos:
        videos = video_corpus(a.videos, a.video_mb)
        for w in (a.workers, 2 * a.workers):
            runs[f"videos_w{w}"] = (videos, "1G", w)
    peaks: dict[str, list[float]] = {k: [] for k in runs}
    load_before = load_average()
    for _ in range(a.repeat):
        for name, (inp, max_size, workers) in runs.items():
            peaks[name].append(peak_rss_mb(inp, work / "out", max_size, workers))
    res = {"files": a.files, "bytes": sum(p.stat().st_size for p in src.iterdir()), "workers": a.workers,
           "repeat": a.repeat}
    if a.videos:
        res |= {"videos": a.videos, "video_bytes": sum(p.stat().st_size for p in videos.iterdir())}
    for name, v in peaks.items():
        res[name] = {"median_mb": round(statistics.median(v), 1), "min_mb": round(min(v), 1),
                     "max_mb": round(max(v), 1)}
    res["corpus_over_one_file_mb"] = round(res["corpus_1GiB_shards"]["median_mb"] - res["one_file"]["median_mb"], 1)
    finish_cpu_run(a.out, res, load_before, work)


if __name__ == "__main__":
    main()
