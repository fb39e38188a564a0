"""The training loop's own cost: `trainer.train.train` (the one loop every job runs: the
job's step, records, the progress bar, the stop check) against a bare loop written out by
hand (forward, backward, clip, AdamW step) on the same model, config and plan, side by side.

Both time the steps after the first `--warmup` (allocator and kernel warm-up) to the last,
with no checkpoint in between (the loop's one save at the end is left out of its time: it
is timed from its first record after the warm-up to its last). Prints steps/s and the ratio
loop / bare (1.0: the loop costs nothing beyond the step).

CPU: python benchmarks/bench_train_loop.py --out benchmarks/results/train-loop
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from benchutil import load_average, machine, save  # noqa: E402
from helpers.runs import make_plan  # noqa: E402  (the tests' plan: text and image-caption pairs)

from mmtok.loader import PlanLoader  # noqa: E402
from mmtok.trainer.launch import TrainOptions, run_config  # noqa: E402
from mmtok.trainer.model import Decoder, loss_terms  # noqa: E402
from mmtok.trainer.train import build_optimizer, lr_at, train  # noqa: E402


def bare(cfg, plan: Path, steps: int, warmup: int) -> float:
    """Steps/s of a hand-written step over the plan, after `warmup` steps."""
    torch.manual_seed(cfg.train.seed)
    model = Decoder(cfg.model).train()
    opt = build_optimizer(model, cfg.train)
    batches = iter(PlanLoader(plan, 0, 1))
    for step in range(steps):
        if step == warmup:
            t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.train)
        b = next(batches)
        logits, stats = model(b["input_ids"], b["positions"], b["doc_ids"], targets=b["targets"])
        loss_terms(cfg.model, logits, b["targets"], stats)["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (steps - warmup) / (time.perf_counter() - t0)


def looped(cfg, plan: Path, run: Path, warmup: int) -> float:
    """Steps/s of `train` (log every step: its records' times), after `warmup` steps."""
    seen = []

    class Clock(PlanLoader):  # when the loop asks for each step's batch
        def __iter__(self):
            for batch in super().__iter__():
                seen.append(time.perf_counter())
                yield batch

    train(cfg, run, lambda rank, world: Clock(plan, rank, world), live=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == cfg.train.steps and len(seen) == cfg.train.steps
    return (len(seen) - 1 - warmup) / (seen[-1] - seen[warmup])  # batch of step warmup+1 .. batch of the last


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/train-loop")
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench-loop-"))
    data = make_plan(root / "data", steps=args.steps, micro_batch=4)
    opts = TrainOptions(out=root / "run", model="moma", experts="2t2i", steps=args.steps, log_every=1,
                        ckpt_every=10 ** 6, seed=0)
    cfg = run_config(opts, data["plan"])
    load = load_average()
    rates = {"bare": [], "loop": []}
    for i in range(args.repeat):  # interleaved: the machine's drift falls on both
        rates["bare"].append(bare(cfg, data["plan"], args.steps, args.warmup))
        rates["loop"].append(looped(cfg, data["plan"], root / f"run{i}", args.warmup))
    med = {k: statistics.median(v) for k, v in rates.items()}
    result = {"machine": machine(), "load_before": load, "load_after": load_average(), "steps": args.steps,
              "warmup": args.warmup, "model": "moma 2t2i (tests' tiny preset), 1 thread",
              "steps_per_s": rates, "median_steps_per_s": med, "loop_over_bare": med["loop"] / med["bare"]}
    lines = ["| | steps/s (median of %d) |" % args.repeat, "| --- | --- |",
             f"| bare step | {med['bare']:.2f} |", f"| `train` (the one loop) | {med['loop']:.2f} |",
             f"| loop / bare | {med['loop'] / med['bare']:.3f} |"]
    save(args.out, result, lines)


if __name__ == "__main__":
    main()
