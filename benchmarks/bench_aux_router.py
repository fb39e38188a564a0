"""How well can a causal router agree with expert choice at this scale? (issue #17 item 3)

Expert choice picks, in each group (one modality's tokens of a micro-batch), the k tokens
with the highest centred router score (`selection_scores` in trainer/moe.py). A token's own
score is causal (a function of its hidden state), but the cut, the k-th highest score, is
set by the whole micro-batch, future tokens included. So no causal router can agree 100%:
the best any predictor of "selected" from the token alone can do is a fixed cut on the true
score. This script measures that ceiling and what the auxiliary router (MoMa's d -> d/2 -> E
MLP on the same hidden state) reaches under several trainings.

Per seed: train a tiny moma 4t4i for --steps on bench_upcycle's synthetic data (fp32), then
record, for every expert-choice group, the routed inputs, the true centred scores and the
selections on --aux-batches fresh training micro-batches and 16 held-out ones. On held-out
data it reports, per recipe, agreement (prediction = selection over tokens x experts),
precision and recall of "selected", against:
- trivial: always "not selected" (1 - k/N);
- ceiling (fixed cut): the true score with the cut fitted on the training batches — what a
  perfect causal predictor of the score alone reaches;
- and the auxiliary-router trainings: the product's stage (200 steps, AdamW lr 1e-2, BCE,
  logit > 0), 10x longer, class-weighted BCE, and the longer one with its cut calibrated so
  that it predicts "selected" at the capacity's rate on the training batches.
Last, the causal-decoding loss gap (held-out loss with routing="causal" minus batch routing)
with the product's stage routers and with the best recipe's.

Usage: python benchmarks/bench_aux_router.py [--steps 600] [--seeds 3] [--aux-batches 300]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench_upcycle import SIZES, Synthetic, train
from benchutil import machine, save, t_interval
from mmtok.trainer.config import ModelConfig, TrainConfig
from mmtok.trainer.model import Decoder
from mmtok.trainer.moe import AuxRouter, ExpertChoice, capacity, selection_scores
from mmtok.vocab import Vocab

HELDOUT = 16
GROUP_SCALES = (1, 2, 4, 8, 16)  # micro-batches per expert-choice group, for the ceiling's trend
# recipe -> (steps, class-weighted BCE, cut calibrated to the capacity)
RECIPES = {"stage (200 steps)": (200, False, False), "2000 steps": (2000, False, False),
           "2000 steps, class-weighted": (2000, True, False), "2000 steps, capacity cut": (2000, False, True)}


class Recorder:
    """Wraps one ExpertChoice's add_into: keeps its member inputs, true centred scores and
    the batch router's selections for every forward, grouped by micro-batch."""

    def __init__(self, ec: ExpertChoice):
        self.ec, self.batches = ec, []
        inner = ec.add_into

        def add_into(out, x, member, causal=False):
            stats = inner(out, x, member, causal)
            if self.on and not causal:
                with torch.no_grad():
                    _, idx, k = ec.route(x, member)
                    chosen = torch.zeros(ec.n_experts, x.shape[0], dtype=torch.bool)
                    chosen.scatter_(1, idx, (torch.arange(idx.shape[1]) < k).expand_as(idx))
                    rows = member.nonzero().squeeze(1) if member is not None else torch.arange(x.shape[0])
                    scores = selection_scores(ec.router(x).float())
                    self.batches.append((x[rows].detach().clone(), scores[rows], chosen.T[rows]))
            return stats

        ec.add_into, self.on = add_into, False

    def take(self) -> list[tuple]:
        got, self.batches = self.batches, []
        return got


def record(model: Decoder, recorders: list[Recorder], data: Synthetic, first: int, n: int, b: int) -> list[list[tuple]]:
    model.eval()
    for r in recorders:
        r.on = True
    with torch.no_grad():
        for i in range(n):
            batch = data.batch(first + i, b, torch.device("cpu"))
            model(batch["input_ids"], batch["positions"], batch["doc_ids"])
    for r in recorders:
        r.on = False
    return [r.take() for r in recorders]


def counts(pred: torch.Tensor, chosen: torch.Tensor) -> np.ndarray:
    """hits, total, true positives, selections, predicted selections"""
    return np.array([float((pred == chosen).sum()), chosen.numel(), float((pred & chosen).sum()),
                     float(chosen.sum()), float(pred.sum())])


