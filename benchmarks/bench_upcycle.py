"""Small-scale upcycling comparison (MoMa section 4.4): train 1t1i for S1 steps, upcycle to
4t4i (experts copy the FFN, fresh routers, Gumbel-sigmoid router noise, schedule
restarted, data continuing) and train S2 more steps; against 4t4i from scratch for S1 + S2
steps on the same batches. With expert choice at capacity factor 1, 1t1i and 4t4i cost the
same FLOPs per token, so both arms spend equal training FLOPs. Reports held-out loss by
modality.

The data is synthetic but learnable: text follows a sparse random bigram table, image
codes a smooth walk over the code range; documents are `text <boi> codes <eoi> <eod>`.

CPU: python benchmarks/bench_upcycle.py
GPU: python benchmarks/bench_upcycle.py --device cuda --preset 90m --s1 2000 --s2 1000 --batch 16 --seq-len 1024
Writes JSON and a markdown table to --out.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchutil import machine, save
from mmtok.trainer.config import PRESETS, ModelConfig, TrainConfig
from mmtok.trainer.model import Decoder, loss_terms
from mmtok.trainer.upcycle import upcycle_weights
from mmtok.trainer.train import build_optimizer, lr_at
from mmtok.vocab import Vocab


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


def train(model: Decoder, data: Synthetic, first: int, steps: int, tc: TrainConfig, b: int, device) -> None:
    """Steps on batches first..first+steps-1 with a fresh optimizer and schedule."""
    opt = build_optimizer(model, tc)
    model.train()
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc)
        batch = data.batch(first + step, b, device)
        with amp:
            logits, stats = model(batch["input_ids"], batch["positions"], batch["doc_ids"])
            loss = loss_terms(model.cfg, logits, batch["targets"], stats)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)


@torch.no_grad()
def heldout(model: Decoder, data: Synthetic, b: int, device) -> dict:
    model.eval()
    sums = {"text": 0.0, "image": 0.0}
    counts = dict.fromkeys(sums, 0)
    for i in range(8):
        batch = data.batch(10_000_000 + i, b, device)
        logits, _ = model(batch["input_ids"], batch["positions"], batch["doc_ids"])
        t = batch["targets"]
        valid = t != -100
        nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), t.clamp(min=0), reduction="none")
        image = valid & model.is_image(t)
        for name, mask in (("text", valid & ~image), ("image", image)):
            sums[name] += float(nll[mask].sum())
            counts[name] += int(mask.sum())
    return {k: sums[k] / counts[k] for k in sums}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default=None, help="a trainer preset; default: 4 layers, d 128 (CPU)")
    ap.add_argument("--experts", default="4t4i")
    ap.add_argument("--s1", type=int, default=150, help="1t1i steps before upcycling")
    ap.add_argument("--s2", type=int, default=100, help="steps after upcycling")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", default="benchmarks/results/upcycle")
    args = ap.parse_args()
    device = torch.device(args.device)
    size = PRESETS[args.preset] if args.preset else dict(n_layers=4, d_model=128, n_heads=4, ffn_hidden=512)
    vocab = Vocab.layout(vocab_size=args.vocab, image_codes=args.vocab // 4, image_tokens_per_image=args.seq_len // 2).to_dict()
    data = Synthetic(vocab, args.seq_len)
    base = dict(vocab_size=args.vocab, image_range=tuple(vocab["image_range"]), max_seq_len=args.seq_len, **size)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    parent = Decoder(ModelConfig(model="moma", experts="1t1i", **base)).to(device)
    train(parent, data, 0, args.s1, TrainConfig(steps=args.s1, lr=args.lr), args.batch, device)
    at_s1 = heldout(parent, data, args.batch, device)
    torch.manual_seed(1)
    up = Decoder(ModelConfig(model="moma", experts=args.experts, router_noise="gumbel", **base)).to(device)
    upcycle_weights(parent, up, from_dense=False)
    train(up, data, args.s1, args.s2, TrainConfig(steps=args.s2, lr=args.lr), args.batch, device)
    torch.manual_seed(0)
    scratch = Decoder(ModelConfig(model="moma", experts=args.experts, **base)).to(device)
    total = args.s1 + args.s2
    train(scratch, data, 0, total, TrainConfig(steps=total, lr=args.lr), args.batch, device)
    rows = [{"arm": f"1t1i after {args.s1} steps (parent)", **at_s1},
            {"arm": f"{args.experts} upcycled: 1t1i {args.s1} + {args.s2} steps", **heldout(up, data, args.batch, device)},
            {"arm": f"{args.experts} from scratch: {total} steps", **heldout(scratch, data, args.batch, device)}]
    result = {"machine": machine(device),
              "size": size, "batch": args.batch, "seq_len": args.seq_len, "vocab": args.vocab, "rows": rows,
              "seconds": time.perf_counter() - t0}
    lines = ["| arm (equal training FLOPs for the last two) | held-out text loss | held-out image loss |", "| --- | --- | --- |"]
    lines += [f"| {r['arm']} | {r['text']:.4f} | {r['image']:.4f} |" for r in rows]
    save(args.out, result, lines)


if __name__ == "__main__":
    main()
