"""`mmtok train` as one library call: its options (`TrainOptions`), checked, turned into a
run config and run as a decoder run on a plan, the auxiliary-router stage of such a run, or
a Uni-MoE stage. `cli/train_cmds.py` declares the options, calls `train` and prints the
summary; starting the processes under torchrun (`--nproc`) stays with the command, which
knows its own command line. torch is imported inside."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path


@dataclass
class TrainOptions:
    """Every option of `mmtok train` (None: not given, the run's or the preset's value holds)."""

    out: Path  # a str (a path or a URL) is taken through mmtok.fs.as_location
    plan: Path | None = None
    model: str | None = None
    experts: str | None = None
    routing: str | None = None
    preset: str | None = None
    config: Path | None = None
    sets: list[str] = field(default_factory=list)
    init_from: str | None = None
    resume: bool = False
    steps: int | None = None
    grad_accum: int | None = None
    lr: float | None = None
    warmup: int | None = None
    seed: int | None = None
    ckpt_every: int | None = None
    log_every: int | None = None
    capacity_factor: float | None = None
    swin_norm: bool | None = None
    attention: str | None = None
    compile: bool | None = None
    act_ckpt: bool | None = None
    mixed_precision: str | None = None
    loop_plan: bool | None = None
    stop_at_step: int | None = None
    loader_workers: int = 0
    train_aux_routers: bool = False  # MoMa's auxiliary routers of the run in `out`, main weights frozen
    aux_routers: str | None = None
    mod_capacity: float | None = None
    router_noise: str | None = None
    # --model uni-moe (trainer/unimoe_prep.py)
    stage: str | None = None  # align, experts or tune
    speech: list[Path] = field(default_factory=list)
    audio: list[Path] = field(default_factory=list)
    video: list[Path] = field(default_factory=list)
    image: list[Path] = field(default_factory=list)
    texts: list[Path] = field(default_factory=list)
    tokenizer: Path | None = None
    init: Path | None = None
    speech_encoder: Path | None = None
    queries: int | None = None
    connector_layers: int | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    batch_size: int = 8
    holdout: float = 0.1
    nproc: int = 1
    live: bool = True  # a live progress display (off for --json)

    def train_opts(self) -> dict:
        """The [train] settings given (None where not)."""
        keys = ("steps", "grad_accum", "lr", "warmup", "seed", "ckpt_every", "log_every", "compile", "act_ckpt",
                "mixed_precision")
        return {k: getattr(self, k) for k in keys}


@dataclass
class Outcome:
    kind: str  # "main", "aux-routers", "uni-moe", or "relaunch": start the command again under torchrun
    summary: dict | None = None
    resume: bool = False  # "relaunch": the processes continue the run --init-from just wrote


def train(opts: TrainOptions) -> Outcome:
    """Check `opts` (ValueError naming the option) and run what they ask for. A URL `out`
    (s3://...) is trained into a local copy mirrored to it (mmtok.mirror.remote_output: pulled
    first, so a resume elsewhere continues from the bucket; config, metrics and each finished
    checkpoint pushed while it runs, `checkpoints/latest` after the checkpoint it names)."""
    from mmtok.fs import RemotePath, as_location
    from mmtok.mirror import all_files, remote_output

    opts = replace(opts, out=as_location(opts.out), plan=None if opts.plan is None else as_location(opts.plan))
    if not isinstance(opts.out, RemotePath):
        if opts.out.is_file():
            raise ValueError(f"--out {opts.out} is a file; give the run's directory")
        return _train(opts)
    if opts.nproc > 1 or "WORLD_SIZE" in os.environ:
        raise ValueError(f"--out {opts.out}: a run at a URL is trained from one machine: use `mmtok train --nproc` "
                         "rather than your own torchrun, or train into a shared filesystem")
    with remote_output(opts.out, ours=all_files) as local:
        outcome = _train(replace(opts, out=local))
    if outcome.summary and isinstance(outcome.summary.get("checkpoint"), str):  # name it in the bucket
        outcome.summary["checkpoint"] = outcome.summary["checkpoint"].replace(str(local), str(opts.out), 1)
    return outcome


def _train(opts: TrainOptions) -> Outcome:
    distributed = "WORLD_SIZE" in os.environ
    if opts.init_from is not None and (distributed or opts.resume or opts.model == "uni-moe"
                                       or opts.stage is not None or opts.train_aux_routers):
        raise ValueError("--init-from starts a new run (not uni-moe, not --train-aux-routers, without --resume) and "
                         "writes its first checkpoint before the processes start: use --nproc N rather than your own "
                         "torchrun")
    if opts.nproc > 1 and not distributed and opts.init_from is None:
        return Outcome("relaunch")
    model = opts.model
    if model is None and opts.resume:  # a Uni-MoE run resumes as one without --model repeated
        from mmtok.trainer.unimoe_train import is_unimoe_run

        model = "uni-moe" if is_unimoe_run(opts.out) else None
    if model == "uni-moe":
        return Outcome("uni-moe", _unimoe(opts))
    if opts.stage is not None:
        raise ValueError(f"--stage {opts.stage} is a stage of --model uni-moe (align, experts or tune); for MoMa's "
                         "auxiliary routers use --train-aux-routers")
    base, plan = _resumed(opts)
    if opts.train_aux_routers:
        return Outcome("aux-routers", _aux_routers(opts, plan))
    return _decoder(opts, plan, base)


def _unimoe(opts: TrainOptions) -> dict:
    from mmtok.trainer import unimoe_prep

    if opts.sets or opts.loop_plan is not None:
        raise ValueError("--set and --loop-plan are for runs on a plan (dense, moe, moma, mod-moma), not --model uni-moe")
    cfg, tok = unimoe_prep.stage_config(
        stage=opts.stage, tokenizer=opts.tokenizer, init=opts.init, texts=opts.texts, speech_encoder=opts.speech_encoder,
        sources={m: getattr(opts, m) for m in unimoe_prep.SOURCES},
        model_opts=dict(preset=opts.preset, queries=opts.queries, connector_layers=opts.connector_layers,
                        lora_rank=opts.lora_rank, lora_alpha=opts.lora_alpha, swin_norm=opts.swin_norm,
                        capacity_factor=opts.capacity_factor),
        train_opts=opts.train_opts(), batch_size=opts.batch_size, holdout=opts.holdout)
    return unimoe_prep.train(cfg, tok, opts.out, resume=opts.resume, stop_at_step=opts.stop_at_step, live=opts.live)


def _resumed(opts: TrainOptions):
    """The run's own config when resuming (its settings and plan: no option to repeat), and the plan."""
    from mmtok.fs import as_location
    from mmtok.trainer.config import RunConfig
    from mmtok.trainer.job import CONFIG

    base, plan = None, opts.plan
    if opts.resume and (opts.out / CONFIG).exists():
        from mmtok.shards import read_json

        base = RunConfig.from_dict(read_json(opts.out / CONFIG), where=str(opts.out / CONFIG))
        plan = plan or (as_location(base.plan) if base.plan else None)
    if plan is None and opts.resume and base is None:
        raise ValueError(f"--resume: {opts.out} holds no run (no {CONFIG}); give the --out of the run to continue, "
                         "or leave out --resume and give --plan to start one")
    if plan is None:
        raise ValueError("give --plan (a `mmtok balance-mix` directory)")
    return base, plan


