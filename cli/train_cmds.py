"""`mmtok train`, `mmtok eval`, `mmtok export`: the FSDP trainer for dense, MoE and MoMa
models, its evaluator, and export to safetensors. torch is imported inside the commands."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import List, Optional

import typer

from mmtok.cli.common import (JSON_OUT, QUIET, Exit, Terminated, check_inputs, deprecated, eval_report, fail,
                              friendly_errors, not_a_file, positive, pulled, renamed)


def register(app: typer.Typer) -> None:
    app.command(no_args_is_help=True)(train)
    app.command("eval", no_args_is_help=True)(evaluate)
    app.command(no_args_is_help=True)(export)


# Long only because typer declares each of train's options as a parameter (most of its lines);
# the command itself checks, calls `launch.train` and prints.
@friendly_errors
def train(
    plan: Optional[str] = typer.Option(None, "--plan", help="Plan directory written by `mmtok balance-mix`, or its URL "
                                        "(default with --resume: the run's own; not for --model uni-moe, which "
                                        "reads pairs: see --speech ... --image)."),
    out: str = typer.Option(..., "--out", "-o", help="Run directory: config, metrics, TensorBoard, checkpoints; or "
                            "a URL (s3://...), trained in a local copy mirrored to it (docs/REMOTE.md)."),
    model: Optional[str] = typer.Option(None, "--model", help="dense (default), moe, moma, mod-moma (MoMa + "
                                        "Mixture-of-Depths), mot (Mixture-of-Transformers) or uni-moe."),
    experts: Optional[str] = typer.Option(None, "--experts", help="moma: NtMi layout (4t4i, 1t1i, ...); moe: number of experts."),
    routing: Optional[str] = typer.Option(None, "--routing", help="moe routing: expert-choice (default) or top2."),
    preset: Optional[str] = typer.Option(None, "--preset", help="tiny (default), 90m, 435m or 1.4b (MoMa's Table 1 sizes)."),
    config: Optional[Path] = typer.Option(None, "--config", exists=True, dir_okay=False, help="TOML file with [model] and [train] "
                                          "tables (a run's config.toml is one); command-line options override it."),
    set_: List[str] = typer.Option([], "--set", help="Override one setting, e.g. --set train.lr=3e-4 or --set "
                                   "model.z_loss=0 (repeat); applied last, over --config and the options."),
    init_from: Optional[str] = typer.Option(None, "--init-from", help="hf:DIR: start from a Hugging Face Chameleon "
                                            "checkpoint (dense; --model moma/mod-moma upcycles it). The plan must be "
                                            "tokenized with its tokenizer (`mmtok import-tokenizer chameleon DIR`)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its newest checkpoint, with its "
                                "saved model and training settings (options given override the training ones)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Optimizer steps in all (default 100; with --resume, "
                                        "more than the run's extends it)."),
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
    loop_plan: Optional[bool] = typer.Option(None, "--loop-plan/--no-loop-plan", help="At the plan's end, go through it "
                                             "again (default: refuse to start a run longer than the plan)."),
    stop_at_step: Optional[int] = typer.Option(None, "--stop-at-step", min=1,
                                               help="Checkpoint and stop after this step (continue later with --resume)."),
    loader_workers: int = typer.Option(0, "--loader-workers", min=0, help="Loader worker processes per rank."),
    train_aux_routers: bool = typer.Option(False, "--train-aux-routers", help="With --resume: train only the "
                                           "auxiliary routers of the run in --out (main weights frozen; --nproc works)."),
    aux_routers: Optional[str] = typer.Option(None, "--aux-routers", help="stage (default: train them later with "
                                              "--train-aux-routers) or joint (alongside, on detached inputs)."),
    mod_capacity: Optional[float] = typer.Option(None, "--mod-capacity", callback=positive, max=1.0, help="mod-moma: share of tokens through "
                                                 "depth-routed layers (default 0.25)."),
    router_noise: Optional[str] = typer.Option(None, "--router-noise", help="none or gumbel (Gumbel-sigmoid noise on "
                                               "expert-choice router logits; for upcycled runs)."),
    # --- --model uni-moe (trainer/unimoe_prep.py; docs/UNIMOE.md) ---
    stage: Optional[str] = typer.Option(None, "--stage", help="uni-moe: align, experts or tune."),
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
    given = dict(locals())  # the options, by name (TrainOptions uses the same names)
    from mmtok.trainer.launch import TrainOptions, train as launch

    if model != "uni-moe":
        given["stage"], given["train_aux_routers"] = _legacy_stage(stage, train_aux_routers)
    names = {f.name for f in fields(TrainOptions)} - {"sets", "live"}
    opts = TrainOptions(**{k: given[k] for k in names}, sets=set_, live=not as_json)
    with _staged_for_processes(out, nproc) as here:
        outcome = launch(replace(opts, out=here))
        if outcome.kind == "relaunch":
            _relaunch(nproc, _without_init_from(sys.argv[1:]) + ["--resume"] if outcome.resume else None, out=(out, here))
            return
    if int(os.environ.get("RANK", "0")) != 0:
        return
    summary = outcome.summary
    if os.environ.get(OUT_AS) and isinstance(summary.get("checkpoint"), str):  # name it in the bucket
        summary["checkpoint"] = summary["checkpoint"].replace(out, os.environ[OUT_AS], 1)
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    elif outcome.kind == "uni-moe":
        from mmtok.cli.unimoe_cmds import print_stage

        print_stage(summary, opts.stage)
    elif outcome.kind == "aux-routers":
        _print_aux_routers(summary)
    else:
        from rich.console import Console

        Console(stderr=True).print(f"[bold]mmtok train[/]: {summary['status']} at step {summary['step']}/{summary['steps']}"
                                   f" on {summary['world_size']} process(es); checkpoint {summary['checkpoint']}")
    if summary.get("status") == "interrupted" and outcome.kind == "aux-routers":
        fail(f"interrupted after {summary['aux_steps']} auxiliary-router steps; the routers trained so far are saved "
             "into the run's checkpoint; run the stage again to train them further (its steps start again)",
             Exit.INTERRUPTED)
    if summary.get("status") == "interrupted":
        fail(f"interrupted at step {summary['step']}; checkpoint saved; continue with --resume", Exit.INTERRUPTED)


def _staged_for_processes(out: str, nproc: int):
    """With --nproc and a URL --out, the local copy of the run this process mirrors to the URL
    while the processes it starts train into it (mmtok.mirror.remote_output); else OUT."""
    from mmtok.fs import is_url
    from mmtok.mirror import all_files, remote_output

    if is_url(out) and nproc > 1 and "WORLD_SIZE" not in os.environ:
        return remote_output(out, ours=all_files)
    return contextlib.nullcontext(out)


def _legacy_stage(stage: Optional[str], train_aux_routers: bool) -> tuple[Optional[str], bool]:
    """`--stage main` and `--stage aux-routers`, the old spellings for runs on a plan (--stage now
    names Uni-MoE's stages only): still accepted, with a deprecation line."""
    if stage == "main":
        deprecated("--stage main", "no --stage (it is the default)")
        return None, train_aux_routers
    if stage == "aux-routers":
        deprecated("--stage aux-routers", "--train-aux-routers")
        return None, True
    return stage, train_aux_routers


def _without_init_from(args: list[str]) -> list[str]:
    """The command line without its --init-from (the processes resume the run it wrote)."""
    i = args.index("--init-from") if "--init-from" in args else None
    return args[:i] + args[i + 2:] if i is not None else [a for a in args if not a.startswith("--init-from=")]


def _print_aux_routers(summary: dict) -> None:
    from rich.console import Console

    final = summary["final"]
    agree = ", ".join(f"{k.removeprefix('agreement_')} {v:.1%}" for k, v in final.items() if k.startswith("agreement_"))
    Console(stderr=True).print(f"[bold]mmtok train --train-aux-routers[/]: {summary['aux_steps']} steps, BCE "
                               f"{final.get('bce', float('nan')):.4f}, agreement with expert choice: {agree}; "
                               f"checkpoint {summary['checkpoint']}")


OUT_AS = "MMTOK_OUT_AS"  # set for the processes `_relaunch` starts: the URL their --out is the staged copy of


def _relaunch(nproc: int, args: list[str] | None = None, out: tuple[str, Path] | None = None) -> None:
    """Run this same command (or `args`) under torchrun with `nproc` processes on this machine.
    `out`: (--out as given, the directory the processes write): for a URL, the local copy
    this process mirrors to it while they run."""
    from mmtok.fs import is_url

    args = sys.argv[1:] if args is None else args
    i = args.index("--nproc") if "--nproc" in args else None
    if i is None:
        args = [a for a in args if not a.startswith("--nproc=")]
    else:
        del args[i:i + 2]
    env = dict(os.environ)
    # each process its share of the cores it may use (torchrun would set 1 and print a banner)
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // nproc)))
    # a forwarded SIGTERM gives the workers time to save their checkpoint (torchrun's default: 30 s, then SIGKILL)
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600")
    if out is not None and is_url(out[0]):
        args, env[OUT_AS] = _with_out(args, str(out[1])), out[0]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "mmtok.cli.app", *args]
    proc = subprocess.Popen(cmd, env=env)
    while True:
        try:
            rc = proc.wait()
            break
        except Terminated:  # sent to this process alone: torchrun passes it on, the workers checkpoint and exit
            proc.send_signal(signal.SIGTERM)
        except KeyboardInterrupt:  # Ctrl-C reached the workers too: they checkpoint and exit; wait for them
            continue
    if rc:
        raise typer.Exit(rc)


