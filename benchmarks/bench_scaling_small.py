"""A small-scale look at MoMa's ordering: dense vs moma 1t1i vs moma 4t4i trained on the
same plan for the same steps (equal training FLOPs: expert choice at capacity factor 1
gives every model the same active FLOPs per token), then held-out loss by modality.

MoMa reports 4t4i < 1t1i < dense in held-out loss, with the larger gain on image tokens.
With `--data` it uses your token shards (e.g. the demo's); without, it writes a synthetic
corpus whose text and image tokens follow different rules (so modality experts can help).

Usage: python benchmarks/bench_scaling_small.py [--steps 150] [--data DIR ...] [--out benchmarks/results/scaling]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from benchutil import save  # noqa: E402
from conftest import make_token_shards, make_vocab  # noqa: E402  (the tests' shard writer)

from mmtok.loader import PlanLoader  # noqa: E402
from mmtok.mix import plan_mix, write_plan  # noqa: E402
from mmtok.trainer.config import resolve  # noqa: E402
from mmtok.trainer.evaluate import evaluate  # noqa: E402
from mmtok.trainer.train import train  # noqa: E402

VARIANTS = [("dense", {"model": "dense"}), ("moma 1t1i", {"model": "moma", "experts": "1t1i"}),
            ("moma 4t4i", {"model": "moma", "experts": "4t4i"})]


def synthetic_corpus(root: Path, n_docs: int, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """Text: a sparse random bigram language. Images: 8x8 code grids of smooth gradients
    (a code depends on its left and upper neighbours). Pairs: caption words name the
    image's base code, image-first or caption-first at random."""
    vocab = make_vocab(image_tokens_per_image=64, n_text=512, n_image=256)
    s = vocab["specials"]
    t0, i0 = vocab["text_range"][0], vocab["image_range"][0]
    rng = np.random.default_rng(seed)
    succ = rng.integers(0, 512, size=(512, 3))

    def text(n):
        w = [int(rng.integers(0, 512))]
        for _ in range(n - 1):
            w.append(int(succ[w[-1], rng.integers(0, 3)]))
        return [t0 + x for x in w]

    def image():
        base, dx, dy = rng.integers(0, 256), rng.integers(1, 5), rng.integers(1, 5)
        grid = (base + dx * np.arange(8)[None, :] + dy * np.arange(8)[:, None] + rng.integers(0, 2, (8, 8))) % 256
        return base, [s["<boi>"]] + [i0 + int(c) for c in grid.reshape(-1)] + [s["<eoi>"]]

    docs = []
    for i in range(n_docs):
        if i % 2:
            docs.append(text(int(rng.integers(30, 120))) + [s["<eod>"]])
        else:
            base, img = image()
            caption = [t0 + int(base)] + text(int(rng.integers(5, 15)))
            docs.append((img + caption if rng.random() < 0.5 else caption + img) + [s["<eod>"]])
    docs = [np.array(d, dtype=np.uint32) for d in docs]
    cut = n_docs * 9 // 10
    return [make_token_shards(root, docs[:cut], vocab, "train")], [make_token_shards(root, docs[cut:], vocab, "heldout")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="*", default=None, help="token shard dirs to train on (default: synthetic)")
    ap.add_argument("--heldout", nargs="*", default=None, help="held-out token shard dirs (default: --data)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--work", default="bench-out/scaling")
    ap.add_argument("--out", default="benchmarks/results/scaling")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.data:
        train_dirs, held = [Path(d) for d in args.data], [Path(d) for d in (args.heldout or args.data)]
    else:
        train_dirs, held = synthetic_corpus(work / f"corpus-{time.time_ns()}", 3000)
    plan = work / f"plan-{time.time_ns()}"
    write_plan(plan_mix(train_dirs, out=plan, ratio=(1, 1), world_size=1, seq_len=args.seq_len,
                        micro_batch=args.micro_batch, steps=args.steps), plan)
    vocab = json.loads((plan / "plan.json").read_text())["vocab"]
    rows = []
    for name, kw in VARIANTS:
        cfg = resolve("tiny", kw, {"steps": args.steps, "lr": args.lr, "warmup": 10, "ckpt_every": args.steps,
                                   "log_every": 10}, vocab=vocab, seq_len=args.seq_len, plan=str(plan))
        run = work / f"run-{name.replace(' ', '-')}-{time.time_ns()}"
        t0 = time.perf_counter()
        train(cfg, run, lambda r, w: PlanLoader(plan, r, w), live=False)
        seconds = time.perf_counter() - t0
        res = evaluate(str(run), [str(d) for d in held], [str(d) for d in held], batch_size=8)
        h = res["heldout"]
        rows.append({"model": name, "train_s": seconds, "loss": h["all"]["loss"], "text_loss": h["text"]["loss"],
                     "image_loss": h["image"]["loss"], "image_to_text": res["pairs"]["image_to_text"]["loss"],
                     "text_to_image": res["pairs"]["text_to_image"]["loss"]})
        print(rows[-1], flush=True)
    lines = ["| model | held-out loss | text | image | caption given image | image given caption | train s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['loss']:.4f} | {r['text_loss']:.4f} | {r['image_loss']:.4f} | "
                     f"{r['image_to_text']:.4f} | {r['text_to_image']:.4f} | {r['train_s']:.0f} |")
    save(args.out, {"machine": platform.machine(), "args": vars(args), "rows": rows}, lines)


if __name__ == "__main__":
    main()