def fixed_cut(train_batches: list[tuple]) -> torch.Tensor:
    """Per expert, the cut on the true score that agrees best with the selections over the
    training batches (scanned at every score's quantile, finely)."""
    scores = torch.cat([s for _, s, _ in train_batches])
    chosen = torch.cat([c for _, _, c in train_batches])
    cuts = []
    for e in range(scores.shape[1]):
        grid = torch.quantile(scores[:, e], torch.linspace(0.5, 0.95, 451))
        acc = torch.stack([((scores[:, e] > g) == chosen[:, e]).float().mean() for g in grid])
        cuts.append(grid[int(acc.argmax())])
    return torch.stack(cuts)


def fit_aux(train_batches: list[tuple], n_experts: int, steps: int, weighted: bool, seed: int) -> AuxRouter:
    """The stage's optimisation on recorded inputs: one micro-batch's group per step (cycling),
    AdamW lr 1e-2 without weight decay, BCE (optionally with positives weighted by the
    negatives-to-positives ratio of the training batches)."""
    torch.manual_seed(seed)
    aux = AuxRouter(train_batches[0][0].shape[1], n_experts)
    opt = torch.optim.AdamW(aux.parameters(), lr=1e-2, weight_decay=0.0)
    pos = torch.cat([c for _, _, c in train_batches]).float().mean()
    pw = ((1 - pos) / pos).expand(n_experts) if weighted else None
    for i in range(steps):
        x, _, chosen = train_batches[i % len(train_batches)]
        loss = F.binary_cross_entropy_with_logits(aux(x), chosen.float(), pos_weight=pw)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return aux


def merged(batches: list[tuple], m: int, n_experts: int) -> list[tuple]:
    """The recorded groups joined m micro-batches at a time, with the selections expert choice
    would make over each joined group (top capacity on the same true scores)."""
    out = []
    for i in range(0, len(batches) - m + 1, m):
        scores = torch.cat([s for _, s, _ in batches[i:i + m]])
        k = capacity(scores.shape[0], n_experts, 1.0)
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(0, scores.topk(k, dim=0).indices, True)
        out.append((None, scores, chosen))
    return out


@torch.no_grad()
def calibrate(aux: AuxRouter, train_batches: list[tuple]) -> None:
    """Shift each expert's output bias so that it predicts "selected" at the selections' own
    rate on the training batches (the capacity's share of the group)."""
    logits = torch.cat([aux(x) for x, _, _ in train_batches])
    rate = torch.cat([c for _, _, c in train_batches]).float().mean(0)
    aux.out.bias -= torch.stack([torch.quantile(logits[:, e], 1 - rate[e]) for e in range(logits.shape[1])])


@torch.no_grad()
def causal_gap(model: Decoder, data: Synthetic, b: int) -> float:
    """Held-out loss (all tokens) decoding with the auxiliary routers minus with batch routing."""
    model.eval()
    loss = {}
    for routing in ("batch", "causal"):
        tot = n = 0.0
        for i in range(HELDOUT):
            batch = data.batch(10_000_000 + i, b, torch.device("cpu"))
            logits, _ = model(batch["input_ids"], batch["positions"], batch["doc_ids"], routing=routing)
            t = batch["targets"]
            nll = F.cross_entropy(logits.float().transpose(1, 2), t.clamp(min=0), reduction="none")[t != -100]
            tot, n = tot + float(nll.sum()), n + nll.numel()
        loss[routing] = tot / n
    return loss["causal"] - loss["batch"]