def _with_out(args: list[str], out: str) -> list[str]:
    """The command line with its --out (-o) value replaced."""
    got = []
    for i, a in enumerate(args):
        if i and args[i - 1] in ("--out", "-o"):
            a = out
        elif a.startswith("--out="):
            a = f"--out={out}"
        got.append(a)
    return got


@friendly_errors
def evaluate(
    run: Optional[str] = typer.Argument(None, metavar="RUN", help="A run directory (newest checkpoint) or an `mmtok export` "
                                       "directory; a URL is pulled into the cache first (docs/REMOTE.md)."),
    old_checkpoint: Optional[str] = typer.Option(None, "--checkpoint", hidden=True, help="Old spelling of the RUN argument."),
    data: List[str] = typer.Option([], "--data", help="Held-out token shard directories or URLs, read in place (repeat "
                                   "for several)."),
    pairs: List[str] = typer.Option([], "--pairs", help="Token shard directories (or URLs) of image-caption pairs, "
                                    "for conditional perplexity (repeat for several)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Report directory or URL (default: RUN/eval)."),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="Sequences per forward pass."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", min=2, help="Window length (default: the model's)."),
    max_docs: Optional[int] = typer.Option(None, "--max-docs", min=1, help="Score at most this many documents per input."),
    lm_eval_tasks: Optional[str] = typer.Option(None, "--lm-eval", help="lm-evaluation-harness tasks (comma-separated) "
                                                "through its stock `hf` model type; results in OUT/lm_eval.json. RUN is an "
                                                "`mmtok export --format hf` directory, or a run exported to OUT/hf first "
                                                "(give --tokenizer). Needs pip install 'mmtok[eval]'."),
    lm_eval_include: Optional[Path] = typer.Option(None, "--lm-eval-tasks", exists=True, file_okay=False,
                                                   help="A directory of your own task YAML files for --lm-eval."),
    lm_eval_limit: Optional[int] = typer.Option(None, "--lm-eval-limit", min=1, help="At most this many documents per task."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="--lm-eval on a run: the "
                                            "tokenizer directory (or URL) it was trained with (bundled into the export)."),
    as_json: bool = JSON_OUT,
    quiet: bool = QUIET,
):
    """Held-out perplexity (all, text, image), conditional pair perplexity and expert load.

    Example: mmtok eval run/ --data heldout-tokens/ --pairs pair-tokens/
    """
    from mmtok.mirror import all_files, remote_output
    from mmtok.trainer.evaluate import evaluate as run_eval, summary_rows, write_report
    from mmtok.trainer.unimoe_train import is_unimoe_run

    given = renamed(run, old_checkpoint, "RUN", "--checkpoint")
    if given is None:
        fail("give RUN, the run (or `mmtok export`) directory to evaluate")
    not_a_file(out)
    check_inputs([*data, *pairs], shard_dirs=True)
    with contextlib.ExitStack() as stack:  # URLs: the run pulled, the report pushed when done
        checkpoint, tokenizer = pulled(stack, str(given)), pulled(stack, tokenizer)
        out = stack.enter_context(remote_output(out or f"{str(given).rstrip('/')}/eval", ours=all_files))
        if is_unimoe_run(checkpoint):  # held-out pairs of the run's own data (cli/unimoe_cmds.py)
            from mmtok.cli.unimoe_cmds import eval_unimoe

            eval_unimoe(checkpoint, out, batch_size, as_json)
            return
        if not data and not pairs and not lm_eval_tasks:
            fail("give --data and/or --pairs token shard directories to evaluate on (or --lm-eval TASKS)")
        if lm_eval_tasks:
            from mmtok.trainer.hf_export import run_lm_eval

            harness = run_lm_eval(checkpoint, [t.strip() for t in lm_eval_tasks.split(",") if t.strip()],
                                  out, lm_eval_include, lm_eval_limit, tokenizer)
            if not data and not pairs:
                _harness_report(harness, out, as_json)
                return
        result = run_eval(str(checkpoint), data, pairs, batch_size, max_docs, seq_len,
                          progress=not quiet and not as_json)
        result["files"] = write_report(result, out, checkpoint / "metrics.jsonl")
        if lm_eval_tasks:
            result["lm_eval"] = harness
        rows = [(label, str(m["tokens"]), *("-" if m[k] is None else f"{m[k]:.3f}" for k in ("loss", "ppl")))
                for label, m in summary_rows(result)]
        eval_report(result, out, f"mmtok eval: {given}", ("measure", "tokens", "loss", "perplexity"), rows, as_json)
        if not as_json:
            from rich.console import Console
            from rich.markup import escape

            for note in result.get("notes", []):
                Console(stderr=True).print(f"[bold yellow]warning:[/] {escape(note)}", highlight=False)


def _harness_report(results: dict, out: Path, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps({"lm_eval": results}, indent=1, sort_keys=True, default=str) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title="lm-evaluation-harness")
    for col in ("task", "metric", "value"):
        t.add_column(col)
    for task, metrics in results.items():
        for k, v in metrics.items():
            if isinstance(v, float):
                t.add_row(task, k, f"{v:.4f}")
    Console(stderr=True).print(t)
    Console(stderr=True).print(f"results: {out}/lm_eval.json")


@friendly_errors
def export(
    run: str = typer.Argument(..., metavar="RUN", help="Run directory of `mmtok train` (a URL is pulled into the cache first)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output directory or URL: model.safetensors + config.json."),
    old_to: Optional[str] = typer.Option(None, "--to", hidden=True, help="Old spelling of --out."),
    fmt: str = typer.Option("mmtok", "--format", help="mmtok (safetensors + config.json, for mmtok) or hf (a Hugging "
                            "Face model directory: transformers' Chameleon for dense models with Chameleon's QK-norm, "
                            "else its own modelling code, trust_remote_code=True)."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="The tokenizer directory (or URL) the model "
                                            "was trained with, bundled into the export (required for --format hf)."),
    as_json: bool = JSON_OUT,
    quiet: bool = QUIET,
):
    """Write a run's newest checkpoint as safetensors plus a config, for single-process use.

    Example: mmtok export run/ --out model/
    """
    from mmtok.trainer.export import export as run_export

    from mmtok.fs import absolute
    from mmtok.mirror import all_files, remote_output

    to = renamed(out, old_to, "--out", "--to")
    if to is None:
        fail("give --out, the directory to export to")
    not_a_file(to)
    with contextlib.ExitStack() as stack:
        local_run, tok = pulled(stack, run), pulled(stack, tokenizer)
        target = stack.enter_context(remote_output(str(to), ours=all_files))
        summary = run_export(local_run, target, fmt, tok, progress=not quiet and not as_json, source=absolute(run))
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    else:
        from rich.console import Console

        Console(stderr=True).print(f"exported step {summary['step']} ({summary['parameters']:,} parameters) to {to}")
