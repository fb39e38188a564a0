"""Where a training step's GPU time goes: torch.profiler over a few steps of one
bench_step variant, printing the top kernels/ops by device time (and host-side syncs).

python benchmarks/profile_step.py --device cuda --preset 90m --seq-len 4096 --batch 4 --model "moma 4t4i"
"""

from __future__ import annotations

import argparse

import torch
from bench_mod_step import VARIANTS as MOD_VARIANTS
from bench_step import VARIANTS, batch, make_step
from torch.profiler import ProfilerActivity, profile

from mmtok.trainer.config import PRESETS, ModelConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--attention", default="sdpa")
    ap.add_argument("--model", default="moma 4t4i", choices=sorted(dict(VARIANTS + MOD_VARIANTS)))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=30)
    args = ap.parse_args()
    device = torch.device(args.device)
    image_lo = args.vocab * 7 // 8
    cfg = ModelConfig(vocab_size=args.vocab, image_range=(image_lo, args.vocab), max_seq_len=args.seq_len,
                      attention=args.attention, **PRESETS[args.preset], **dict(VARIANTS + MOD_VARIANTS)[args.model])
    step = make_step(cfg, batch(args.vocab, image_lo, args.batch, args.seq_len, 0.5, device), device)
    for _ in range(3):
        step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(args.steps):
            step()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"== {args.model}, {args.preset}, {args.steps} steps, by {key}")
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