def run_seed(seed: int, args, data: Synthetic, base: dict) -> dict:
    torch.manual_seed(seed)
    model = Decoder(ModelConfig(model="moma", experts=args.experts, **base))
    train(model, data, 0, args.steps, TrainConfig(steps=args.steps, lr=args.lr), args.batch, torch.device("cpu"))
    groups = [m for m in model.modules() if isinstance(m, ExpertChoice)]
    recorders = [Recorder(ec) for ec in groups]
    train_rec = record(model, recorders, data, 100_000, args.aux_batches, args.batch)
    held_rec = record(model, recorders, data, 10_000_000, HELDOUT, args.batch)
    for ec in groups:
        del ec.add_into  # unwrap: the copies below must route through their own weights
    sums = {name: np.zeros(5) for name in ["trivial", "ceiling (fixed cut)", *RECIPES]}
    fitted = {name: [] for name in RECIPES}
    ceiling = {m: np.zeros(5) for m in GROUP_SCALES}
    for g, ec in enumerate(groups):
        tr, ho = train_rec[g], held_rec[g]
        for m in GROUP_SCALES:  # the cut is fitted and scored at each group size
            big = merged(ho, m, ec.n_experts)
            ceiling[m] += counts(torch.cat([s for _, s, _ in big]) > fixed_cut(merged(tr, m, ec.n_experts)),
                                 torch.cat([c for _, _, c in big]))
        chosen = torch.cat([c for _, _, c in ho])
        scores = torch.cat([s for _, s, _ in ho])
        sums["trivial"] += counts(torch.zeros_like(chosen), chosen)
        sums["ceiling (fixed cut)"] += counts(scores > fixed_cut(tr), chosen)
        for name, (steps, weighted, cut) in RECIPES.items():
            aux = fit_aux(tr, ec.n_experts, steps, weighted, seed * 100 + g)
            if cut:
                calibrate(aux, tr)
            with torch.no_grad():
                sums[name] += counts(torch.cat([aux(x) for x, _, _ in ho]) > 0, chosen)
            fitted[name].append(aux)
    out = {"seed": seed, "groups": len(groups),
           "group_tokens_mean": float(np.mean([x.shape[0] for x, _, _ in held_rec[0]])),
           "capacity": capacity(int(np.mean([x.shape[0] for x, _, _ in held_rec[0]])), groups[0].n_experts, 1.0)}
    for name, (hits, n, tp, pos, pred) in sums.items():
        out[name] = {"agreement": hits / n, "precision": tp / pred if pred else float("nan"), "recall": tp / pos}
    out["ceiling_by_group_size"] = {m: c[0] / c[1] for m, c in ceiling.items()}
    best = max(RECIPES, key=lambda r: out[r]["agreement"])
    for name in ("stage (200 steps)", best):
        trial = copy.deepcopy(model)
        for ec, aux in zip([m for m in trial.modules() if isinstance(m, ExpertChoice)], fitted[name]):
            ec.aux.load_state_dict(aux.state_dict())
        out.setdefault("causal_gap", {})[name] = causal_gap(trial, data, args.batch)
    print(seed, {k: round(v["agreement"], 4) for k, v in out.items() if isinstance(v, dict) and "agreement" in v},
          out["causal_gap"], flush=True)
    return out


def table(runs: list[dict], args) -> list[str]:
    def cell(vals) -> str:
        if any(v != v for v in vals):  # nan: a predictor that never says "selected" has no precision
            return "–"
        m, _, half = t_interval(vals)
        return f"{m:.4f} ± {half:.4f}" if len(vals) > 1 else f"{m:.4f}"

    r0 = runs[0]
    lines = [f"tiny moma {args.experts}, {args.steps} training steps, batch {args.batch} x {args.seq_len}; "
             f"{len(runs)} seeds; {r0['groups']} expert-choice groups of ~{r0['group_tokens_mean']:.0f} tokens, "
             f"capacity {r0['capacity']} per expert; auxiliary routers fitted on {args.aux_batches} micro-batches, "
             f"scored on {HELDOUT} held-out ones. Mean ± 95% t half-width over seeds.", "",
             "| predictor of \"selected\" | agreement | precision | recall |", "| --- | --- | --- | --- |"]
    for name in ["trivial", "ceiling (fixed cut)", *RECIPES]:
        lines.append(f"| {name} | " + " | ".join(cell([r[name][k] for r in runs]) for k in ("agreement", "precision", "recall")) + " |")
    lines += ["", "Causal decoding minus batch routing, held-out nats/token: "
              + "; ".join(f"{name}: {cell([r['causal_gap'][name] for r in runs if name in r['causal_gap']])}"
                          for name in dict.fromkeys(n for r in runs for n in r["causal_gap"]))]
    lines += ["", "Ceiling (fixed cut on the true score) when expert choice ranks over m micro-batches at once:", "",
              "| micro-batches per group | tokens per group | ceiling agreement |", "| --- | --- | --- |"]
    for m in GROUP_SCALES:
        lines.append(f"| {m} | ~{m * r0['group_tokens_mean']:.0f} | {cell([r['ceiling_by_group_size'][m] for r in runs])} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", default="4t4i")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--aux-batches", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--out", default="benchmarks/results/aux_router")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    vocab = Vocab.layout(vocab_size=args.vocab, image_codes=args.vocab // 4, image_tokens_per_image=args.seq_len // 2).to_dict()
    data = Synthetic(vocab, args.seq_len)
    base = dict(vocab_size=args.vocab, image_range=tuple(vocab["image_range"]), max_seq_len=args.seq_len, **SIZES["tiny"])
    t0, runs = time.perf_counter(), []
    for seed in range(args.seeds):  # saved after every seed: a run cut short still reports
        runs.append(run_seed(seed, args, data, base))
        save(Path(args.out), {"machine": machine(torch.device("cpu")), "args": vars(args), "runs": runs,
                              "seconds": time.perf_counter() - t0}, table(runs, args))


if __name__ == "__main__":
    main()
