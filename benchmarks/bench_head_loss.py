"""Peak memory and time of the output head + loss, forward and backward: full logits with
the plain loss (`loss_terms` on logits) against the fused chunked head
(`trainer/kernels.linear_cross_entropy`), side by side, each in a fresh process (peak RSS
above what the process held before the step).

python benchmarks/bench_head_loss.py --tokens 4096 --d-model 512 --vocab 32768
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from benchutil import machine, save


def one(variant: str, tokens: int, d: int, vocab: int) -> dict:
    from mmtok.trainer.config import ModelConfig
    from mmtok.trainer.kernels import linear_cross_entropy
    from mmtok.trainer.model import loss_terms

    cfg = ModelConfig(vocab_size=vocab, image_range=(vocab // 2, vocab))
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, d, generator=g, requires_grad=True)
    w = (torch.randn(vocab, d, generator=g) * 0.02).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if variant == "full logits":
        loss = loss_terms(cfg, h @ w.T, targets, [])["loss"]
    else:
        loss = linear_cross_entropy(h, w, targets, cfg.z_loss)[0]
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB
    return {"variant": variant, "peak_mib": peak / 1024, "seconds": seconds, "loss": float(loss)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--out", default="benchmarks/results/head_loss")
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # the child process's job
    a = ap.parse_args()
    if a.variant:
        print(json.dumps(one(a.variant, a.tokens, a.d_model, a.vocab)))
        return
    rows = []
    for variant in ("full logits", "fused chunked"):
        res = subprocess.run([sys.executable, __file__, "--variant", variant, "--tokens", str(a.tokens), "--d-model",
                              str(a.d_model), "--vocab", str(a.vocab)], check=True, capture_output=True, text=True)
        rows.append(json.loads(res.stdout.splitlines()[-1]))
    logits_mib = a.tokens * a.vocab * 4 / 2**20
    lines = [f"tokens {a.tokens}, d {a.d_model}, vocab {a.vocab} (fp32 logits {logits_mib:.0f} MiB)", "",
             "| head + loss | peak MiB above inputs | s (fwd+bwd) | loss |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['variant']} | {r['peak_mib']:.0f} | {r['seconds']:.2f} | {r['loss']:.4f} |" for r in rows]
    lines.append(f"\nfull / fused peak: {rows[0]['peak_mib'] / max(rows[1]['peak_mib'], 1):.1f}x")
    save(a.out, {"machine": machine(torch.device("cpu")), "tokens": a.tokens, "d_model": a.d_model, "vocab": a.vocab,
                 "rows": rows}, lines)


if __name__ == "__main__":
    main()
