"""The real trainer on a GPU: `mmtok balance-mix` then `mmtok train --nproc 1` (torchrun,
FSDP2, NCCL, bf16) at MoMa's preset sizes, dense against MoMa 4t4i, from synthetic token
shards in Chameleon's layout (65,536 ids, 8,192 image codes, 1,024 codes per image).

Reports the trainer's own metrics (tokens/s, MFU from active parameters, peak memory),
averaged over the logged intervals after the first. Usage (on a GPU machine):

    python benchmarks/bench_train_gpu.py --presets 90m,435m --steps 30 --out bench-out/train-gpu
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from benchutil import save  # noqa: E402
from helpers.tokens import make_doc, make_token_shards  # noqa: E402  (the test suite's token-shard writer)


def chameleon_vocab() -> dict:
    n_specials, image = 16, 8192
    return {"format": "mmtok-vocab/1", "vocab_size": 65536, "n_specials": n_specials,
            "specials": {"<pad>": 0, "<eod>": 1, "<boi>": 2, "<eoi>": 3, "<bos>": 4},
            "text_range": [n_specials, 65536 - image], "image_range": [65536 - image, 65536],
            "image_tokens_per_image": 1024, "sp_model": "bpe.model"}


def mmtok(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "mmtok.cli.app", *args], check=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="90m,435m")
    ap.add_argument("--models", default="dense,moma:4t4i")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--docs", type=int, default=3000)
    ap.add_argument("--extra", default="", help="extra `mmtok train` options, e.g. '--compile'")
    ap.add_argument("--out", type=Path, default=Path("bench-out/train-gpu"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    vocab, rng = chameleon_vocab(), np.random.default_rng(0)
    docs = [make_doc(rng, vocab, [int(rng.integers(10, 60)), "img"] if i % 2 else [int(rng.integers(300, 3000))])
            for i in range(a.docs)]
    tokens = make_token_shards(a.out, docs, vocab, name="tokens", max_count=500)
    plan = a.out / "plan"
    mmtok("balance-mix", str(tokens), "--out", str(plan), "--world-size", "1", "--ratio", "1:1", "--seq-len",
          str(a.seq_len), "--micro-batch", str(a.micro_batch), "--steps", str(a.steps), "--json")
    rows = []
    for preset in a.presets.split(","):
        for spec in a.models.split(","):
            model, _, experts = spec.partition(":")
            run = a.out / f"run-{preset}-{model}{experts}"
            t0 = time.perf_counter()
            mmtok("train", "--plan", str(plan), "--out", str(run), "--model", model, *(["--experts", experts] if experts else []),
                  "--preset", preset, "--steps", str(a.steps), "--log-every", "5", "--ckpt-every", str(10 * a.steps),
                  "--nproc", "1", "--warmup", "5", "--lr", "3e-4", *a.extra.split())
            recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
            timed = recs[1:] or recs
            rows.append({"preset": preset, "model": spec, "tokens_per_s": float(np.mean([r["tokens_per_s"] for r in timed])),
                         "mfu": float(np.mean([r.get("mfu") or 0 for r in timed])),
                         "memory_gb": max(r.get("memory_gb", 0) for r in recs), "final_loss": recs[-1]["loss"],
                         "wall_s": round(time.perf_counter() - t0, 1)})
            print(json.dumps(rows[-1]), flush=True)
    import torch

    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "seq_len": a.seq_len, "micro_batch": a.micro_batch, "steps": a.steps, "extra": a.extra, "rows": rows}
    lines = ["| preset | model | tokens/s | MFU | peak memory GiB | loss after run |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['preset']} | {r['model']} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {r['memory_gb']:.1f} | "
              f"{r['final_loss']:.3f} |" for r in rows]
    save(a.out / "result", result, lines)


if __name__ == "__main__":
    main()
