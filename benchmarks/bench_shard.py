"""`mmtok shard --no-validate` throughput as a user runs it, side by side with its baselines.

Contenders, over the same photo-sized JPEGs (~185 KB each) with the page cache warm, run in
turn --repeat times (interleaved, so that a change in the machine's load hits all alike):
- `tar cf` of the folder (no hashing; tar does not fsync);
- the baseline: a bare one-process Python loop that reads each file, sha256-hashes it and
  writes it into one tar (tarfile), then fsyncs: the least a Python sharder that hashes its
  content does;
- `mmtok shard SRC --out OUT --no-validate` run as a command (interpreter start-up, its
  fsyncs, manifest and index included), with 1 and 2 workers, a fresh OUT each run.
Between runs (untimed) OUT is removed and the disk synced, so that no run pays for the
writeback of the one before it. Each figure is the median of the runs, with their spread
(min-max); the ratios are throughputs (tar's time / mmtok's time): aims >= 0.5x tar and
>= 1.2x the bare loop.
`--validate` adds `mmtok shard` (validating) and a bare PIL open + decode loop. `--captions`
puts a one-line caption file beside each JPEG, so that every sample is an image-caption
pair as img2dataset writes them (the bare loop then reads and hashes both files).

Usage: python benchmarks/bench_shard.py [--files 2000]   (2,000 files ~370 MB; 400 by default)
The JPEGs are made once into $BENCH_DIR (default: the temporary directory) and kept there.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchutil import finish_cpu_run, load_average


def make_files(d: Path, n: int, size: int, distinct: int = 100) -> int:
    """Photo-like JPEGs: a lit gradient with smooth blobs and sensor noise, 4:3. `distinct`
    images are encoded (~0.1 s each); the others are their copies, each made unique (shard
    dedups by content) by a comment segment after the start marker: valid JPEGs all."""
    rng = np.random.default_rng(0)
    w, h = size, size * 3 // 4
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    bases, total = [], 0
    for i in range(n):
        if i < distinct:
            light = np.stack([xx / w * rng.uniform(60, 200) + yy / h * rng.uniform(0, 80) for _ in range(3)], -1)
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(h / 8, h / 2)
            blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None] * rng.uniform(-90, 90, 3)
            img = np.clip(light + blob + rng.normal(0, 5, (h, w, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, "JPEG", quality=90)
            bases.append(buf.getvalue())
        comment = f"mmtok benchmark image {i}".encode()
        data = bases[i % distinct]
        data = data[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + data[2:]
        (d / f"img{i:05d}.jpg").write_bytes(data)
        total += len(data)
    return total


def jpeg_corpus(n: int, size: int, captions: bool = False) -> Path:
    """The folder of `n` JPEGs (each with a caption file beside it: `captions`), made on
    first use and kept."""
    d = Path(os.environ.get("BENCH_DIR", tempfile.gettempdir())) / f"mmtok-bench-jpegs-{n}-{size}{'-pairs' * captions}"
    done = d.with_name(f"{d.name}.done")  # beside the folder: inside, it would be input
    if not done.exists():
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        make_files(d, n, size)
        for i in range(n if captions else 0):  # an img2dataset-like caption: a short line
            (d / f"img{i:05d}.txt").write_text(f"a photo of a lit wall with a soft round shadow, number {i}")
        done.touch()
    return d


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


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def summary(times: list[float]) -> dict:
    return {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
            "max_s": round(max(times), 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=400, help="JPEGs to shard (2000: ~370 MB, the issue's run)")
    ap.add_argument("--size", type=int, default=1200, help="width of the JPEGs (4:3); 1200 px: ~185 KB each")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--validate", action="store_true", help="also measure --validate against a PIL decode loop")
    ap.add_argument("--captions", action="store_true", help="a caption .txt beside each JPEG: every sample is a pair")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/shard"))
    a = ap.parse_args()
    src = jpeg_corpus(a.files, a.size, a.captions)
    files = sorted(src.iterdir())
    nbytes = sum(p.stat().st_size for p in files)
    work = Path(tempfile.mkdtemp(prefix="mmtok-bench-", dir=os.environ.get("BENCH_DIR")))
    out = work / "out"

    def tar():
        subprocess.run(["tar", "cf", str(work / "all.tar"), "-C", str(src), "."], check=True)

    def mmtok(validate: bool, workers: int):
        def go():
            subprocess.run([sys.executable, "-m", "mmtok.cli.app", "shard", str(src), "--out", str(out), "--quiet",
                            "--workers", str(workers), "--validate" if validate else "--no-validate", "--json"],
                           check=True, stdout=subprocess.DEVNULL)
        return go

    def pil_loop():
        for f in (f for f in files if f.suffix == ".jpg"):
            with Image.open(f) as im:
                im.load()

    contenders = {"tar": tar, "bare_loop": lambda: bare_loop(files, work / "loop.tar"),
                  "shard_novalidate_w1": mmtok(False, 1), "shard_novalidate_w2": mmtok(False, 2)}
    if a.validate:
        contenders |= {"pil_decode": pil_loop, "shard_validate_w1": mmtok(True, 1), "shard_validate_w2": mmtok(True, 2)}
    tar()  # warm the page cache
    times: dict[str, list[float]] = {k: [] for k in contenders}
    load_before = load_average()
    for _ in range(a.repeat):
        for name, fn in contenders.items():
            times[name].append(timed(fn))
            shutil.rmtree(out, ignore_errors=True)  # untimed: each mmtok run starts from an empty OUT
            os.sync()  # untimed: no run pays for the writeback of the one before it
    res = {"files": len(files), "bytes": nbytes, "width": a.size, "captions": a.captions, "repeat": a.repeat}
    res |= {k: summary(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    for w in ("w1", "w2"):
        res[f"novalidate_{w}_throughput_vs_tar"] = round(med["tar"] / med[f"shard_novalidate_{w}"], 3)
        res[f"novalidate_{w}_throughput_vs_bare_loop"] = round(med["bare_loop"] / med[f"shard_novalidate_{w}"], 3)
    for w in (1, 2) if a.validate else ():
        res[f"validate_w{w}_time_vs_pil"] = round(med[f"shard_validate_w{w}"] / med["pil_decode"], 3)
    finish_cpu_run(a.out, res, load_before, work)


if __name__ == "__main__":
    main()
