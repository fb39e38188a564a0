"""Planning speed and balance: `plan_mix` on a synthetic manifest, side by side with an
expectation-only mix (MoMa's: documents shuffled and packed in order, balanced only on
average) over the same corpus.

Aims: 10M documents for 1,024 ranks (seq 4096, micro-batch 6) in under 60 s with bounded
memory on 2 cores; every rank-step within 2% of the ratio (the baseline is not). The
baseline's time is printed beside the plan's: the price of the per-rank-step guarantee.
The manifest is synthetic (index.parquet + manifest.json only: planning never opens a
payload). Usage: python benchmarks/bench_mix.py [--docs 10000000] [--out bench-out/mix]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchutil import save
from mmtok.mix import plan_mix, ratio_deviation

VOCAB = {"format": "mmtok-vocab/1", "vocab_size": 65536, "specials": {"<pad>": 0, "<eod>": 1, "<boi>": 2, "<eoi>": 3},
         "n_specials": 16, "text_range": [16, 57344], "image_range": [57344, 65536], "image_tokens_per_image": 1024}


def synthetic_source(d: Path, n: int, kind: str, rng) -> int:
    """Text documents (log-normal lengths, mean ~400) or image-caption pairs (1024 codes +
    markers + a 10-60 token caption)."""
    d.mkdir(parents=True, exist_ok=True)
    if kind == "text":
        n_tok = np.clip(rng.lognormal(5.6, 0.8, n), 8, 20_000).astype(np.int64)
        n_img = np.zeros(n, np.int64)
    else:
        n_img = np.full(n, 1024, np.int64)
        n_tok = n_img + 3 + rng.integers(10, 60, n)
    pq.write_table(pa.table({"n_tokens": n_tok, "n_image": n_img}), d / "index.parquet")
    (d / "manifest.json").write_text(json.dumps({"format": "mmtok-shards/1", "stage": "tokenize",
                                                 "config": {"vocab": VOCAB}, "shards": []}))
    return int(n_tok.sum())


def baseline_deviation(n_tok, n_img, n_mb, C, rho, seed=0) -> float:
    """Expectation-only mixing: shuffle all documents, cut the stream into micro-batches."""
    order = np.random.default_rng(seed).permutation(len(n_tok))
    ends = np.cumsum(n_tok[order])
    mb = np.minimum(ends // C, n_mb)
    img = np.bincount(mb, weights=n_img[order], minlength=n_mb + 1)[:n_mb]
    txt = np.bincount(mb, weights=n_tok[order] - n_img[order], minlength=n_mb + 1)[:n_mb]
    dev = ratio_deviation(txt, img, rho)
    return float(np.percentile(dev[np.isfinite(dev)], 99)), float(dev[np.isfinite(dev)].max())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=10_000_000)
    ap.add_argument("--ranks", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=Path("bench-out/mix"))
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    n_text, n_pair = int(a.docs * 0.7), a.docs - int(a.docs * 0.7)
    tokens = synthetic_source(a.out / "text", n_text, "text", rng) + synthetic_source(a.out / "pairs", n_pair, "pairs", rng)
    seq_len, mb = 4096, 6
    C = seq_len * mb
    steps = max(1, int(tokens * 0.9 // (a.ranks * C)))  # most of one pass over the corpus
    t0 = time.perf_counter()
    plan = plan_mix([a.out / "text", a.out / "pairs"], out=a.out / "plan", ratio=(1, 1), world_size=a.ranks,
                    seq_len=seq_len, micro_batch=mb, steps=steps, seed=0)
    seconds = time.perf_counter() - t0
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    r = plan.report
    n_tok = np.concatenate([pq.read_table(a.out / s / "index.parquet").column("n_tokens").to_numpy() for s in ("text", "pairs")])
    n_img = np.concatenate([pq.read_table(a.out / s / "index.parquet").column("n_image").to_numpy() for s in ("text", "pairs")])
    t0 = time.perf_counter()
    p99, worst = baseline_deviation(n_tok, n_img, a.ranks * steps, C, 1.0)
    base_seconds = time.perf_counter() - t0
    result = {
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {os.cpu_count()} cores, no GPU",
        "date": "2026-11-23", "load_average_1min": round(os.getloadavg()[0], 2),
        "documents": a.docs, "ranks": a.ranks, "steps": steps, "microbatches": r["microbatches"], "corpus_tokens": tokens,
        "plan_seconds": round(seconds, 2), "aim_seconds": 60, "aim_met": seconds <= 60,
        "baseline_seconds": round(base_seconds, 2), "plan_over_baseline_time": round(seconds / base_seconds, 1),
        "peak_rss_gib": round(peak_gib, 2), "pieces": int(len(plan.arrays["piece_doc"])),
        "planned_max_ratio_deviation": r["max_ratio_deviation"], "planned_padding_fraction": r["padding_fraction"],
        "baseline_p99_ratio_deviation": p99, "baseline_max_ratio_deviation": worst,
    }
    save(a.out / "result.json", result)


if __name__ == "__main__":
    main()
