"""bf16 stability of Chameleon's recipe on the small harness (issue #17 item 5).

Trains the same model on the same batches (bench_upcycle's synthetic data and training
loop) in several variants: fp32 with the full recipe (QK-norm + z-loss 1e-5, the trainer's
defaults) as the reference, then bf16 autocast with the recipe, without QK-norm, without
z-loss, without both, and with swin norm added. A second, stress learning rate (10x) is run
for the recipe and for neither, where an instability has a chance to show at this scale.

Per step it records the training cross-entropy (z-loss excluded, so variants compare), the
largest L2 norm of a token's output-logit vector, the largest |log Z| (what z-loss pulls to
0), and a bound on the attention logits: max ||q|| * max ||k|| / sqrt(head_dim) over heads
and tokens, read after QK-norm (rotary keeps norms).

A loss spike is a step t >= WINDOW whose cross-entropy exceeds SPIKE x the median of the
previous WINDOW steps' (WINDOW 20, SPIKE 1.2 by default). The model has no QK-norm off
switch (ModelConfig.qk_norm is rms or chameleon), so "no QK-norm" replaces the q/k norms
with identities here, in the benchmark only.

Usage: python benchmarks/bench_stability.py [--steps 200] [--seeds 2] [--out benchmarks/results/stability]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from bench_upcycle import SIZES, Synthetic, heldout, train
from benchutil import machine, save, t_interval
from mmtok.trainer.config import ModelConfig, TrainConfig
from mmtok.trainer.model import Decoder
from mmtok.vocab import Vocab

# variant -> (precision, QK-norm, z-loss coefficient, swin norm)
VARIANTS = {"fp32 recipe": ("fp32", True, 1e-5, False), "bf16 recipe": ("bf16", True, 1e-5, False),
            "bf16 no QK-norm": ("bf16", False, 1e-5, False), "bf16 no z-loss": ("bf16", True, 0.0, False),
            "bf16 neither": ("bf16", False, 0.0, False), "bf16 recipe + swin": ("bf16", True, 1e-5, True)}
STRESS = ("bf16 recipe", "bf16 neither")  # also run at --stress-lr


def spikes(losses, window: int, factor: float) -> tuple[int, float]:
    """(number of spikes, largest ratio of a step's loss to the median of the `window` before it)."""
    x = np.asarray(losses)
    ratios = [x[t] / np.median(x[t - window:t]) for t in range(window, len(x))]
    return int(sum(r > factor for r in ratios)), float(max(ratios, default=float("nan")))


def run(variant: str, lr: float, seed: int, base: dict, data: Synthetic, args, device) -> dict:
    precision, qk, z, swin = VARIANTS[variant]
    torch.manual_seed(seed)
    model = Decoder(ModelConfig(z_loss=z, swin_norm=swin, **base)).to(device)
    qk_max = []
    for layer in model.layers:
        if not qk:
            layer.attn.q_norm, layer.attn.k_norm = torch.nn.Identity(), torch.nn.Identity()
        for norm in (layer.attn.q_norm, layer.attn.k_norm):  # [B, H, T, hd] after the norm
            norm.register_forward_hook(lambda m, i, o: qk_max.append(float(o.detach().float().norm(dim=-1).max())))
    head_dim = base["d_model"] // base["n_heads"]
    rec = {"variant": variant, "lr": lr, "seed": seed, "ce": [], "logit_norm": [], "logz": [], "attn_bound": []}

    def hook(step, terms, logits):
        lg = logits.float()
        rec["ce"].append(float(terms["ce"]))
        rec["logit_norm"].append(float(lg.norm(dim=-1).max()))
        rec["logz"].append(float(torch.logsumexp(lg, -1).abs().max()))
        # the training forward's q/k maxima (layer by layer: q, k), before the held-out ones
        pairs = np.asarray(qk_max[:2 * len(model.layers)]).reshape(-1, 2)
        rec["attn_bound"].append(float((pairs[:, 0] * pairs[:, 1]).max() / head_dim ** 0.5))
        qk_max.clear()

    t0 = time.perf_counter()
    train(model, data, 0, args.steps, TrainConfig(steps=args.steps, lr=lr), args.batch, device, precision=precision, hook=hook)
    rec["train_s"] = time.perf_counter() - t0
    rec["heldout"] = heldout(model, data, args.batch, device, precision)
    rec["spikes"], rec["max_ratio"] = spikes(rec["ce"], args.window, args.spike)
    rec["finite"] = bool(np.isfinite(rec["ce"]).all())
    print(variant, lr, seed, {k: rec[k] for k in ("spikes", "max_ratio", "heldout", "finite")},
          f"max logit norm {max(rec['logit_norm']):.1f}", flush=True)
    return rec


def table(records: list[dict], args) -> list[str]:
    lines = [f"{args.steps} steps per run; {args.seeds} seeds; spike = a step whose training cross-entropy exceeds "
             f"{args.spike} x the median of the previous {args.window}; mean ± std over seeds (max ratio, norms: "
             "the largest over training, then the mean over seeds).", "",
             "| variant | peak lr | spikes (per seed) | max loss / median | max logit L2 norm | max abs log Z | "
             "max attention-logit bound | held-out text | held-out image |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    keys = sorted({(r["variant"], r["lr"]) for r in records}, key=lambda k: (k[1], list(VARIANTS).index(k[0])))
    for variant, lr in keys:
        rows = [r for r in records if r["variant"] == variant and r["lr"] == lr]

        def ms(values, fmt=".4f"):
            m, sd, _ = t_interval(values)
            return f"{m:{fmt}} ± {sd:{fmt}}"

        lines.append(f"| {variant} | {lr:g} | {', '.join(str(r['spikes']) for r in rows)} | "
                     f"{ms([r['max_ratio'] for r in rows], '.3f')} | {ms([max(r['logit_norm']) for r in rows], '.1f')} | "
                     f"{ms([max(r['logz']) for r in rows], '.2f')} | {ms([max(r['attn_bound']) for r in rows], '.1f')} | "
                     f"{ms([r['heldout']['text'] for r in rows])} | {ms([r['heldout']['image'] for r in rows])} |")
    return lines


def plot(records: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for (variant, lr) in sorted({(r["variant"], r["lr"]) for r in records}, key=lambda k: (k[1], k[0])):
        r = next(r for r in records if r["variant"] == variant and r["lr"] == lr and r["seed"] == 0)
        for ax, key in zip(axes, ("ce", "logit_norm", "attn_bound")):
            ax.plot(r[key], lw=0.8, label=f"{variant} @ {lr:g}")
    for ax, title in zip(axes, ("training cross-entropy", "max output-logit L2 norm", "attention-logit bound")):
        ax.set(xlabel="step", title=title + " (seed 0)")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--model", default="dense", help="dense, or an expert layout for moma (e.g. 4t4i)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--stress-lr", type=float, default=3e-2, help="the second peak LR (0: skip)")
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--spike", type=float, default=1.2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--out", default="benchmarks/results/stability")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    vocab = Vocab.layout(vocab_size=args.vocab, image_codes=args.vocab // 4, image_tokens_per_image=args.seq_len // 2).to_dict()
    data = Synthetic(vocab, args.seq_len)
    model = dict(model="dense") if args.model == "dense" else dict(model="moma", experts=args.model)
    base = dict(vocab_size=args.vocab, image_range=tuple(vocab["image_range"]), max_seq_len=args.seq_len,
                **SIZES[args.size], **model)
    jobs = [(v, args.lr) for v in VARIANTS] + [(v, args.stress_lr) for v in STRESS if args.stress_lr]
    t0, records, out = time.perf_counter(), [], Path(args.out)
    for seed in range(args.seeds):  # written after every seed
        records += [run(v, lr, seed, base, data, args, device) for v, lr in jobs]
        save(out, {"machine": machine(device), "size": args.size, "model": args.model, "steps": args.steps,
                   "window": args.window, "spike": args.spike, "batch": args.batch, "seq_len": args.seq_len,
                   "variants": VARIANTS, "seconds": time.perf_counter() - t0, "records": records}, table(records, args))
        plot(records, out)


if __name__ == "__main__":
    main()
