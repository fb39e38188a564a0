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

from mmtok.cli.common import JSON_OUT, Exit, eval_report, fail, friendly_errors, positive



def register(app: typer.Typer) -> None:
    app.command(no_args_is_help=True)(train)
    app.command("eval", no_args_is_help=True)(evaluate)
    app.command(no_args_is_help=True)(export)


@friendly_errors
def train(
    plan: Optional[Path] = typer.Option(None, "--plan", file_okay=False, help="Plan directory written by `mmtok balance-mix` "
                                        "(not for --model uni-moe, which reads pairs: see --speech ... --image)."),
    out: Path = typer.Option(..., "--out", "-o", file_okay=False, help="Run directory: config, metrics, TensorBoard, checkpoints."),
    model: str = typer.Option("dense", "--model", help="dense, moe, moma, mod-moma (MoMa + Mixture-of-Depths) or uni-moe."),
    experts: str = typer.Option("", "--experts", help="moma: NtMi layout (4t4i, 1t1i, ...); moe: number of experts."),
    routing: str = typer.Option("expert-choice", "--routing", help="moe routing: expert-choice or top2."),
    preset: str = typer.Option("tiny", "--preset", help="tiny, 90m, 435m or 1.4b (MoMa's Table 1 sizes)."),
    config: Optional[Path] = typer.Option(None, "--config", exists=True, dir_okay=False, help="TOML file with [model] and [train] tables; "
                                          "command-line options override it."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its newest checkpoint."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Optimizer steps in all (default 100)."),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", min=1, help="Micro-batches per rank per optimizer step."),
    lr: Optional[float] = typer.Option(None, "--lr", callback=positive, help="Peak learning rate (default 3e-3)."),
    warmup: Optional[int] = typer.Option(None, "--warmup", min=0, help="Warm-up steps (default 10)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for the initial weights."),
    ckpt_every: Optional[int] = typer.Option(None, "--ckpt-every", min=1, help="Checkpoint every N steps (default 50)."),
    log_every: Optional[int] = typer.Option(None, "--log-every", min=1, help="Metrics every N steps (default 1)."),
    capacity_factor: Optional[float] = typer.Option(None, "--capacity-factor", callback=positive, help="Expert-choice capacity factor."),
    swin_norm: Optional[bool] = typer.Option(None, "--swin-norm/--no-swin-norm", help="Chameleon's norm reordering."),
    attention: Optional[str] = typer.Option(None, "--attention", help="sdpa (default) or flex (GPU only)."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile each block."),
    act_ckpt: Optional[bool] = typer.Option(None, "--act-ckpt/--no-act-ckpt", help="Activation checkpointing per block."),
    mixed_precision: Optional[str] = typer.Option(None, "--mixed-precision", help="auto (bf16 on GPU), bf16 or fp32."),
    stop_at_step: Optional[int] = typer.Option(None, "--stop-at-step", min=1,
                                               help="Checkpoint and stop after this step (continue later with --resume)."),
    loader_workers: int = typer.Option(0, "--loader-workers", min=0, help="Loader worker processes per rank."),
    stage: str = typer.Option("main", "--stage", help="uni-moe: align, experts or tune. Others: main, or "
                              "aux-routers: with --resume, train only the auxiliary "
                              "routers of the run in --out (main weights frozen; --nproc works)."),
    aux_routers: Optional[str] = typer.Option(None, "--aux-routers", help="stage (default: train them later with "
                                              "--stage aux-routers) or joint (alongside, on detached inputs)."),
    mod_capacity: Optional[float] = typer.Option(None, "--mod-capacity", callback=positive, max=1.0, help="mod-moma: share of tokens through "
                                                 "depth-routed layers (default 0.25)."),
    router_noise: Optional[str] = typer.Option(None, "--router-noise", help="none or gumbel (Gumbel-sigmoid noise on "
                                               "expert-choice router logits; for upcycled runs)."),
    # --- --model uni-moe (cli/unimoe_cmds.py; docs/UNIMOE.md) ---
    speech: List[Path] = typer.Option([], "--speech", file_okay=False, help="uni-moe: extract-audio output with whisper.npy (repeat)."),
    audio: List[Path] = typer.Option([], "--audio", file_okay=False, help="uni-moe: extract-audio output with fbank.npy (repeat)."),
    video: List[Path] = typer.Option([], "--video", file_okay=False, help="uni-moe: extract-keyframes output (repeat)."),
    image: List[Path] = typer.Option([], "--image", file_okay=False, help="uni-moe: `mmtok shard` output with image-caption pairs (repeat)."),
    texts: List[Path] = typer.Option([], "--texts", file_okay=False, help="uni-moe: shard directories with the transcripts/captions "
                                     "(default: the ones the features were extracted from)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", file_okay=False, help="uni-moe: `mmtok train-bpe` directory."),
    init: Optional[Path] = typer.Option(None, "--init", help="uni-moe: the previous stage's run (experts, tune), or "
                                        "a dense run / export whose decoder stage align starts from."),
    speech_encoder: Optional[Path] = typer.Option(None, "--speech-encoder", help="uni-moe: Whisper encoder weights "
                                                  "(safetensors); loaded and frozen."),
    queries: Optional[int] = typer.Option(None, "--queries", min=1, help="uni-moe: connector queries per input (default 8)."),
    connector_layers: Optional[int] = typer.Option(None, "--connector-layers", min=1, help="uni-moe: default 4."),
    lora_rank: Optional[int] = typer.Option(None, "--lora-rank", min=1, help="uni-moe: LoRA rank of the experts (default 8)."),
    lora_alpha: Optional[float] = typer.Option(None, "--lora-alpha", callback=positive, help="uni-moe: LoRA alpha (default 16)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="uni-moe: pairs per process per step."),
    holdout: float = typer.Option(0.1, "--holdout", min=0.0, max=0.9, help="uni-moe: share of pairs held out for eval."),
    # --- end uni-moe ---
    nproc: int = typer.Option(1, "--nproc", min=1, help="Start this many processes with torchrun on this machine "
                              "(or launch `torchrun ... mmtok train` yourself for several machines)."),
    as_json: bool = JSON_OUT,
):
    """Train a dense, MoE or MoMa decoder on a balance-mix plan (FSDP2 under torchrun), or a stage of Uni-MoE."""
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        _relaunch(nproc)
        return
    if model == "uni-moe":
        from mmtok.cli.unimoe_cmds import train_unimoe

        train_unimoe(out=out, stage=stage, tokenizer=tokenizer, init=init, texts=texts, speech_encoder=speech_encoder,
                     sources=dict(speech=speech, audio=audio, video=video, image=image),
                     model_opts=dict(preset=preset, queries=queries, connector_layers=connector_layers,
                                     lora_rank=lora_rank, lora_alpha=lora_alpha, swin_norm=swin_norm,
                                     capacity_factor=capacity_factor),
                     train_opts=dict(steps=steps, grad_accum=grad_accum, lr=lr, warmup=warmup, seed=seed,
                                     ckpt_every=ckpt_every, log_every=log_every, compile=compile, act_ckpt=act_ckpt,
                                     mixed_precision=mixed_precision),
                     batch_size=batch_size, holdout=holdout, resume=resume, stop_at_step=stop_at_step, as_json=as_json)
        return
    if plan is None:
        fail("give --plan (a `mmtok balance-mix` directory)")
    from mmtok.loader import PlanLoader, read_plan
    from mmtok.trainer.config import resolve
    from mmtok.trainer.train import train as run_train

    if stage != "main":
        _aux_stage(stage, plan, out, resume, steps, lr, as_json)
        return

    plan_meta, _ = read_plan(plan)
    model_opts = dict(model=model, experts=experts or None, routing=routing, capacity_factor=capacity_factor,
                      swin_norm=swin_norm, attention=attention, aux_routers=aux_routers, mod_capacity=mod_capacity,
                      router_noise=router_noise)
    train_opts = dict(steps=steps, grad_accum=grad_accum, lr=lr, warmup=warmup, seed=seed, ckpt_every=ckpt_every,
                      log_every=log_every, compile=compile, act_ckpt=act_ckpt, mixed_precision=mixed_precision)
    cfg = resolve(preset, model_opts, train_opts, config, vocab=plan_meta["vocab"], seq_len=plan_meta["seq_len"],
                  plan=str(plan.resolve()), tokenizer=plan_meta.get("tokenizer"))
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


def _aux_stage(stage: str, plan: Path, out: Path, resume: bool, steps: Optional[int], lr: Optional[float],
               as_json: bool) -> None:
    """`--stage aux-routers`: MoMa's auxiliary routers, trained after the main run."""
    from mmtok.trainer.moma import train_aux_routers

    if stage != "aux-routers":
        fail(f"unknown --stage {stage!r}; choose main or aux-routers")
    if not resume:
        fail("--stage aux-routers trains the routers of an existing run: pass --resume with its --out")
    summary = train_aux_routers(out, plan, steps or 200, lr or 1e-2)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=1, sort_keys=True) + "\n")
        return
    from rich.console import Console

    final = summary["final"]
    agree = ", ".join(f"{k.removeprefix('agreement_')} {v:.1%}" for k, v in final.items() if k.startswith("agreement_"))
    Console(stderr=True).print(f"[bold]mmtok train --stage aux-routers[/]: {summary['aux_steps']} steps, BCE "
                               f"{final.get('bce', float('nan')):.4f}, agreement with expert choice: {agree}; "
                               f"checkpoint {summary['checkpoint']}")


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
    checkpoint: Path = typer.Option(..., "--checkpoint", file_okay=False, help="A run directory (newest checkpoint) or an `mmtok export` directory."),
    data: List[Path] = typer.Option([], "--data", file_okay=False, help="Held-out token shard directories (repeat for several)."),
    pairs: List[Path] = typer.Option([], "--pairs", file_okay=False, help="Token shard directories of image-caption pairs, "
                                     "for conditional perplexity (repeat for several)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", file_okay=False, help="Report directory (default: CHECKPOINT/eval)."),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="Sequences per forward pass."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", min=2, help="Window length (default: the model's)."),
    max_docs: Optional[int] = typer.Option(None, "--max-docs", min=1, help="Score at most this many documents per input."),
    as_json: bool = JSON_OUT,
):
    """Held-out perplexity (all, text, image), conditional pair perplexity and expert load."""
    from mmtok.trainer.evaluate import evaluate as run_eval, summary_rows, write_report
    from mmtok.trainer.unimoe_train import is_unimoe_run

    if is_unimoe_run(checkpoint):  # held-out pairs of the run's own data (cli/unimoe_cmds.py)
        from mmtok.cli.unimoe_cmds import eval_unimoe

        eval_unimoe(checkpoint, out, batch_size, as_json)
        return
    if not data and not pairs:
        fail("give --data and/or --pairs token shard directories to evaluate on")
    result = run_eval(str(checkpoint), [str(d) for d in data], [str(p) for p in pairs], batch_size, max_docs, seq_len)
    out = out or checkpoint / "eval"
    result["files"] = write_report(result, out, checkpoint / "metrics.jsonl")
    rows = [(label, str(m["tokens"]), *("-" if m[k] is None else f"{m[k]:.3f}" for k in ("loss", "ppl")))
            for label, m in summary_rows(result)]
    eval_report(result, out, f"mmtok eval: {checkpoint}", ("measure", "tokens", "loss", "perplexity"), rows, as_json)


@friendly_errors
def export(
    run: Path = typer.Argument(..., file_okay=False, help="Run directory of `mmtok train`."),
    to: Path = typer.Option(..., "--to", file_okay=False, help="Output directory: model.safetensors + config.json."),
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
