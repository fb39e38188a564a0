"""Sharding throughput, side by side with its baselines over the same files.

- no-validate `mmtok shard` vs `tar cf` (aim: at least 0.5x tar's throughput)
- validate `mmtok shard` vs a bare PIL open+decode loop (aim: at most 1.25x its time)

Files are generated once (noisy JPEGs drawn with PIL), the page cache is warmed, and each
contender's best of --repeat runs is kept. Usage: python benchmarks/bench_shard.py [--n 1000]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchutil import best_of, machine, save
from mmtok.ingest import ShardFn, shard_items
from mmtok.runner import run_stage


def make_files(d: Path, n: int, size: int) -> int:
    rng = np.random.default_rng(0)
    total = 0
    for i in range(n):
        base = np.linspace(0, 255, size, dtype=np.float32)[None, :, None] * np.ones((size, 1, 3), np.float32)
        img = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        p = d / f"img{i:05d}.jpg"
        Image.fromarray(img).save(p, quality=90)
        total += p.stat().st_size
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench-out/shard.json"))
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mmtok-bench-"))
    src = work / "src"
    src.mkdir()
    nbytes = make_files(src, a.n, a.size)
    files = sorted(src.iterdir())

    def tar():
        subprocess.run(["tar", "cf", str(work / "all.tar"), "-C", str(src), "."], check=True)

    def pil_loop():
        for f in files:
            with Image.open(f) as im:
                im.load()

    runs = iter(range(10**6))

    def mmtok(validate: bool, workers: int):
        def go():  # a fresh output directory each run; they are removed with `work` at the end
            out = work / f"out{next(runs)}"
            run_stage("shard", shard_items([str(src)]), ShardFn(validate), out, config={}, workers=workers,
                      max_count=10_000, dedup=True, progress=False, task_size=8, threads=True)  # as `mmtok shard`
        return go

    tar()  # warm the page cache
    res = {"files": a.n, "bytes": nbytes, "image_size": a.size}
    res["tar_s"] = best_of(tar, a.repeat)
    res["pil_decode_s"] = best_of(pil_loop, a.repeat)
    for w in (1, 2):
        res[f"shard_novalidate_w{w}_s"] = best_of(mmtok(False, w), a.repeat)
        res[f"shard_validate_w{w}_s"] = best_of(mmtok(True, w), a.repeat)
    for w in (1, 2):
        res[f"novalidate_w{w}_throughput_vs_tar"] = round(res["tar_s"] / res[f"shard_novalidate_w{w}_s"], 3)
        res[f"validate_w{w}_time_vs_pil"] = round(res[f"shard_validate_w{w}_s"] / res["pil_decode_s"], 3)
    res["machine"] = machine()
    res["date"] = time.strftime("%Y-%m-%d")
    save(a.out, res)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