def _aux_routers(opts: TrainOptions, plan: Path) -> dict:
    """MoMa's auxiliary routers, trained after the main run."""
    from mmtok.trainer.aux_routers import train_aux_routers

    if not opts.resume:
        raise ValueError("--train-aux-routers trains the routers of an existing run: pass --resume with its --out")
    return train_aux_routers(opts.out, plan, opts.steps or 200, opts.lr or 1e-2, live=opts.live)


def run_config(opts: TrainOptions, plan: Path, base=None):
    """The RunConfig of a decoder run on `plan`: the preset (or the resumed run's `base`) <
    --config < the options < --set, its vocabulary and sequence length from the plan."""
    from mmtok.fs import absolute
    from mmtok.plan import read_plan_meta
    from mmtok.trainer.config import resolve

    meta = read_plan_meta(plan)
    model_opts = dict(model=opts.model, experts=opts.experts or None, routing=opts.routing,
                      capacity_factor=opts.capacity_factor, swin_norm=opts.swin_norm, attention=opts.attention,
                      aux_routers=opts.aux_routers, mod_capacity=opts.mod_capacity, router_noise=opts.router_noise)
    if opts.init_from is not None:
        model_opts.update({k: v for k, v in chameleon_options(opts.init_from).items() if k != "model"})
    return resolve(opts.preset, model_opts, {**opts.train_opts(), "loop_plan": opts.loop_plan}, opts.config,
                   vocab=meta["vocab"].to_dict(), seq_len=meta["seq_len"], plan=absolute(plan),
                   tokenizer=meta.get("tokenizer"), base=base, sets=opts.sets)


def chameleon_options(init_from: str) -> dict:
    """The model settings of the Hugging Face Chameleon checkpoint `hf:DIR` names."""
    from mmtok.trainer.hf_export import HF_PREFIX, chameleon_options as options

    if not init_from.startswith(HF_PREFIX):
        raise ValueError(f"--init-from {init_from!r}: expected hf:DIR (a Hugging Face Chameleon checkpoint directory)")
    return options(init_from[len(HF_PREFIX):])


def _decoder(opts: TrainOptions, plan: Path, base) -> Outcome:
    from mmtok.loader import PlanLoader
    from mmtok.trainer.train import train as run_train

    cfg = run_config(opts, plan, base)
    resume = opts.resume
    if opts.init_from is not None:
        from mmtok.trainer.hf_export import HF_PREFIX

        _init_from(Path(opts.init_from[len(HF_PREFIX):]), cfg, plan, opts.out, opts.nproc)
        if opts.nproc > 1:  # the processes continue the run just written
            return Outcome("relaunch", resume=True)
        resume = True
    summary = run_train(cfg, opts.out, lambda rank, world: PlanLoader(plan, rank, world, num_workers=opts.loader_workers,
                                                                      loop=cfg.train.loop_plan),
                        resume=resume, stop_at_step=opts.stop_at_step, live=opts.live)
    return Outcome("main", summary)


def _init_from(src: Path, cfg, plan: Path, out: Path, nproc: int) -> None:
    """Write `out` at step 0 from the checkpoint in `src` (trainer/hf_export.py)."""
    from mmtok.loader import PlanLoader
    from mmtok.shards import read_json
    from mmtok.trainer.hf_export import image_range_of, init_run

    have = image_range_of(read_json(src / "config.json").get("vocabulary_map") or {})
    if have is not None and tuple(have) != tuple(cfg.model.image_range):
        raise ValueError(f"{src} has its image tokens at ids {have[0]}..{have[1] - 1}, the plan {plan} at "
                         f"{cfg.model.image_range[0]}..{cfg.model.image_range[1] - 1}: tokenize with "
                         f"`mmtok import-tokenizer chameleon {src}`")
    init_run(src, cfg, out, PlanLoader(plan, 0, 1).state_dict(), nproc * cfg.train.grad_accum, cfg.train.seed)
