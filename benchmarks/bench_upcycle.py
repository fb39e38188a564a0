"""Small-scale upcycling comparison (MoMa section 4.4, issue #17 item 4). Per init seed:
train 1t1i for S1 steps (the parent), then S2 more steps in several arms that all start
from that parent with a fresh optimizer and a restarted schedule (warm-up + cosine) and
see the same batches S1..S1+S2-1:

- `up-gumbel`   upcycled to NtMi as `mmtok upcycle` does (experts copy the FFN, routers the
                parent's router plus a 1% random part), Gumbel-sigmoid router noise
- `up-none`     the same without router noise
- `up-fresh-router` / `up-fresh-gumbel`: upcycled with fresh routers (mmtok before the fix),
                without / with noise
- `continued`   the parent itself, trained on with the same LR restart
- `scratch`     NtMi from scratch for S1 + S2 steps, one schedule
- diagnostics: `up-gumbel-lr0.3` / `continued-lr0.3` (the restart at 0.3x the peak LR) and
  `up-gumbel-cf2` (capacity factor 2: each token can reach two experts; 2x the FFN FLOPs,
  so not FLOPs-matched, only a test of whether dropped tokens explain a loss)

With expert choice at capacity factor 1, 1t1i and NtMi cost the same FLOPs per token, so
every arm but `up-gumbel-cf2` spends the same total training FLOPs (S1 + S2 steps). Each
arm's held-out loss is also taken right after the switch (step 0 of S2): the upcycling
shock, what the switch costs before any training.
Comparisons are paired (each arm minus `continued` within a seed, then mean and 95%
t-interval over seeds), since every arm of a seed shares its parent.

The data is synthetic but learnable: text follows a sparse random bigram table, image
codes a smooth walk over the code range; documents are `text <boi> codes <eoi> <eod>`.

CPU: python benchmarks/bench_upcycle.py --seeds 3
The audit's setting (4 layers, d 128, S1 150, S2 100):
     python benchmarks/bench_upcycle.py --size audit --s1 150 --s2 100 --arms up-gumbel continued
GPU: python benchmarks/bench_upcycle.py --device cuda --size 90m --s1 2000 --s2 1000 --batch 16 --seq-len 1024
Writes JSON, a markdown table and a plot (PNG) to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time

import numpy as np
import torch

from benchutil import machine, save, t_interval
from mmtok.trainer.config import PRESETS, ModelConfig, TrainConfig
from mmtok.trainer.model import Decoder, loss_terms
from mmtok.trainer.upcycle import upcycle_weights
from mmtok.trainer.train import build_optimizer, lr_at
from mmtok.vocab import Vocab

SIZES = {**PRESETS, "audit": dict(n_layers=4, d_model=128, n_heads=4, ffn_hidden=512)}  # audit: the earlier default
# arm -> how it starts ("up": upcycled parent, "cont": the parent, "scratch") and its options
ARMS = {"up-gumbel": dict(start="up", noise="gumbel"), "up-none": dict(start="up", noise="none"),
        "continued": dict(start="cont"), "scratch": dict(start="scratch"),
        "up-gumbel-lr0.3": dict(start="up", noise="gumbel", lr_scale=0.3),
        "continued-lr0.3": dict(start="cont", lr_scale=0.3),
        "up-gumbel-cf2": dict(start="up", noise="gumbel", capacity=2.0),
        # the upcycle before it took the parent's router (routers started fresh)
        "up-fresh-router": dict(start="up", noise="none", router="fresh"),
        "up-fresh-gumbel": dict(start="up", noise="gumbel", router="fresh")}
KINDS = ("text", "image")


class Synthetic:
    def __init__(self, vocab: dict, seq_len: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.v, self.seq_len = vocab, seq_len
        lo, hi = vocab["text_range"]
        self.next_text = rng.integers(lo, hi, size=(hi - lo, 4))  # each piece has 4 likely successors
        self.n_codes = vocab["image_tokens_per_image"]

    def doc(self, rng) -> np.ndarray:
        s = self.v["specials"]
        (tlo, thi), (ilo, ihi) = self.v["text_range"], self.v["image_range"]
        text = [rng.integers(tlo, thi)]
        for _ in range(self.seq_len - self.n_codes - 4):
            text.append(self.next_text[text[-1] - tlo, rng.integers(4)])
        codes = (rng.integers(ihi - ilo) + np.cumsum(rng.integers(-2, 3, self.n_codes))) % (ihi - ilo) + ilo
        return np.concatenate([text, [s["<boi>"]], codes, [s["<eoi>"], s["<eod>"]]])

    def batch(self, index: int, b: int, device) -> dict:
        rng = np.random.default_rng(1_000_003 * (index + 1))
        ids = torch.as_tensor(np.stack([self.doc(rng) for _ in range(b)]), dtype=torch.long)
        targets = torch.roll(ids, -1, 1)
        targets[:, -1] = -100
        t = ids.shape[1]
        return {"input_ids": ids.to(device), "targets": targets.to(device), "doc_ids": torch.ones_like(ids, dtype=torch.int32).to(device),
                "positions": torch.arange(t, dtype=torch.int32).repeat(b, 1).to(device)}


def autocast(device, precision: str):
    """bf16 autocast on CPU or GPU (fp32 master weights), or nothing. (The trainer's own
    `mixed_precision = "bf16"` casts the parameters to bf16 through FSDP2 instead.)"""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(model: Decoder, data: Synthetic, first: int, steps: int, tc: TrainConfig, b: int, device,
          precision: str = "fp32", hook=None) -> None:
    """Steps on batches first..first+steps-1 with a fresh optimizer and schedule. `hook(step,
    terms, logits)` runs after each step (step counted from 1) with the loss terms and logits."""
    opt = build_optimizer(model, tc)
    model.train()
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc)
        batch = data.batch(first + step, b, device)
        with autocast(device, precision):
            logits, stats = model(batch["input_ids"], batch["positions"], batch["doc_ids"])
            terms = loss_terms(model.cfg, logits, batch["targets"], stats)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if hook is not None:
            hook(step + 1, terms, logits.detach())


@torch.no_grad()
def heldout(model: Decoder, data: Synthetic, b: int, device, precision: str = "fp32") -> dict:
    was_training = model.training
    model.eval()
    sums = {"text": 0.0, "image": 0.0}
    counts = dict.fromkeys(sums, 0)
    for i in range(8):
        batch = data.batch(10_000_000 + i, b, device)
        with autocast(device, precision):
            logits, _ = model(batch["input_ids"], batch["positions"], batch["doc_ids"])
        t = batch["targets"]
        valid = t != -100
        nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), t.clamp(min=0), reduction="none")
        image = valid & model.is_image(t)
        for name, mask in (("text", valid & ~image), ("image", image)):
            sums[name] += float(nll[mask].sum())
            counts[name] += int(mask.sum())
    model.train(was_training)
    return {k: sums[k] / counts[k] for k in sums}


def eval_points(steps: int, n: int) -> set[int]:
    return {round(steps * (i + 1) / n) for i in range(n)}


def train_curve(model, data, first, steps, tc, b, device, n_evals: int, offset: int = 0) -> list[dict]:
    """train(), scoring held-out data at n_evals points; steps in the curve count from the
    start of the whole run (`offset` = steps before this phase), so every arm is on one axis."""
    points, curve = eval_points(steps, n_evals), []

    def hook(step, terms, logits):
        if step in points:
            curve.append({"step": offset + step, **heldout(model, data, b, device)})

    train(model, data, first, steps, tc, b, device, hook=hook)
    return curve


def run_seed(seed: int, arms: list[str], base: dict, args, data: Synthetic, device) -> dict:
    """The parent and every arm for one init seed: {"parent": curve, arm: {"shock", "curve"}}."""
    torch.manual_seed(seed)
    parent = Decoder(ModelConfig(model="moma", experts="1t1i", **base)).to(device)
    tc1 = TrainConfig(steps=args.s1, lr=args.lr)
    out = {"seed": seed, "parent": train_curve(parent, data, 0, args.s1, tc1, args.batch, device, args.evals * 2)}
    for name in arms:
        arm = ARMS[name]
        tc = TrainConfig(steps=args.s2, lr=args.lr * arm.get("lr_scale", 1.0))
        t0 = time.perf_counter()
        if arm["start"] == "scratch":
            torch.manual_seed(seed)  # the parent's init seed: only the architecture differs
            model = Decoder(ModelConfig(model="moma", experts=args.experts, **base)).to(device)
            total = args.s1 + args.s2
            rec = {"curve": train_curve(model, data, 0, total, TrainConfig(steps=total, lr=args.lr), args.batch, device,
                                        args.evals * 2)}
        else:
            if arm["start"] == "up":
                torch.manual_seed(1000 + seed)  # the fresh routers' init
                model = Decoder(ModelConfig(model="moma", experts=args.experts, router_noise=arm["noise"],
                                            capacity_factor=arm.get("capacity", 1.0), **base)).to(device)
                upcycle_weights(parent, model, from_dense=False,
                                **({"router_spread": None} if arm.get("router") == "fresh" else {}))
            else:
                model = copy.deepcopy(parent)
            rec = {"shock": heldout(model, data, args.batch, device)}
            rec["curve"] = train_curve(model, data, args.s1, args.s2, tc, args.batch, device, args.evals, offset=args.s1)
        rec["seconds"] = time.perf_counter() - t0
        out[name] = rec
        print(seed, name, {k: round(v, 4) for k, v in rec["curve"][-1].items() if k in KINDS}, flush=True)
    return out


def table(runs: list[dict], arms: list[str], args) -> list[str]:
    """Final held-out loss per arm (mean ± std over seeds) and the paired gap to `continued`."""
    def final(r, name):
        return r[name]["curve"][-1]

    ref = "continued" if "continued" in arms else None
    total = args.s1 + args.s2
    lines = [f"Held-out loss (nats/token) after {total} steps in all ({args.s1} of 1t1i parent + {args.s2}); "
             f"{len(runs)} seeds, mean ± std; gap = arm − continued, paired by seed, mean ± 95% t half-width "
             "(negative: better than continuing the parent). shock = held-out loss right after the switch, "
             "before any S2 step.", "",
             "| arm | text | image | gap text | gap image | shock text | shock image |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    parent = [r["parent"][-1] for r in runs]
    cells = [f"{t_interval([p[k] for p in parent])[0]:.4f} ± {t_interval([p[k] for p in parent])[1]:.4f}" for k in KINDS]
    lines.append(f"| 1t1i parent at {args.s1} | " + " | ".join(cells) + " | – | – | – | – |")
    for name in arms:
        cells = []
        for k in KINDS:
            m, sd, _ = t_interval([final(r, name)[k] for r in runs])
            cells.append(f"{m:.4f} ± {sd:.4f}")
        for k in KINDS:
            if ref is None or name == ref:
                cells.append("–")
                continue
            g, _, hw = t_interval([final(r, name)[k] - final(r, ref)[k] for r in runs])
            cells.append(f"{g:+.4f} ± {hw:.4f}")
        for k in KINDS:
            cells.append(f"{np.mean([r[name]['shock'][k] for r in runs]):.4f}" if "shock" in runs[0][name] else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    flat = [{k: p[-1][k] - p[len(p) * 3 // 4 - 1][k] for k in KINDS} for p in (r["parent"] for r in runs)]
    lines += ["", f"Parent flattening: held-out loss change over its last quarter ({args.s1 * 3 // 4} -> {args.s1} steps), "
              f"seed mean: text {np.mean([f['text'] for f in flat]):+.4f}, image {np.mean([f['image'] for f in flat]):+.4f}."]
    return lines


def plot(runs: list[dict], arms: list[str], out, args) -> None:
    """Held-out loss against training steps (= training FLOPs, equal per step), seed mean."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, kind in zip(axes, KINDS):
        for name in ["parent"] + arms:
            curves = [r[name] if name == "parent" else r[name]["curve"] for r in runs]
            x = [c["step"] for c in curves[0]]
            y = np.mean([[c[kind] for c in curve] for curve in curves], axis=0)
            ax.plot(x, y, marker="o", ms=3, label=name)
        ax.axvline(args.s1, color="grey", lw=0.8, ls=":")
        ax.set(xlabel="training steps (equal FLOPs per step)", ylabel="held-out loss (nats/token)", title=kind)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


