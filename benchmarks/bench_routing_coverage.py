"""Expert-choice coverage (issue #17): on bench_scaling's synthetic corpus, train a
model with each expert-choice selection ("centred": router logit minus the token's mean over
the group's experts, the default; "gate": the raw sigmoid gate, as before the fix) and
report, at init and after training, per routed group: the share of tokens no expert takes
(against (1 - 1/E)^E, the share independent choices would leave), the mean pairwise overlap
|A & B| / k of the experts' choices, the mean pairwise correlation of the router logits
over tokens, and the held-out loss.

Usage: python benchmarks/bench_routing_coverage.py [--steps 600] [--model moma --experts 4t4i]

The full version is the default (600 steps per selection, moma 4t4i on the tiny preset):
`nice python benchmarks/bench_routing_coverage.py`, about 15 minutes on two busy CPU cores.
A quick look: `--steps 150` (about 4 minutes) already shows the gate ranking's coverage
falling behind independent choices while the centred one stays below their bound.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_scaling import synthetic_corpus  # noqa: E402
from benchutil import save  # noqa: E402

from mmtok.loader import PlanLoader  # noqa: E402
from mmtok.mix import plan_mix, write_plan  # noqa: E402
from mmtok.trainer import moe  # noqa: E402
from mmtok.trainer.config import resolve  # noqa: E402
from mmtok.trainer.evaluate import evaluate  # noqa: E402
from mmtok.trainer.export import load_model  # noqa: E402
from mmtok.trainer.model import Decoder  # noqa: E402
from mmtok.trainer.train import train  # noqa: E402


@torch.no_grad()
def coverage(model: Decoder, batches: list[dict]) -> dict:
    """Mean over routed groups and batches of the unrouted share, its independent bound, the
    pairwise overlap and the pairwise logit correlation."""
    rows, route = [], moe.ExpertChoice.route

    def spy(self, x, member=None):
        gate, idx, k = route(self, x, member)
        if 1 < self.n_experts > self.capacity_factor:
            m = torch.ones(x.shape[0], dtype=torch.bool) if member is None else member
            kk, n, e = int(k), int(m.sum()), self.n_experts  # k itself goes back as the tensor add_into needs
            chosen = torch.zeros(e, x.shape[0], dtype=torch.bool)
            for j in range(e):
                chosen[j, idx[j, :kk]] = True
            corr = torch.corrcoef(self.router(x[m]).float().T)
            pairs = list(itertools.combinations(range(e), 2))
            rows.append({"unrouted": float((~chosen[:, m].any(0)).float().mean()), "independent": (1 - kk / n) ** e,
                         "overlap": np.mean([float((chosen[a] & chosen[b]).sum()) / kk for a, b in pairs]),
                         "logit_corr": np.mean([float(corr[a, b]) for a, b in pairs])})
        return gate, idx, k

    model.eval()
    moe.ExpertChoice.route = spy
    try:
        for b in batches:
            model(b["input_ids"], b["positions"], b["doc_ids"])
    finally:
        moe.ExpertChoice.route = route
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--model", default="moma")
    ap.add_argument("--experts", default="4t4i")
    ap.add_argument("--work", default="bench-out/routing")
    ap.add_argument("--out", default="benchmarks/results/routing_coverage")
    args = ap.parse_args()
    work = Path(args.work) / str(time.time_ns())
    train_dirs, held = synthetic_corpus(work / "corpus", 3000)
    plan = work / "plan"
    write_plan(plan_mix(train_dirs, out=plan, ratio=(1, 1), world_size=1, seq_len=128, micro_batch=4, steps=args.steps), plan)
    vocab = json.loads((plan / "plan.json").read_text())["vocab"]
    probe = [b for _, b in zip(range(8), PlanLoader(plan, 0, 1))]
    kw = {"model": args.model, "experts": args.experts} | ({"routing": "expert-choice"} if args.model == "moe" else {})
    rows = []
    for select in ("gate", "centred"):
        moe.ExpertChoice.select = select
        cfg = resolve("tiny", kw, {"steps": args.steps, "lr": 3e-3, "warmup": 10, "ckpt_every": args.steps, "log_every": 10},
                      vocab=vocab, seq_len=128, plan=str(plan))
        torch.manual_seed(0)
        init = coverage(Decoder(cfg.model), probe)
        run = work / f"run-{select}"
        train(cfg, run, lambda r, w: PlanLoader(plan, r, w), live=False)
        trained = coverage(load_model(run)[0], probe)
        h = evaluate(str(run), [str(d) for d in held], [], batch_size=8)["heldout"]
        rows.append({"select": select, "init": init, "trained": trained, "loss": h["all"]["loss"],
                     "text_loss": h["text"]["loss"], "image_loss": h["image"]["loss"],
                     "heldout_unrouted": {g: v["unrouted"] for g, v in h["expert_load"].items()}})
        print(rows[-1], flush=True)
    moe.ExpertChoice.select = "centred"
    lines = [f"{args.model} {args.experts}, {args.steps} steps", "",
             "| selection | unrouted init | unrouted trained | independent | overlap trained | logit corr trained | held-out loss |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        t = r["trained"]
        lines.append(f"| {r['select']} | {r['init']['unrouted']:.3f} | {t['unrouted']:.3f} | {t['independent']:.3f} | "
                     f"{t['overlap']:.3f} | {t['logit_corr']:.2f} | {r['loss']:.4f} |")
    save(args.out, {"machine": platform.machine(), "args": vars(args), "rows": rows}, lines)


if __name__ == "__main__":
    main()
