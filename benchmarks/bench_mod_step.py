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

import argparse

import torch

from benchutil import machine, save
from bench_step import batch, make_step, time_variants  # same batches and timing as bench_step
from mmtok.trainer.config import PRESETS, ModelConfig

VARIANTS = [("dense", {}), ("moma 4t4i", dict(model="moma", experts="4t4i")),
            ("mod-moma 4t4i", dict(model="mod-moma", experts="4t4i"))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default=None, help="a trainer preset; default: 4 layers, d 128 (CPU)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--image-share", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=10, help="timed rounds (one step of each variant)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/mod_step")
    args = ap.parse_args()
    device = torch.device(args.device)
    size = PRESETS[args.preset] if args.preset else dict(n_layers=4, d_model=128, n_heads=4, ffn_hidden=512)
    image_lo = args.vocab * 7 // 8
    data = batch(args.vocab, image_lo, args.batch, args.seq_len, args.image_share, device)
    cfgs = {name: ModelConfig(vocab_size=args.vocab, image_range=(image_lo, args.vocab), max_seq_len=args.seq_len,
                              **size, **kw) for name, kw in VARIANTS}
    if device.type == "cuda":  # one at a time: large expert models do not fit together
        seconds = {}
        for name, cfg in cfgs.items():
            seconds.update(time_variants({name: make_step(cfg, data, device)}, args.steps, args.warmup))
            torch.cuda.empty_cache()
    else:  # interleaved, so that load from other processes hits all alike
        seconds = time_variants({name: make_step(cfg, data, device) for name, cfg in cfgs.items()}, args.steps, args.warmup)
    rows = [{"model": name, "step_s": s, "tokens_per_s": args.batch * args.seq_len / s, "vs_dense": s / seconds["dense"]}
            for name, s in seconds.items()]
    result = {"machine": machine(device),
              "size": size, "seq_len": args.seq_len, "batch": args.batch, "vocab": args.vocab, "rows": rows}
    lines = ["| model | ms/step | tokens/s | time vs dense |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['model']} | {r['step_s'] * 1000:.1f} | {r['tokens_per_s']:.0f} | {r['vs_dense']:.2f}x |" for r in rows]
    save(args.out, result, lines)


if __name__ == "__main__":
    main()
