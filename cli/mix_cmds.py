"""`mmtok balance-mix`: plan per-rank, per-step balanced text:image micro-batches."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from mmtok.cli.common import fail, friendly_errors


def register(app: typer.Typer) -> None:
    app.command("balance-mix", no_args_is_help=True)(balance_mix)


# Long only because typer declares each option as a parameter; the planning is `mix.balance_mix`.
@friendly_errors
def balance_mix(
    # the required ones default to None so that every missing one is named in one message
    token_shards: Optional[List[str]] = typer.Argument(None, help="Token shard directories written by `mmtok tokenize` "
                                                       "(or URLs such as s3://bucket/tokens)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Plan directory to write (plan.json + arrays), or a "
                                      "URL. Required."),
    world_size: Optional[int] = typer.Option(None, "--world-size", min=1, help="Ranks (GPUs) the plan is laid out for. "
                                             "Required."),
    seq_len: int = typer.Option(4096, "--seq-len", min=1, help="Tokens per sequence."),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", min=1, help="Sequences per rank per step. Required."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Plan steps (one micro-batch per rank each)."),
    tokens: Optional[int] = typer.Option(None, "--tokens", min=1, help="Or: plan at least this many tokens."),
    ratio: Optional[str] = typer.Option(None, "--ratio", help="Target text:image token ratio, e.g. 1:1."),
    experts: Optional[str] = typer.Option(None, "--experts", help="Or: the ratio of an expert layout, e.g. 4t4i."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Comma-separated source weights "
                                          "(default: each source's share of the tokens)."),
    tolerance: float = typer.Option(0.02, "--tolerance", help="Allowed relative deviation of every rank-step's ratio."),
    seed: int = typer.Option(0, "--seed", help="Shuffling seed."),
    holdout: float = typer.Option(0.0, "--holdout", min=0.0, max=0.5, help="Hold out this share of every source's "
                                  "documents (chosen by a hash of the document key: the same ones every time) and "
                                  "write them as token shards under OUT/holdout/ for `mmtok eval --data`."),
    plot: Optional[Path] = typer.Option(None, "--plot", dir_okay=False, help="Draw per-step ratio and source shares to this PNG."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Plan which documents (and token spans) every rank packs at every step, so that each
    rank's micro-batch holds text:image tokens within --tolerance of the target ratio.

    The plan is a pure function of its inputs (same inputs, same bytes); its micro-batch
    order does not depend on --world-size, so training may resume at another world size.
    Exit status: 0 ok, 2 bad usage or input.

    Example: mmtok balance-mix tokens/text tokens/pairs --out plan --world-size 8 --experts 4t4i
    --seq-len 4096 --micro-batch 6 --steps 1000
    """
    from mmtok.mix import balance_mix as plan_and_write

    missing = [name for name, value in (("TOKEN_SHARDS...", token_shards), ("--out", out), ("--world-size", world_size),
                                        ("--micro-batch", micro_batch)) if not value]
    missing += ["--ratio or --experts"] * (ratio is None and experts is None)
    missing += ["--steps or --tokens"] * (steps is None and tokens is None)
    if missing:
        mix = f"--experts {experts}" if experts else f"--ratio {ratio or '1:1'}"
        length = f"--tokens {tokens}" if tokens else f"--steps {steps or 100}"
        inputs = " ".join(map(str, token_shards or ["tokens/text", "tokens/pairs"]))
        fail(f"missing {', '.join(missing)}; for example: mmtok balance-mix {inputs} --out {out or 'plan'} "
             f"--world-size {world_size or 1} {mix} --seq-len {seq_len} --micro-batch {micro_batch or 4} {length}")
    w = None
    if weights is not None:
        try:
            w = [float(x) for x in weights.split(",")]
        except ValueError:
            fail(f"--weights {weights!r}: expected comma-separated numbers, one per source")
    from mmtok.fs import as_location

    sources, where = [as_location(d) for d in token_shards], as_location(out)
    if isinstance(where, Path) and where.is_file():
        fail(f"--out {out} is a file; give a directory for the plan")
    out = str(where)
    plan = plan_and_write(sources, out, world_size=world_size, micro_batch=micro_batch, seq_len=seq_len,
                          steps=steps, tokens=tokens, ratio=ratio, experts=experts, weights=w, tolerance=tolerance,
                          seed=seed, holdout=holdout)
    target, steps = plan.meta["ratio"], plan.meta["steps"]
    if plot is not None:
        draw(plan, plot)
    r = plan.report
    if as_json:
        sys.stdout.write(json.dumps(r, indent=1, sort_keys=True) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"mmtok balance-mix: {out}")
    for col in ("source", "weight", "share", "epochs"):
        t.add_column(col, justify="left" if col == "source" else "right")
    for name in r["source_shares"]:
        t.add_row(name, f"{r['weights'][name]:.3f}", f"{r['source_shares'][name]:.3f}", f"{r['epochs'][name]:.2f}")
    console = Console(stderr=True)
    console.print(t)
    dev = r["max_ratio_deviation"]
    console.print(f"ratio {target[0]}:{target[1]} over {r['microbatches']} rank-steps ({world_size} ranks x {steps} "
                  f"steps): max deviation {'n/a' if dev is None else f'{dev:.2%}'}, "
                  f"{r['off_target_microbatches']} off target; padding {r['padding_fraction']:.2%}")
    for h in plan.meta.get("holdout", {}).get("sources", []):
        console.print(f"held out {h['documents']} documents of {h['name']}"
                      + (f": {out}/{h['path']} (for `mmtok eval --data`)" if h["path"] else ""), highlight=False)
    for note in r["notes"]:
        console.print(f"[bold yellow]note:[/] {note}", highlight=False)


def draw(plan, path: Path) -> None:
    """Per-step ratio (min and max over ranks) and cumulative source shares."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = plan.meta
    W = m["world_size"]
    a = plan.arrays
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (a["mb_text"] / a["mb_image"]).reshape(-1, W)
    step_of_piece = np.repeat(np.arange(len(a["mb_ptr"]) - 1) // W, np.diff(a["mb_ptr"]))
    first_doc = np.cumsum([s["documents"] for s in m["sources"]])
    src = np.searchsorted(first_doc, a["piece_doc"], "right")
    per = np.zeros((m["steps"], len(m["sources"])))
    np.add.at(per, (step_of_piece, src), a["piece_len"])
    shares = np.cumsum(per, axis=0) / np.cumsum(per, axis=0).sum(axis=1, keepdims=True)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    target = m["ratio"][0] / m["ratio"][1]
    steps = np.arange(m["steps"])
    ax1.fill_between(steps, r.min(axis=1), r.max(axis=1), alpha=0.5, label="min..max over ranks")
    ax1.axhline(target, color="k", lw=0.8, label="target")
    ax1.axhspan(target * (1 - m["tolerance"]), target * (1 + m["tolerance"]), color="g", alpha=0.15)
    ax1.set_ylabel("text:image")
    ax1.legend()
    for i, s in enumerate(m["sources"]):
        ax2.plot(steps, shares[:, i], label=s["name"])
    ax2.set_ylabel("source share (cumulative)")
    ax2.set_xlabel("step")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

