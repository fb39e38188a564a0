"""`mmtok tokenize-images --nproc 2` and `--backend ray --actors 2` against `--nproc 1`, same
inputs, side by side.

Each contender is the CLI as a user runs it (start-up, tokenizer load, torchrun for --nproc,
the local Ray instance and its actors for --backend ray, the join included), one thread of
torch per process (OMP_NUM_THREADS=1, as torchrun and Ray's 1-CPU actors set it), so N
processes use N cores; one process with every core's threads is reported too. A VQ with random weights (speed does not depend on them), generated JPEGs in several
input shards (the unit the ranks split). The outputs are checked byte-identical.

Run: .venv/bin/python benchmarks/bench_tokenize_nproc.py [--images 256 --resolution 128]
Writes benchmarks/results/tokenize_nproc.json and .md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_tokenize_images import _image_sample, jpeg, make_tokdir
from benchutil import machine, save
from mmtok.runner import Item, run_stage
from mmtok.vq import VQConfig


def run(shards: Path, tok: Path, out: Path, threads: int, batch_size: int, spread: list[str]) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mmtok.cli.app", "tokenize-images", str(shards), "--tokenizer", str(tok),
                    "--out", str(out), *spread, "--device", "cpu", "--batch-size", str(batch_size),
                    "--quiet", "--json"], env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != ".mmtok.lock"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--per-shard", type=int, default=32, help="images per input shard")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/tokenize_nproc")
    a = ap.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_tokdir(tmp / "tok", VQConfig(resolution=a.resolution, channels=a.channels))
        items = [Item(str(i), (i, jpeg(i, a.resolution))) for i in range(a.images)]
        run_stage("shard", items, _image_sample, tmp / "shards", config={"bench": a.images}, progress=False,
                  max_count=a.per_shard)
        contenders = {"1 process, 1 thread": (1, ["--nproc", "1"]), "2 processes, 1 thread each": (1, ["--nproc", "2"]),
                      f"1 process, {cores} threads": (cores, ["--nproc", "1"]),
                      "2 Ray actors, 1 thread each": (1, ["--backend", "ray", "--actors", "2"])}
        best, outputs = {}, {}
        for _ in range(a.repeat):  # interleaved, so load from other jobs hits each alike
            for name, (threads, spread) in contenders.items():
                out = tmp / f"out-{len(outputs)}"
                best[name] = min(best.get(name, float("inf")), run(tmp / "shards", tmp / "tok", out, threads,
                                                                   a.batch_size, spread))
                outputs[out] = files(out)
        first = next(iter(outputs.values()))
        identical = all(o == first for o in outputs.values())
    base = best["1 process, 1 thread"]
    res = {"images": a.images, "resolution": a.resolution, "channels": a.channels, "input_shards": -(-a.images // a.per_shard),
           "batch_size": a.batch_size, "seconds": {k: round(v, 2) for k, v in best.items()},
           "speedup_vs_1_process": {k: round(base / v, 2) for k, v in best.items()},
           "outputs_byte_identical": identical, "machine": machine(), "load_average": os.getloadavg()[0]}
    lines = [f"`tokenize-images`, {a.images} JPEGs at {a.resolution} px in {res['input_shards']} input shards, "
             f"VQ channels {a.channels}, CLI wall time (best of {a.repeat}); {machine()}",
             "", "| contender | s | speed-up vs 1 process |", "| --- | --- | --- |"]
    lines += [f"| {k} | {best[k]:.1f} | {base / best[k]:.2f}x |" for k in best]
    lines += ["", f"outputs byte-identical: {identical}"]
    save(a.out, res, lines)


if __name__ == "__main__":
    main()
