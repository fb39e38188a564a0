"""Training-step time of MoMa (1t1i, 4t4i) and MoE (8 experts, expert choice) against the
dense model at matched active FLOPs, side by side on the same batches.

With expert choice at capacity factor 1, every expert is as wide as the dense FFN and
takes tokens/experts tokens, so each token costs one FFN on average: the same active
FLOPs as dense. The ratio step_time(model) / step_time(dense) is the routing overhead
(MoMa reports 1t1i 6% and 4t4i 17% slower than dense; our aim: at most 1.2x).

CPU: python benchmarks/bench_step.py                       (tiny-ish size, fp32)
GPU: python benchmarks/bench_step.py --device cuda --preset 90m --seq-len 4096 --batch 4
     (bf16 autocast; also prints MFU from active parameters; --attention flex for flex attention)
Writes JSON and a markdown table to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from benchutil import device_waits, machine, save
from mmtok.trainer.config import PRESETS, ModelConfig
from mmtok.trainer.model import Decoder, flops_per_token, loss_terms
from mmtok.trainer.metrics import PEAK_BF16_FLOPS

VARIANTS = [("dense", {}), ("moma 1t1i", dict(model="moma", experts="1t1i")),
            ("moma 4t4i", dict(model="moma", experts="4t4i")), ("moe 8x", dict(model="moe", experts="8"))]


def batch(vocab: int, image_lo: int, b: int, t: int, image_share: float, device) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(16, image_lo, (b, t), generator=g)
    image = torch.rand(b, t, generator=g) < image_share
    ids[image] = torch.randint(image_lo, vocab, (int(image.sum()),), generator=g)
    docs = torch.ones(b, t, dtype=torch.int32)
    return {"input_ids": ids.to(device), "targets": torch.roll(ids, -1, 1).to(device), "doc_ids": docs.to(device),
            "positions": torch.arange(t, dtype=torch.int32).repeat(b, 1).to(device)}


def make_step(cfg: ModelConfig, data: dict, device, optimizer: str = "foreach"):
    torch.manual_seed(0)
    model = Decoder(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **{optimizer: True})
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step(waits=None) -> float:
        t0 = time.perf_counter()
        with waits or contextlib.nullcontext():
            with amp:
                # the trainer's path: the head fused with a chunked cross-entropy
                out, stats = model(data["input_ids"], data["positions"], data["doc_ids"], targets=data["targets"])
                loss = loss_terms(cfg, out, data["targets"], stats)["loss"]
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return step


def time_variants(steps_by_name: dict, rounds: int, warmup: int) -> dict:
    """Interleave the variants step by step, so that load from other processes on a shared
    machine hits them alike; median step time per variant."""
    for step in steps_by_name.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps_by_name}
    for _ in range(rounds):
        for name, step in steps_by_name.items():
            times[name].append(step())
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def main(variants=VARIANTS, description: str = __doc__, default_out: str = "benchmarks/results/step") -> None:
    """Time `variants` against dense (the first) on the same batches; bench_mod_step reuses it."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default=None, help="a trainer preset; default: 4 layers, d 128 (CPU)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--image-share", type=float, default=0.5)
    ap.add_argument("--attention", default="sdpa", choices=["sdpa", "flex"],
                    help="sdpa: explicit document mask (no flash kernel); flex: block mask (GPU only)")
    ap.add_argument("--optimizer", default="foreach", choices=["foreach", "fused"],
                    help="AdamW implementation: foreach (the trainer's) or fused (one kernel; CUDA)")
    ap.add_argument("--steps", type=int, default=10, help="timed rounds (one step of each variant)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=default_out)
    args = ap.parse_args()
    device = torch.device(args.device)
    size = PRESETS[args.preset] if args.preset else dict(n_layers=4, d_model=128, n_heads=4, ffn_hidden=512)
    image_lo = args.vocab * 7 // 8
    data = batch(args.vocab, image_lo, args.batch, args.seq_len, args.image_share, device)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name(device)), None) \
        if device.type == "cuda" else None
    cfgs = {name: ModelConfig(vocab_size=args.vocab, image_range=(image_lo, args.vocab), max_seq_len=args.seq_len,
                              attention=args.attention, **size, **kw) for name, kw in variants}
    if device.type == "cuda":
        # One variant at a time: at 435m the expert models hold ~2.4B parameters each, so
        # four of them with AdamW state do not fit together; a GPU is not noisy anyway.
        seconds, memory = {}, {}
        for name, cfg in cfgs.items():
            torch.cuda.reset_peak_memory_stats(device)
            seconds.update(time_variants({name: make_step(cfg, data, device, args.optimizer)}, args.steps, args.warmup))
            # allocator retries (frees and re-mallocs when memory runs short) stall the GPU
            mem = torch.cuda.memory_stats(device)
            memory[name] = {"peak_gib": mem["allocated_bytes.all.peak"] / 2**30, "alloc_retries": mem["num_alloc_retries"]}
            torch.cuda.empty_cache()
    else:
        memory = {}
        seconds = time_variants({name: make_step(cfg, data, device, args.optimizer) for name, cfg in cfgs.items()}, args.steps,
                                args.warmup)
    rows = []
    for name, cfg in cfgs.items():
        waits = device_waits()  # one more step, untimed: how often it makes the host wait for the device
        make_step(cfg, data, device, args.optimizer)(waits)
        tok_s = args.batch * args.seq_len / seconds[name]
        row = {"model": name, "step_s": seconds[name], "tokens_per_s": tok_s, "flops_per_token": flops_per_token(cfg, args.seq_len),
               "host_waits": waits.total}
        if peak:
            row["mfu"] = tok_s * row["flops_per_token"] / peak
        rows.append(row | memory.get(name, {}))
    for r in rows:
        r["vs_dense"] = r["step_s"] / rows[0]["step_s"]
    result = {"machine": machine(device),
              "size": size, "seq_len": args.seq_len, "batch": args.batch, "vocab": args.vocab,
              "image_share": args.image_share, "attention": args.attention, "optimizer": args.optimizer, "rows": rows}
    lines = ["| model | ms/step | tokens/s | time vs dense | host waits/step |" + (" MFU | peak GiB | alloc retries |" if peak else ""),
             "| --- | --- | --- | --- | --- |" + (" --- | --- | --- |" if peak else "")]
    for r in rows:
        lines.append(f"| {r['model']} | {r['step_s'] * 1000:.1f} | {r['tokens_per_s']:.0f} | {r['vs_dense']:.2f}x | {r['host_waits']} |"
                     + (f" {r['mfu']:.1%} | {r['peak_gib']:.1f} | {r['alloc_retries']} |" if peak else ""))
    save(args.out, result, lines)


if __name__ == "__main__":
    main()
