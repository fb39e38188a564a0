"""`mmtok train`, `mmtok eval`, `mmtok export`: the FSDP trainer for dense, MoE and MoMa
models, its evaluator, and export to safetensors. torch is imported inside the commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import typer

from mmtok.cli.common import Exit, fail, friendly_errors

JSON_OUT = typer.Option(False, "--json", help="Print a machine-readable summary on stdout.")


def register(app: typer.Typer) -> None:
    app.command(no_args_is_help=True)(train)
    app.command("eval", no_args_is_help=True)(evaluate)
    app.command(no_args_is_help=True)(export)


@friendly_errors
def train(
    plan: Path = typer.Option(..., "--plan", help="Plan directory written by `mmtok balance-mix`."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory: config, metrics, TensorBoard, checkpoints."),
    model: str = typer.Option("dense", "--model", help="dense, moe or moma."),
    experts: str = typer.Option("", "--experts", help="moma: NtMi layout (4t4i, 1t1i, ...); moe: number of experts."),
    routing: str = typer.Option("expert-choice", "--routing", help="moe routing: expert-choice or top2."),
    preset: str = typer.Option("tiny", "--preset", help="tiny, 90m, 435m or 1.4b (MoMa's Table 1 sizes)."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file with [model] and [train] tables; "
                                          "command-line options override it."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its newest checkpoint."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps in all (default 100)."),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Micro-batches per rank per optimizer step."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default 3e-3)."),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Warm-up steps (default 10)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for the initial weights."),
    ckpt_every: Optional[int] = typer.Option(None, "--ckpt-every", help="Checkpoint every N steps (default 50)."),
    log_every: Optional[int] = typer.Option(None, "--log-every", help="Metrics every N steps (default 1)."),
    capacity_factor: Optional[float] = typer.Option(None, "--capacity-factor", help="Expert-choice capacity factor."),
    swin_norm: Optional[bool] = typer.Option(None, "--swin-norm/--no-swin-norm", help="Chameleon's norm reordering."),
    attention: Optional[str] = typer.Option(None, "--attention", help="sdpa (default) or flex (GPU only)."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile each block."),
    act_ckpt: Optional[bool] = typer.Option(None, "--act-ckpt/--no-act-ckpt", help="Activation checkpointing per block."),
    mixed_precision: Optional[str] = typer.Option(None, "--mixed-precision", help="auto (bf16 on GPU), bf16 or fp32."),
    stop_at_step: Optional[int] = typer.Option(None, "--stop-at-step", min=1,
                                               help="Checkpoint and stop after this step (continue later with --resume)."),
    loader_workers: int = typer.Option(0, "--loader-workers", min=0, help="Loader worker processes per rank."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Start this many processes with torchrun on this machine "
                              "(or launch `torchrun ... mmtok train` yourself for several machines)."),
    as_json: bool = JSON_OUT,
):
    """Train a dense, MoE or MoMa decoder on a balance-mix plan (FSDP2 under torchrun)."""
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        _relaunch(nproc)
        return
    from mmtok.loader import PlanLoader, read_plan
    from mmtok.trainer.config import resolve
    from mmtok.trainer.train import train as run_train

    plan_meta, _ = read_plan(plan)
    model_opts = dict(model=model, experts=experts or None, routing=routing, capacity_factor=capacity_factor,
                      swin_norm=swin_norm, attention=attention)
    train_opts = dict(steps=steps, grad_accum=grad_accum, lr=lr, warmup=warmup, seed=seed, ckpt_every=ckpt_every,
                      log_every=log_every, compile=compile, act_ckpt=act_ckpt, mixed_precision=mixed_precision)
    cfg = resolve(preset, model_opts, train_opts, config, vocab=plan_meta["vocab"], seq_len=plan_meta["seq_len"],
                  plan=str(plan.resolve()))
    summary = run_train(cfg, out, lambda rank, world: PlanLoader(plan, rank, world, num_workers=loader_workers),
                        resume=resume, stop_at_step=stop_at_step, live=not as_json)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    else:
        from rich.console import Console

        Console(stderr=True).print(f"[bold]mmtok train[/]: {summary['status']} at step {summary['step']}/{summary['steps']}"
                                   f" on {summary['world_size']} process(es); checkpoint {summary['checkpoint']}")
    if summary["status"] == "interrupted":
        fail(f"interrupted at step {summary['step']}; checkpoint saved; continue with --resume", Exit.FAILED)


def _relaunch(nproc: int) -> None:
    """Run this same command under torchrun with `nproc` processes on this machine."""
    args = sys.argv[1:]
    i = args.index("--nproc") if "--nproc" in args else None
    if i is None:
        args = [a for a in args if not a.startswith("--nproc=")]
    else:
        del args[i:i + 2]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "mmtok.cli.app", *args]
    proc = subprocess.Popen(cmd)
    while True:
        try:
            rc = proc.wait()
            break
        except KeyboardInterrupt:  # the workers got it too: they checkpoint and exit; wait for them
            continue
    if rc:
        raise typer.Exit(rc)


@friendly_errors
def evaluate(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="A run directory (newest checkpoint) or an `mmtok export` directory."),
    data: List[Path] = typer.Option([], "--data", help="Held-out token shard directories (repeat for several)."),
    pairs: List[Path] = typer.Option([], "--pairs", help="Token shard directories of image-caption pairs, "
                                     "for conditional perplexity (repeat for several)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Report directory (default: CHECKPOINT/eval)."),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="Sequences per forward pass."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", min=2, help="Window length (default: the model's)."),
    max_docs: Optional[int] = typer.Option(None, "--max-docs", min=1, help="Score at most this many documents per input."),
    as_json: bool = JSON_OUT,
):
    """Held-out perplexity (all, text, image), conditional pair perplexity and expert load."""
    from mmtok.trainer.evaluate import evaluate as run_eval, summary_rows, write_report

    if not data and not pairs:
        fail("give --data and/or --pairs token shard directories to evaluate on")
    result = run_eval(str(checkpoint), [str(d) for d in data], [str(p) for p in pairs], batch_size, max_docs, seq_len)
    out = out or checkpoint / "eval"
    result["files"] = write_report(result, out, checkpoint / "metrics.jsonl")
    if as_json:
        sys.stdout.write(json.dumps(result, indent=1, sort_keys=True) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"mmtok eval: {checkpoint}")
    for col in ("measure", "tokens", "loss", "perplexity"):
        t.add_column(col)
    for label, m in summary_rows(result):
        t.add_row(label, str(m["tokens"]), *("-" if m[k] is None else f"{m[k]:.3f}" for k in ("loss", "ppl")))
    Console(stderr=True).print(t)
    Console(stderr=True).print(f"report: {out}/eval.md")


@friendly_errors
def export(
    run: Path = typer.Argument(..., help="Run directory of `mmtok train`."),
    to: Path = typer.Option(..., "--to", help="Output directory: model.safetensors + config.json."),
    as_json: bool = JSON_OUT,
):
    """Write a run's newest checkpoint as safetensors plus a config, for single-process use."""
    from mmtok.trainer.export import export as run_export

    summary = run_export(run, to)
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    else:
        from rich.console import Console

        Console(stderr=True).print(f"exported step {summary['step']} ({summary['parameters']:,} parameters) to {to}")
