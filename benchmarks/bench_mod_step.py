"""Training-step time of MoMa with Mixture-of-Depths (mod-moma 4t4i) against moma 4t4i and
dense, side by side on the same batches (MoMa reports MoD 4t4i 31% slower than dense in
throughput, 4t4i 17%).

Mixture-of-Depths sends only 25% of the tokens through every other block, so its FLOPs
per token are lower; the gather/scatter and the extra routers cost time back.

CPU: python benchmarks/bench_mod_step.py
GPU: python benchmarks/bench_mod_step.py --device cuda --preset 90m --seq-len 4096 --batch 4
Writes JSON and a markdown table to --out.
"""

from __future__ import annotations

from bench_step import main  # same batches, timing and table as bench_step

VARIANTS = [("dense", {}), ("moma 4t4i", dict(model="moma", experts="4t4i")),
            ("mod-moma 4t4i", dict(model="mod-moma", experts="4t4i"))]


if __name__ == "__main__":
    main(VARIANTS, __doc__, "benchmarks/results/mod_step")
