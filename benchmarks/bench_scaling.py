"""A small scaling harness for MoMa's ordering: dense, MoMa 1t1i / 2t2i / 4t4i, MoD-MoMa 4t4i
and Mixture-of-Transformers trained on one plan (the same data order for every model and
seed; only the seed of the model's initialisation varies), evaluated on held-out data at a
few checkpoints along each run. Expert choice at capacity factor 1 and MoT's one tower per
token give every model but mod-moma the dense model's active FLOPs per token, so equal
steps are equal training FLOPs; mod-moma spends fewer and is plotted at its own FLOPs.

Reports held-out loss per modality (mean, std over seeds, 95% t-interval), each model's
gap to dense with a 95% Welch interval, and a plot of held-out loss against training FLOPs
(OUT.png). docs/SCIENCE.md states the protocol and what the numbers show.

Presets: `cpu` (default; the tiny model, about an hour on a quiet 2-core machine) and
`gpu` (the 90m model for one GPU). `--steps`, `--seeds`, `--models` override the preset.
With `--data` it trains on your token shards; without, on a synthetic corpus whose text and
image tokens follow different rules (so modality experts have something to specialise on).

Usage: python benchmarks/bench_scaling.py [--preset cpu|gpu] [--steps N] [--seeds N]
       [--models dense 4t4i ...] [--data DIR ...] [--out benchmarks/results/scaling]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from benchutil import machine, save, t_interval  # noqa: E402
from helpers.tokens import make_token_shards, make_vocab  # noqa: E402  (the tests' shard writer)

from mmtok.loader import PlanLoader  # noqa: E402
from mmtok.mix import plan_mix, write_plan  # noqa: E402
from mmtok.trainer.config import resolve  # noqa: E402
from mmtok.trainer.evaluate import evaluate  # noqa: E402
from mmtok.trainer.model import flops_per_token  # noqa: E402
from mmtok.trainer.train import train  # noqa: E402

MODELS = {"dense": {"model": "dense"}, "1t1i": {"model": "moma", "experts": "1t1i"},
          "2t2i": {"model": "moma", "experts": "2t2i"}, "4t4i": {"model": "moma", "experts": "4t4i"},
          "mod-4t4i": {"model": "mod-moma", "experts": "4t4i"}, "mot": {"model": "mot"}}
# cpu: ~1 h on a quiet 2-core machine (6 models x 5 seeds x 600 steps of 4 x 128 tokens);
# gpu: the 90m preset on one H100-class GPU (bf16), a few hours.
PRESETS = {
    "cpu": dict(model_preset="tiny", seq_len=128, micro_batch=4, steps=600, seeds=5, n_docs=3000, lr=3e-3,
                warmup=10, evals=4, eval_batch=8),
    "gpu": dict(model_preset="90m", seq_len=1024, micro_batch=16, steps=4000, seeds=3, n_docs=40000, lr=1e-3,
                warmup=200, evals=8, eval_batch=16),
}
KINDS = ("all", "text", "image")


def synthetic_corpus(root: Path, n_docs: int, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """Text: a sparse random bigram language. Images: 8x8 code grids of smooth gradients
    (a code depends on its left and upper neighbours). Pairs: caption words name the
    image's base code, image-first or caption-first at random. The last tenth is held out."""
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


def welch_gap(a, b) -> tuple[float, float]:
    """mean(a) - mean(b) and the half-width of its 95% Welch interval (nan below 2 seeds each)."""
    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    gap = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return gap, float("nan")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        return gap, 0.0
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return gap, float(stats.t.ppf(0.975, df) * np.sqrt(va + vb))


def run_one(name: str, seed: int, plan: Path, held: list[str], work: Path, p: dict) -> list[dict]:
    """Train one model with one init seed, stopping at each eval point to score held-out
    data (the run resumes from its checkpoint, so the curve is one uninterrupted schedule)."""
    vocab = json.loads((plan / "plan.json").read_text())["vocab"]
    cfg = resolve(p["model_preset"], MODELS[name],
                  {"steps": p["steps"], "lr": p["lr"], "warmup": p["warmup"], "ckpt_every": p["steps"],
                   "log_every": 10, "seed": seed}, vocab=vocab, seq_len=p["seq_len"], plan=str(plan))
    fpt = flops_per_token(cfg.model, p["seq_len"])
    run = work / f"run-{name}-s{seed}-{time.time_ns()}"
    points = sorted({round(p["steps"] * (i + 1) / p["evals"]) for i in range(p["evals"])})
    out, t_train = [], 0.0
    for i, step in enumerate(points):
        t0 = time.perf_counter()
        train(cfg, run, lambda r, w: PlanLoader(plan, r, w), resume=i > 0, stop_at_step=step, live=False)
        t_train += time.perf_counter() - t0
        final = step == points[-1]
        res = evaluate(str(run), held, held if final else [], batch_size=p["eval_batch"])
        rec = {"model": name, "seed": seed, "step": step, "flops_per_token": fpt,
               "train_flops": step * p["micro_batch"] * p["seq_len"] * fpt, "train_s": t_train,
               **{k: res["heldout"][k]["loss"] for k in KINDS}}
        if final:
            rec.update(caption_given_image=res["pairs"]["image_to_text"]["loss"],
                       image_given_caption=res["pairs"]["text_to_image"]["loss"],
                       unrouted={g: v["unrouted"] for g, v in res["heldout"].get("expert_load", {}).items()},
                       causal_gap=res.get("causal_gap", {}).get("all"))
        out.append(rec)
        print(json.dumps(rec), flush=True)
    return out


