"""PlanLoader throughput against what the trainer consumes, side by side on one corpus.

The loader (0 and 2 worker processes) reads a balanced plan over real token shards; the
"consumer" is one training step (forward, backward, AdamW) of the trainer's model
(`--preset tiny`, `--model moma --experts 4t4i`, the demo's size) on the same batches.
Aim: the loader is never the bottleneck, at least 5x the step's tokens/s.
Usage: python benchmarks/bench_loader.py [--steps 30] [--out bench-out/loader]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from benchutil import save  # noqa: E402
from helpers.tokens import make_doc, make_token_shards, make_vocab  # noqa: E402  (the tests' shard writer)

from mmtok.loader import PlanLoader  # noqa: E402
from mmtok.mix import plan_mix, write_plan  # noqa: E402
from mmtok.trainer.config import PRESETS, ModelConfig  # noqa: E402
from mmtok.trainer.model import Decoder, loss_terms  # noqa: E402


def tokens_per_second(batches, work=None) -> float:
    n, t0 = 0, time.perf_counter()
    for b in batches:
        if work:
            work(b)
        n += b["input_ids"].numel()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("bench-out/loader"))
    a = ap.parse_args()
    torch.set_num_threads(2)
    vocab = make_vocab(image_tokens_per_image=64, n_text=4000, n_image=1024)
    rng = np.random.default_rng(0)
    text = [make_doc(rng, vocab, [int(rng.integers(20, 800))]) for _ in range(3000)]
    pairs = [make_doc(rng, vocab, ["img", int(rng.integers(5, 40))]) for _ in range(3000)]
    a.out.mkdir(parents=True, exist_ok=True)
    dirs = [make_token_shards(a.out, text, vocab, "text", max_count=500),
            make_token_shards(a.out, pairs, vocab, "pairs", max_count=500)]
    plan_dir = a.out / "plan"
    write_plan(plan_mix(dirs, out=plan_dir, ratio=(1, 1), world_size=1, seq_len=a.seq_len, micro_batch=a.micro_batch,
                        steps=a.steps, seed=0), plan_dir)

    loader_tps = {w: tokens_per_second(PlanLoader(plan_dir, num_workers=w)) for w in (0, 2)}
    cfg = ModelConfig(model="moma", experts="4t4i", vocab_size=vocab["vocab_size"], image_range=tuple(vocab["image_range"]),
                      max_seq_len=a.seq_len, **PRESETS["tiny"])
    model = Decoder(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(b):
        logits, stats = model(b["input_ids"], b["positions"], b["doc_ids"])
        loss_terms(cfg, logits, b["targets"], stats)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    batches = list(PlanLoader(plan_dir))  # the step alone, without reading
    step(batches[0])  # warm-up
    step_tps = tokens_per_second(batches[1:], step)
    result = {
        "machine": f"{platform.machine()}, 2 cores, no GPU", "date": "2026-11-23",
        "seq_len": a.seq_len, "micro_batch": a.micro_batch, "steps": a.steps, "model": "moma 4t4i, preset tiny",
        "loader_tokens_per_s_0_workers": round(loader_tps[0]), "loader_tokens_per_s_2_workers": round(loader_tps[2]),
        "train_step_tokens_per_s": round(step_tps),
        "ratio_loader_over_step": round(loader_tps[0] / step_tps, 1),
    }
    save(a.out / "result.json", result)


if __name__ == "__main__":
    main()
