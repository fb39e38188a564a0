"""`mmtok shard --no-validate` throughput as a user runs it, side by side with its baselines.

Contenders, over the same photo-sized JPEGs with the page cache warm, best of --repeat:
- `tar cf` of the folder (no hashing; tar does not fsync);
- a bare one-process Python loop that reads each file, sha256-hashes it and writes it into
  one tar (tarfile), then fsyncs: the least a Python sharder that hashes its content does;
- `mmtok shard SRC --out OUT --no-validate` run as a command (interpreter start-up, its
  fsyncs, manifest and index included), 1 and 2 workers, a fresh OUT each run.
Aims: mmtok at least 0.5x tar's throughput and 1.2x the bare loop's.
`--validate` adds `mmtok shard` (validating) and a bare PIL open + decode loop.

Usage: python benchmarks/bench_shard.py [--n 2000 --size 1200]  (~185 KB per JPEG at 1200 px: ~370 MB)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchutil import best_of, machine, save


def make_files(d: Path, n: int, size: int) -> int:
    """Photo-like JPEGs: a lit gradient with smooth blobs and sensor noise, 4:3."""
    rng = np.random.default_rng(0)
    w, h = size, size * 3 // 4
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    total = 0
    for i in range(n):
        light = np.stack([xx / w * rng.uniform(60, 200) + yy / h * rng.uniform(0, 80) for _ in range(3)], -1)
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(h / 8, h / 2)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None] * rng.uniform(-90, 90, 3)
        img = np.clip(light + blob + rng.normal(0, 5, (h, w, 3)), 0, 255).astype(np.uint8)
        p = d / f"img{i:05d}.jpg"
        Image.fromarray(img).save(p, quality=90)
        total += p.stat().st_size
    return total


def bare_loop(files: list[Path], out: Path) -> None:
    """Read, sha256 and write each file into one tar, then fsync."""
    with open(out, "wb") as f, tarfile.open(fileobj=f, mode="w") as t:
        for p in files:
            data = p.read_bytes()
            hashlib.sha256(data).hexdigest()
            info = tarfile.TarInfo(p.name)
            info.size = len(data)
            t.addfile(info, _Bytes(data))
        t.close()
        f.flush()
        os.fsync(f.fileno())


class _Bytes:
    """A file object over bytes without a copy (tarfile reads the data back in chunks)."""

    def __init__(self, data: bytes):
        self.view, self.pos = memoryview(data), 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.view) if n < 0 else self.pos + n
        chunk, self.pos = self.view[self.pos:end], min(end, len(self.view))
        return chunk


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--size", type=int, default=1200, help="width of the JPEGs (4:3)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--validate", action="store_true", help="also measure --validate against a PIL decode loop")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/shard"))
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mmtok-bench-", dir=os.environ.get("BENCH_DIR")))
    src = work / "src"
    src.mkdir()
    nbytes = make_files(src, a.n, a.size)
    files = sorted(src.iterdir())

    def tar():
        subprocess.run(["tar", "cf", str(work / "all.tar"), "-C", str(src), "."], check=True)

    def loop():
        bare_loop(files, work / "loop.tar")

    def pil_loop():
        for f in files:
            with Image.open(f) as im:
                im.load()

    def mmtok(validate: bool, workers: int) -> float:
        """Best of --repeat runs of the command, each into a fresh OUT (removed untimed)."""
        times = []
        for _ in range(a.repeat):
            out = work / "out"
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "mmtok.cli.app", "shard", str(src), "--out", str(out), "--quiet",
                            "--workers", str(workers), "--validate" if validate else "--no-validate", "--json"],
                           check=True, stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - t0)
            shutil.rmtree(out)
        return min(times)

    tar()  # warm the page cache
    res = {"files": a.n, "bytes": nbytes, "width": a.size, "repeat": a.repeat}
    res["tar_s"] = best_of(tar, a.repeat)
    res["bare_loop_s"] = best_of(loop, a.repeat)
    for w in (1, 2):
        res[f"shard_novalidate_w{w}_s"] = mmtok(False, w)
    for w in (1, 2):
        res[f"novalidate_w{w}_throughput_vs_tar"] = round(res["tar_s"] / res[f"shard_novalidate_w{w}_s"], 3)
        res[f"novalidate_w{w}_throughput_vs_bare_loop"] = round(res["bare_loop_s"] / res[f"shard_novalidate_w{w}_s"], 3)
    if a.validate:
        res["pil_decode_s"] = best_of(pil_loop, a.repeat)
        for w in (1, 2):
            res[f"shard_validate_w{w}_s"] = mmtok(True, w)
            res[f"validate_w{w}_time_vs_pil"] = round(res[f"shard_validate_w{w}_s"] / res["pil_decode_s"], 3)
    res["machine"] = machine()
    res["load_average"] = round(os.getloadavg()[0], 2)
    save(a.out, res)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