def table(records: list[dict], names: list[str]) -> list[str]:
    """Markdown: final held-out loss per model and modality (mean ± std, 95% CI), gap to dense."""
    last = max(r["step"] for r in records)
    final = {n: [r for r in records if r["model"] == n and r["step"] == last] for n in names}
    lines = [f"Held-out loss (nats/token) after {last} steps; mean ± std over seeds [95% t-interval]; "
             "gap = model − dense ± 95% Welch half-width (negative: better than dense).", "",
             "| model | seeds | FLOPs/token | all | text | image | gap all | gap text | gap image | train s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n in names:
        rows = final[n]
        if not rows:
            continue
        cells = []
        for k in KINDS:
            m, sd, hw = t_interval([r[k] for r in rows])
            cells.append(f"{m:.4f} ± {sd:.4f} [{m - hw:.4f}, {m + hw:.4f}]")
        gaps = []
        for k in KINDS:
            if n == "dense" or not final.get("dense"):
                gaps.append("–")
                continue
            g, hw = welch_gap([r[k] for r in rows], [r[k] for r in final["dense"]])
            gaps.append(f"{g:+.4f} ± {hw:.4f}")
        lines.append(f"| {n} | {len(rows)} | {rows[0]['flops_per_token'] / 1e6:.2f} M | " + " | ".join(cells + gaps)
                     + f" | {np.mean([r['train_s'] for r in rows]):.0f} |")
    return lines


def plot(records: list[dict], names: list[str], out: Path) -> None:
    """Held-out loss against training FLOPs, one panel per modality: seed mean, 95% band."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, kind in zip(axes, KINDS):
        for n in names:
            rows = [r for r in records if r["model"] == n]
            steps = sorted({r["step"] for r in rows})
            if not steps:
                continue
            x = [next(r["train_flops"] for r in rows if r["step"] == s) for s in steps]
            stats = [t_interval([r[kind] for r in rows if r["step"] == s]) for s in steps]
            m, hw = np.array([s[0] for s in stats]), np.array([s[2] for s in stats])
            ax.plot(x, m, marker="o", label=n)
            ax.fill_between(x, m - hw, m + hw, alpha=0.2)
        ax.set(xscale="log", xlabel="training FLOPs", ylabel="held-out loss (nats/token)", title=kind)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    ap.add_argument("--seeds", type=int, default=None, help="init seeds 0..N-1 (default: the preset's)")
    ap.add_argument("--evals", type=int, default=None, help="eval points along each run (default: the preset's)")
    ap.add_argument("--data", nargs="*", default=None, help="token shard dirs to train on (default: synthetic)")
    ap.add_argument("--heldout", nargs="*", default=None, help="held-out token shard dirs (default: --data)")
    ap.add_argument("--work", default="bench-out/scaling")
    ap.add_argument("--out", default="benchmarks/results/scaling")
    args = ap.parse_args()
    p = {**PRESETS[args.preset], **{k: v for k in ("steps", "seeds", "evals") if (v := getattr(args, k))}}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.data:
        train_dirs, held = [Path(d) for d in args.data], [Path(d) for d in (args.heldout or args.data)]
    else:
        train_dirs, held = synthetic_corpus(work / f"corpus-{time.time_ns()}", p["n_docs"])
    plan = work / f"plan-{time.time_ns()}"
    write_plan(plan_mix(train_dirs, out=plan, ratio=(1, 1), world_size=1, seq_len=p["seq_len"],
                        micro_batch=p["micro_batch"], steps=p["steps"]), plan)
    t0, out, records = time.perf_counter(), Path(args.out), []
    # one fresh process per run: mmtok.loader.TokenCorpus never closes its shard fds, so one
    # process making 100+ loaders runs out of file descriptors
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1)
    for seed in range(p["seeds"]):  # results written after every seed: a cut-short run still reports
        records += [r for n in args.models
                    for r in pool.submit(run_one, n, seed, plan, [str(d) for d in held], work, p).result()]
        save(out, {"machine": machine(), "preset": args.preset, "settings": p, "wall_s": time.perf_counter() - t0,
                   "models": {n: MODELS[n] for n in args.models}, "records": records}, table(records, args.models))
        plot(records, args.models, out)
    pool.shutdown()


if __name__ == "__main__":
    main()
