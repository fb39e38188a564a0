"""`mmtok shard` with validation (every image decoded) on the local pool vs on Ray tasks.

Side by side over the same files, as `mmtok shard --workers W` runs it:
- local: W threads on this machine (the default backend);
- ray, warm: a Ray instance already running (as on a cluster: start-up is paid once);
- ray, cold: the runner starts a local Ray instance of W CPUs and stops it (one run).
The outputs of every contender are checked to be byte-identical. On one small machine Ray
can only add overhead (scheduling, the object store, start-up); its point is many machines.

Usage: python benchmarks/bench_ray_backend.py [--n 1000] [--workers 2]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from bench_shard import make_files
from benchutil import best_of, machine, save
from mmtok.ingest import ShardFn, shard_items
from mmtok.runner import run_stage


def tree(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and not p.name.startswith("_")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench-out/ray"))
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mmtok-bench-ray-"))
    src = work / "src"
    src.mkdir()
    nbytes = make_files(src, a.n, a.size)
    outs = []

    def shard(backend: str):
        def go():  # a fresh output directory per run, as a new job would have
            out = work / f"out{len(outs)}-{backend}"
            outs.append(out)
            run_stage("shard", shard_items([str(src)]), ShardFn(True), out, config={}, workers=a.workers,
                      dedup=True, progress=False, task_size=8, threads=True, backend=backend)  # as `mmtok shard`
        return go

    import ray

    res = {"files": a.n, "bytes": nbytes, "image_size": a.size, "workers": a.workers}
    res["ray_cold_s"] = best_of(shard("ray"), 1)  # the runner starts and stops its own instance
    res["local_s"] = best_of(shard("local"), a.repeat)
    ray.init(num_cpus=a.workers, include_dashboard=False, log_to_driver=False)
    shard("ray")()  # warm the workers up (imports), as a long-lived cluster would be
    res["ray_warm_s"] = best_of(shard("ray"), a.repeat)
    ray.shutdown()
    ref = tree(outs[0])
    res["identical_outputs"] = all(tree(o) == ref for o in outs)
    res["ray_warm_vs_local"] = round(res["ray_warm_s"] / res["local_s"], 2)
    res["ray_cold_vs_local"] = round(res["ray_cold_s"] / res["local_s"], 2)
    res["machine"] = machine()
    lines = [
        f"# shard --validate, {a.n} JPEGs {a.size}x{a.size} ({nbytes / 1e6:.1f} MB), --workers {a.workers}",
        f"machine: {res['machine']}; date {time.strftime('%Y-%m-%d')}",
        "",
        "| backend | seconds | images/s | time vs local |",
        "| --- | --- | --- | --- |",
        f"| local (threads) | {res['local_s']:.2f} | {a.n / res['local_s']:.0f} | 1.00 |",
        f"| ray, instance already running | {res['ray_warm_s']:.2f} | {a.n / res['ray_warm_s']:.0f} | "
        f"{res['ray_warm_vs_local']:.2f} |",
        f"| ray, started and stopped by the run | {res['ray_cold_s']:.2f} | {a.n / res['ray_cold_s']:.0f} | "
        f"{res['ray_cold_vs_local']:.2f} |",
        "",
        f"outputs byte-identical: {res['identical_outputs']}",
    ]
    save(a.out, res, lines)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