def main() -> None:
    from pathlib import Path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny", help="model size (audit: the earlier 4-layer default)")
    ap.add_argument("--experts", default="4t4i")
    ap.add_argument("--s1", type=int, default=400, help="1t1i steps before upcycling")
    ap.add_argument("--s2", type=int, default=200, help="steps after upcycling")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    ap.add_argument("--evals", type=int, default=4, help="held-out evaluations per phase (the parent's and scratch's: 2x)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--out", default="benchmarks/results/upcycle")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    vocab = Vocab.layout(vocab_size=args.vocab, image_codes=args.vocab // 4, image_tokens_per_image=args.seq_len // 2).to_dict()
    data = Synthetic(vocab, args.seq_len)
    base = dict(vocab_size=args.vocab, image_range=tuple(vocab["image_range"]), max_seq_len=args.seq_len, **SIZES[args.size])
    t0, runs, out = time.perf_counter(), [], Path(args.out)
    for seed in range(args.seeds):  # written after every seed: a run cut short still reports
        runs.append(run_seed(seed, args.arms, base, args, data, device))
        result = {"machine": machine(device), "size": args.size, "model": SIZES[args.size], "experts": args.experts,
                  "s1": args.s1, "s2": args.s2, "batch": args.batch, "seq_len": args.seq_len, "vocab": args.vocab,
                  "lr": args.lr, "arms": {a: ARMS[a] for a in args.arms}, "runs": runs, "seconds": time.perf_counter() - t0}
        save(out, result, table(runs, args.arms, args))
        plot(runs, args.arms, out, args)


if __name__ == "__main__":
    main()
