"""Decode speed of `mmtok generate`'s sampler with the KV cache against without it (every
step recomputing the whole sequence), same model, prompt and seed, causal routing. Both
must sample the same tokens (checked here too).

CPU: python benchmarks/bench_decode.py
GPU: python benchmarks/bench_decode.py --device cuda --preset 90m --new-tokens 512
Writes JSON and a markdown table to --out.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchutil import machine, save
from mmtok.trainer.config import PRESETS, ModelConfig
from mmtok.trainer.generate import Sampling, generate
from mmtok.trainer.model import Decoder
from mmtok.vocab import Vocab


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default=None, help="a trainer preset; default: 4 layers, d 128 (CPU)")
    ap.add_argument("--model", default="moma", help="dense, moma or mod-moma")
    ap.add_argument("--experts", default="4t4i")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=192)
    ap.add_argument("--out", default="benchmarks/results/decode")
    args = ap.parse_args()
    device = torch.device(args.device)
    size = PRESETS[args.preset] if args.preset else dict(n_layers=4, d_model=128, n_heads=4, ffn_hidden=512)
    vocab = Vocab.layout(vocab_size=args.vocab, image_codes=args.vocab // 8, image_tokens_per_image=64).to_dict()
    cfg = ModelConfig(model=args.model, experts="" if args.model == "dense" else args.experts, vocab_size=args.vocab,
                      image_range=tuple(vocab["image_range"]), max_seq_len=args.prompt_tokens + args.new_tokens, **size)
    torch.manual_seed(0)
    model = Decoder(cfg).to(device).eval()
    prompt = np.random.default_rng(0).integers(*vocab["text_range"], size=args.prompt_tokens)
    # eod stays possible but rare with random weights; a fixed seed makes both runs sample the same tokens
    s = Sampling(max_tokens=args.new_tokens, seed=0)
    generate(model, prompt[:4], vocab, Sampling(max_tokens=4), True)  # warm-up
    rows, outs = [], {}
    for name, cache in (("KV cache", True), ("no cache (recompute)", False)):
        t0 = time.perf_counter()
        outs[name] = generate(model, prompt, vocab, s, cache)
        if device.type == "cuda":
            torch.cuda.synchronize()
        sec = time.perf_counter() - t0
        rows.append({"mode": name, "new_tokens": len(outs[name]), "seconds": sec, "tokens_per_s": len(outs[name]) / sec})
    assert np.array_equal(*outs.values()), "the KV cache changed the sampled tokens"
    speedup = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    result = {"machine": machine(device),
              "model": f"{args.model} {cfg.experts}", "size": size, "prompt_tokens": args.prompt_tokens,
              "rows": rows, "speedup": speedup}
    lines = ["| mode | new tokens | seconds | tokens/s |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['mode']} | {r['new_tokens']} | {r['seconds']:.2f} | {r['tokens_per_s']:.1f} |" for r in rows]
    lines.append(f"\nKV cache speed-up: {speedup:.2f}x")
    save(args.out, result, lines)


if __name__ == "__main__":
    main()
