"""Training-step time of the Uni-MoE decoder (top-2 over LoRA experts on the shared FFN)
against the dense decoder of the same width, side by side on the same token batches.

Variants (same layers, width, FFN, sequence, batch):
  dense                   `--model dense`: every parameter trains
  uni-moe tune            stage 3: top-2 routing over E LoRA experts; router + LoRA train,
                          the shared decoder weights are frozen (as in `--stage tune`)
  uni-moe tune, all train the same forward with every parameter training (isolates the
                          cost of routing + LoRA from the savings of freezing)
Encoders and connectors are left out: they run once per sample, not per token, and their
size is the user's choice; the per-token cost is the decoder's.

Each top-2 token runs the shared FFN once per chosen expert (LoRA experts are not merged
while training), so the FFN costs about twice dense; the LoRA products add 2 * rank / d.

CPU: python benchmarks/bench_unimoe_step.py
GPU: python benchmarks/bench_unimoe_step.py --device cuda --d-model 1024 --layers 8 --seq-len 2048 --batch 4
Writes JSON and a markdown table to --out.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from benchutil import save
from mmtok.trainer.model import Decoder, loss_terms
from mmtok.trainer.unimoe import UniMoE, UniMoEConfig


def make_batch(cfg: UniMoEConfig, b: int, t: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(16, cfg.image_range[0], (b, t), generator=g)
    return {"input_ids": ids.to(device), "targets": torch.roll(ids, -1, 1).to(device),
            "doc_ids": torch.ones(b, t, dtype=torch.int32, device=device),
            "positions": torch.arange(t, dtype=torch.int32).repeat(b, 1).to(device),
            "span": torch.zeros(b, dtype=torch.long, device=device),
            # mixed modalities: samples spread over the experts' modalities
            "sample_modality": torch.arange(b, device=device) % len(cfg.modalities)}


def step_fn(name: str, cfg: UniMoEConfig, batch: dict, device):
    dcfg = cfg.decoder_config()
    torch.manual_seed(0)
    if name == "dense":
        model = Decoder(dcfg).to(device)
        forward = lambda: model(batch["input_ids"], batch["positions"], batch["doc_ids"])  # noqa: E731
    else:
        model = UniMoE(cfg).to(device)
        model.set_stage("tune")
        for ffn in model.ffns:  # trained-looking experts, so routing is not trivially uniform
            for b in ffn.lora_b.values():
                torch.nn.init.normal_(b, std=0.02)
        if name.endswith("all train"):
            for p in model.parameters():
                p.requires_grad_(True)
        forward = lambda: model(batch)  # noqa: E731
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)

    def step():
        logits, stats = forward()
        loss_terms(dcfg, logits, batch["targets"], stats)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results/unimoe_step")
    args = ap.parse_args()
    device = torch.device(args.device)
    d = args.d_model
    cfg = UniMoEConfig(vocab_size=8192, image_range=(8000, 8192), n_layers=args.layers, d_model=d, n_heads=max(1, d // 64),
                       ffn_hidden=4 * d, max_seq_len=args.seq_len, connector_layers=1, enc_layers=1)
    batch = make_batch(cfg, args.batch, args.seq_len, device)
    variants = ["dense", "uni-moe tune", "uni-moe tune, all train"]
    fns = {v: step_fn(v, cfg, batch, device) for v in variants}
    times = {v: [] for v in variants}
    for v in variants:  # warm-up
        fns[v][0]()
    for _ in range(args.steps):  # interleaved, so drifts in machine load hit every variant alike
        for v in variants:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fns[v][0]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[v].append(time.perf_counter() - t0)
    med = {v: sorted(ts)[len(ts) // 2] for v, ts in times.items()}
    rows = [{"variant": v, "median_step_s": med[v], "vs_dense": med[v] / med["dense"], "trainable_params": fns[v][1],
             "tokens_per_s": args.batch * args.seq_len / med[v]} for v in variants]
    result = {"benchmark": "unimoe_step", "device": str(device), "machine": platform.machine(),
              "threads": torch.get_num_threads(), "experts": len(cfg.modalities), "lora_rank": cfg.lora_rank,
              "capacity_factor": cfg.capacity_factor, **{k: v for k, v in vars(args).items() if k != "out"}, "rows": rows}
    lines = [f"d_model {d}, {args.layers} layers, seq {args.seq_len} x batch {args.batch}, {len(cfg.modalities)} LoRA "
             f"experts (rank {cfg.lora_rank}), top-2, capacity factor {cfg.capacity_factor}, {device}", "",
             "| variant | median step (s) | vs dense | trainable params | tokens/s |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['variant']} | {r['median_step_s']:.4f} | {r['vs_dense']:.2f}x | {r['trainable_params']:,} | "
              f"{r['tokens_per_s']:.0f} |" for r in rows]
    save(args.out, result, lines)


if __name__ == "__main__":
    main()
