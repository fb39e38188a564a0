"""Issue 18's measurement: the trainer's own step (FSDP2 on one process with bf16 parameters
and fp32 reduction, fused AdamW, the fused chunked head, optional regional torch.compile
and activation checkpointing, all through `trainer/parallel.parallelize` and
`build_optimizer`) for dense, moma 4t4i and mod-moma 4t4i per preset, with tokens/s, MFU
and peak memory. Rows are appended to --jsonl (one process may run out of memory or time
without losing the others); `--table` prints the collected rows as ONE table with the
moma/dense and mod-moma/dense step-time ratios of the same run.

GPU:   python benchmarks/bench_speed.py --presets 90m,435m --compile --jsonl OUT/rows.jsonl
Table: python benchmarks/bench_speed.py --table OUT/rows.jsonl
Smoke (CPU, tiny sizes, eager compile backend): add --smoke
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench_step import batch
from mmtok.trainer.config import PRESETS, ModelConfig, TrainConfig
from mmtok.trainer.metrics import peak_flops
from mmtok.trainer.model import Decoder, flops_per_token, loss_terms
from mmtok.trainer.parallel import init_distributed, parallelize
from mmtok.trainer.train import build_optimizer

MODELS = {"dense": {}, "moma 4t4i": dict(model="moma", experts="4t4i"), "mod-moma 4t4i": dict(model="mod-moma", experts="4t4i")}
BATCH = {"90m": 4, "435m": 2, "1.4b": 1}  # micro-batch rows of seq-len tokens (MoMa 4t4i at 1.4b: ~10B parameters)


def measure(preset: str, model: str, args, device) -> dict:
    smoke = args.smoke
    size = dict(n_layers=2, d_model=64, n_heads=4, ffn_hidden=256) if smoke else PRESETS[preset]
    vocab, seq = (512, 64) if smoke else (65536, args.seq_len)
    b = 2 if smoke else BATCH[preset]
    cfg = ModelConfig(vocab_size=vocab, image_range=(vocab * 7 // 8, vocab), max_seq_len=seq, attention=args.attention,
                      **size, **MODELS[model])
    row = {"preset": preset, "model": model, "compile": args.compile, "act_ckpt": args.act_ckpt, "batch": f"{b}x{seq}",
           "attention": args.attention}
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with device:  # weights made where they live: a 1.4b model built on the host takes minutes
        m = Decoder(cfg)
    m = parallelize(m, 1, device, bf16=device.type == "cuda", act_ckpt=args.act_ckpt, compile=args.compile and not smoke)
    if args.compile and smoke:  # CPU: inductor needs a C++ toolchain and minutes; the eager backend traces the same graphs
        for block in m.layers:
            block.compile(backend="eager")
    opt = build_optimizer(m.train(), TrainConfig(lr=1e-4))
    data = batch(vocab, vocab * 7 // 8, b, seq, 0.5, device)

    def step() -> float:
        t0 = time.perf_counter()
        out, stats = m(data["input_ids"], data["positions"], data["doc_ids"], targets=data["targets"])
        loss_terms(cfg, out, data["targets"], stats)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    for _ in range(args.warmup):  # the first steps compile
        step()
    row["warmup_s"] = time.perf_counter() - t0
    times = sorted(step() for _ in range(args.steps))
    row["step_s"] = times[len(times) // 2]
    row["tokens_per_s"] = b * seq / row["step_s"]
    peak = peak_flops(device)
    row["mfu"] = row["tokens_per_s"] * flops_per_token(cfg, seq) / peak if peak else None
    row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return row


def table(path: Path) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    def key(r):  # a model is compared with dense of the same preset, compile, checkpointing and attention
        return r["preset"], r["compile"], r["act_ckpt"], r.get("attention", "sdpa")

    dense = {key(r): r.get("step_s") for r in rows if r["model"] == "dense"}
    lines = ["| preset | batch | compile | act ckpt | model | ms/step | tokens/s | MFU | peak GiB | vs dense | warm-up s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        head = f"| {r['preset']} | {r.get('batch', '')} | {'yes' if r['compile'] else 'no'} | {'yes' if r['act_ckpt'] else 'no'} | {r['model']}{' (flex)' if r.get('attention') == 'flex' else ''} |"
        if "error" in r:
            lines.append(f"{head} {r['error']} | | | | | |")
            continue
        ref = dense.get(key(r))
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        gib = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
        ratio = f"{r['step_s'] / ref:.2f}x" if ref else "-"
        lines.append(f"{head} {r['step_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | {mfu} | {gib} | {ratio} | {r['warmup_s']:.0f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="90m,435m,1.4b")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--compile", action="store_true", help="regional torch.compile of each block (as --compile)")
    ap.add_argument("--act-ckpt", action="store_true")
    ap.add_argument("--attention", choices=("sdpa", "flex"), default="sdpa",
                    help="flex: document masks (and the packed Mixture-of-Depths row) as flex-attention block masks")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: checks that every command runs")
    ap.add_argument("--jsonl", type=Path, default=Path("benchmarks/results/speed.jsonl"))
    ap.add_argument("--table", type=Path, help="print the table of the rows in this file and exit")
    args = ap.parse_args()
    if args.table:
        print("\n".join(table(args.table)))
        return
    _, _, device = init_distributed()
    if args.smoke:
        device = torch.device("cpu")
    args.jsonl.parent.mkdir(parents=True, exist_ok=True)
    for preset in args.presets.split(","):
        for model in args.models.split(","):
            try:
                row = measure(preset, model, args, device)
            except torch.OutOfMemoryError:
                row = {"preset": preset, "model": model, "compile": args.compile, "act_ckpt": args.act_ckpt,
                       "error": "out of memory"}
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            with args.jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
