"""The training loop: one process or many under torchrun (FSDP2).

A run directory holds:
  config.json            the full resolved config (model, train, plan)
  config.toml            the same, as a file `mmtok train --config` reads
  metrics.jsonl          one record per log interval (rank 0)
  tb/                    TensorBoard event files
  checkpoints/step-NNNNNNNN/   torch.distributed.checkpoint (model + optimizer), plus
                         train_state.json (step, schedule, model config) and
                         rank-R.json (that rank's loader position and RNG state)
  checkpoints/latest     name of the newest complete checkpoint
  .mmtok.lock            held by rank 0 while the run trains: one trainer per run directory

Checkpoints (trainer/checkpoint.py, the one manager) are written into a temporary
directory and renamed when every rank has finished, so `latest` always names a complete
one. Each lists its files' sha256 in checksums.json and is read through `checkpoint_io`
(nothing in it is unpickled freely); `--resume` skips a damaged one for the newest intact
one. The loop saves every `ckpt_every` steps, at the end, and when SIGINT/SIGTERM arrives
(after the step in flight). Resuming restores model, optimizer, schedule, data position
and RNG, so the losses continue exactly as in an uninterrupted run.

`run_job` trains any `Job` (trainer/job.py); `DecoderJob` here and
`unimoe_train.UniMoEJob` are the two.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from mmtok.locks import LOCK_FILE, exclusive
from mmtok.shards import atomic_write, read_json
from mmtok.trainer.checkpoint import (CKPT_DIR, LATEST, TRAIN_STATE, Checkpointer, checkpoint_step, intact_checkpoint,
                                      latest_checkpoint, loader_position)
from mmtok.trainer.config import RunConfig, to_toml
from mmtok.trainer.job import CONFIG, CONFIG_TOML, METRICS, Job, RunKind, TrainError, json_bytes
from mmtok.trainer.metrics import Metrics, accumulate, live_bar, memory_gb, peak_flops, reduce_interval
from mmtok.trainer.model import Decoder, expert_load, flops_per_token, is_aux_param, loss_terms
from mmtok.trainer.parallel import init_distributed, parallelize, use_bf16


class GlobalBatchChanged(UserWarning):
    """A run resumed with another processes x --grad-accum than its checkpoint was trained with."""


def lr_at(step: int, tc) -> float:
    """Linear warm-up to `lr`, then cosine decay to `lr * min_lr_ratio` at the last step."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    frac = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def build_optimizer(model: torch.nn.Module, tc) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: frozen ones (auxiliary routers outside their
    stage, Uni-MoE's frozen parts) get no state and never move."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]  # matrices; norms' gains are not decayed
    rest = [p for p in params if p.ndim < 2]
    # Fused on GPUs: at 435m the expert models' optimizer step is ~30% of a step otherwise.
    on_gpu = next(model.parameters()).is_cuda
    return torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=tc.lr, betas=tc.betas, fused=on_gpu, foreach=not on_gpu)


def from_rank0(fn: Callable, rank: int, world: int):
    """`fn()` on rank 0 only (it takes the lock, hashes files, checks the run), its result or
    its refusal shared with every rank, so that all ranks go on or stop together."""
    if world == 1:
        return fn()
    box = [None, None]
    if rank == 0:
        try:
            box[0] = fn()
        except BaseException as e:
            box[1] = str(e)
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise TrainError(f"rank 0: {box[1]}")
    return box[0]


def check_same_model(saved: dict, current: dict, where: str) -> None:
    diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if diff:
        detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in diff)
        raise TrainError(f"{where} is from another model ({detail}); use a new --out, or the same model options")


class _Stop:
    """Set by SIGINT/SIGTERM; the loop checkpoints after the step in flight and exits."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, h in self._old.items():
            signal.signal(sig, h)
        return False


class DecoderJob:
    """`mmtok train` of a Decoder (dense, moe, moma, mod-moma) on a balance-mix plan: the
    `Job` (trainer/job.py) that the loop in `run_job` trains; `unimoe_train.UniMoEJob` is
    the other one."""

    def __init__(self, cfg: RunConfig, make_loader: Callable[[int, int], object]):
        self.cfg, self.train, self.data = cfg, cfg.train, cfg.plan or "the data"
        self._make_loader = make_loader

    def make_loader(self, rank: int, world: int):
        return self._make_loader(rank, world)

    def check_resume(self, saved: dict, where: str) -> None:
        """Resuming may change training options (more steps, ...), not the model."""
        check_same_model(RunConfig.from_dict(saved).as_dict()["model"], self.cfg.as_dict()["model"], where)

    def build(self, device: torch.device) -> torch.nn.Module:
        if self.cfg.model.attention == "flex" and device.type != "cuda":
            raise TrainError("--attention flex needs a GPU (PyTorch's flex attention has no CPU backward); use sdpa")
        return DECODER.build(self.cfg)

    def config_files(self) -> dict[str, bytes]:
        # config.toml: the same settings in the form `--config` reads
        return {CONFIG: json_bytes(self.cfg.as_dict()), CONFIG_TOML: to_toml(self.cfg).encode()}

    def files(self) -> dict:
        return {}

    def checkpoint_meta(self, world: int) -> dict:
        return self.cfg.checkpoint_meta(world)

    def forward(self, model, batch: dict) -> tuple[dict, list[dict], dict]:
        # the fused head (chunked cross-entropy): the full logits never exist
        logits, stats = model(batch["input_ids"], batch["positions"], batch["doc_ids"], targets=batch["targets"])
        terms = loss_terms(self.cfg.model, logits, batch["targets"], stats)
        groups = {"text": (terms["text_nll"], terms["text_n"]), "image": (terms["image_nll"], terms["image_n"])}
        return terms, stats, groups

    def flops_per_token(self) -> float | None:
        return flops_per_token(self.cfg.model, self.cfg.model.max_seq_len)

    def summary(self) -> dict:
        return {}


DECODER = RunKind("decoder", lambda d, where: RunConfig.from_dict(d, where=where), lambda cfg: Decoder(cfg.model),
                  "pass the --out directory of `mmtok train`")


def train(cfg: RunConfig, run: str | Path, make_loader: Callable[[int, int], object], **kw) -> dict:
    """Train `cfg` into `run`. `make_loader(rank, world)` gives an iterator of batches (the
    PlanLoader contract) with state_dict/load_state_dict. Returns a summary dict (rank 0's view)."""
    return run_job(DecoderJob(cfg, make_loader), run, **kw)


def run_job(job: Job, run: str | Path, *, resume: bool = False, stop_at_step: int | None = None,
            live: bool = True) -> dict:
    """The training loop every job runs: FSDP2 under torchrun, gradient accumulation,
    clipping, the schedule, metrics, checkpoints, resume and SIGTERM."""
    run = Path(run)
    rank, world, device = init_distributed()
    with contextlib.ExitStack() as held:
        def claim() -> Path | None:
            # All ranks share the run directory, so rank 0 alone locks it, until the run ends
            # (a `--nproc` launcher trains nothing and takes no lock).
            held.enter_context(exclusive(run))
            ckpt = intact_checkpoint(run, fallback=True) if resume else None
            _check_run_dir(run, job, resume, ckpt)
            return ckpt

        # Checked before anything is written or trained; every rank stops with rank 0's message.
        ckpt_path = from_rank0(claim, rank, world)
        loader, end = _start(job, run, rank, world, ckpt_path, stop_at_step)
        return _train(job, run, rank, world, device, loader, ckpt_path, end, live)


def _start(job: Job, run: Path, rank: int, world: int, ckpt_path: Path | None, stop_at_step) -> tuple[object, int]:
    """The loader at the checkpoint's position and the last step to train, checked against
    each other before anything is written."""
    tc = job.train
    loader = job.make_loader(rank, world)
    saved = read_json(ckpt_path / TRAIN_STATE) if ckpt_path else {}
    start = checkpoint_step(ckpt_path) if ckpt_path else 0
    end = min(tc.steps, stop_at_step) if stop_at_step else tc.steps
    if saved.get("global_batch", world * tc.grad_accum) != world * tc.grad_accum and rank == 0:
        warnings.warn(f"{ckpt_path}: trained with {saved['global_batch']} micro-batches per step (processes x "
                      f"--grad-accum), resumed with {world} x {tc.grad_accum}: the data continues where it stopped, "
                      "but each step now averages another number of micro-batches", GlobalBatchChanged, stacklevel=2)
    if ckpt_path:
        loader.load_state_dict(loader_position(ckpt_path))
    if rank == 0 and hasattr(loader, "describe"):  # how the plan's ranks and steps map to this run's
        print(loader.describe(world, tc.grad_accum, start, end), file=sys.stderr, flush=True)
    # endless loaders have no length; a looping plan has one but starts again at its end
    if hasattr(loader, "__len__") and not getattr(loader, "loop", False) and len(loader) < (end - start) * tc.grad_accum:
        raise TrainError(f"{job.data}: {len(loader)} micro-batches per rank left, but steps "
                         f"{start}..{end} with grad_accum {tc.grad_accum} need {(end - start) * tc.grad_accum}; "
                         "make a longer plan (balance-mix --steps), lower --steps, or pass --loop-plan to go "
                         "through the plan again")
    return loader, end


def _build(job: Job, run: Path, rank: int, world: int, device) -> torch.nn.Module:
    """The job's model, its run files written, parallelised for training."""
    tc = job.train
    torch.manual_seed(tc.seed)
    model = job.build(device)  # same seed on every rank: identical initial weights before sharding
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        for name, content in job.config_files().items():
            atomic_write(run / name, content)
        for name, content in job.files().items():
            atomic_write(run / name, json_bytes(content))
    if world > 1:
        dist.barrier()
    return parallelize(model, world, device, bf16=use_bf16(tc, device), act_ckpt=tc.act_ckpt, compile=tc.compile).train()


def _train(job: Job, run: Path, rank: int, world: int, device, loader, ckpt_path: Path | None, end: int,
           live: bool) -> dict:
    tc = job.train
    model = _build(job, run, rank, world, device)
    optimizer = build_optimizer(model, tc)
    ckpt = Checkpointer(run, rank, world)
    step = ckpt.load(ckpt_path, model, optimizer, loader) if ckpt_path else 0
    metrics = Metrics(run, rank, step)
    flops_tok = job.flops_per_token()
    peak = peak_flops(device)
    batches = iter(loader)
    status, last_saved = "finished", step if ckpt_path else -1
    t_log, interval_tokens = time.perf_counter(), 0.0
    fsdp = hasattr(model, "set_requires_gradient_sync")
    # the auxiliary routers (joint mode) stay out of the clipping norm: they must not change the model's updates
    clipped = [p for n, p in model.named_parameters() if p.requires_grad and not is_aux_param(n)]
    with _Stop() as stop, live_bar(live and rank == 0, tc.steps, step) as bar:
        while step < end:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, tc)
            acc = None
            for micro in range(tc.grad_accum):
                try:
                    batch = next(batches)
                except StopIteration:
                    status = "plan exhausted"
                    break
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                if fsdp:
                    model.set_requires_gradient_sync(micro == tc.grad_accum - 1)
                terms, stats, groups = job.forward(model, batch)
                (terms["loss"] / tc.grad_accum).backward()
                acc = accumulate(acc, terms, groups, expert_load(stats), (batch["doc_ids"] > 0).sum())
            if status != "finished":
                break
            grad_norm = torch.nn.utils.clip_grad_norm_(clipped, tc.grad_clip, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            interval_tokens = interval_tokens + acc["tokens_real"]  # on the device: no sync per step
            if step % tc.log_every == 0 or step == end:
                acc["tokens_real"] = interval_tokens  # throughput counts every step since the last record
                rec = reduce_interval(acc, world, tc.grad_accum)
                dt = time.perf_counter() - t_log
                rec["tokens"] = rec.pop("tokens_real")
                rec.update(step=step, lr=lr_at(step - 1, tc), grad_norm=float(_full(grad_norm)),
                           tokens_per_s=rec["tokens"] / dt, memory_gb=memory_gb(device))
                if peak and flops_tok:
                    rec["mfu"] = rec["tokens_per_s"] * flops_tok / (peak * world)
                metrics.write(rec)
                bar(step, rec)
                t_log, interval_tokens = time.perf_counter(), 0.0
            if _any(stop.requested, world, device):
                status = "interrupted"
                break
            if step % tc.ckpt_every == 0 and step < end:
                ckpt.save(step, model, optimizer, loader, job.checkpoint_meta(world))
                last_saved = step
        if step != last_saved:
            ckpt.save(step, model, optimizer, loader, job.checkpoint_meta(world))
    metrics.close()
    if status == "finished" and step < tc.steps:
        status = "stopped"
    return {"run": str(run), "status": status, "step": step, "steps": tc.steps, "world_size": world,
            "checkpoint": str(latest_checkpoint(run)), **job.summary()}


def _check_run_dir(run: Path, job: Job, resume: bool, ckpt_path: Path | None) -> None:
    cfg_path = run / CONFIG
    if resume:
        if ckpt_path is None:
            raise TrainError(f"{run}: nothing to resume (no checkpoint); run without --resume to start it")
        job.check_resume(json.loads(cfg_path.read_text()), str(ckpt_path))
        return
    ckpts = run / CKPT_DIR
    if (ckpts / LATEST).exists() or any(ckpts.glob("step-*")):
        raise TrainError(f"{run} already holds a run; pass --resume to continue it, or use a new --out")
    # A run stopped before its first checkpoint left only what the trainer writes (config,
    # metrics and TensorBoard files are replaced; a half-saved checkpoint is never read):
    # start it again there. Anything else is a user's: refuse rather than mix in with it.
    ours = {CONFIG, CONFIG_TOML, METRICS, CKPT_DIR, "tb", LOCK_FILE, *job.files()}
    foreign = sorted(p.name for p in run.iterdir() if p.name not in ours) if run.is_dir() else []
    if not foreign and cfg_path.exists() and not _is_run_config(cfg_path):
        foreign = [CONFIG]
    if foreign:
        raise TrainError(f"{run} holds files that `mmtok train` did not write ({', '.join(foreign[:5])}); "
                         "use a new or empty --out")


def _is_run_config(path: Path) -> bool:
    try:
        d = json.loads(path.read_text())
    except ValueError:
        return False
    return isinstance(d, dict) and isinstance(d.get("model"), dict) and isinstance(d.get("train"), dict)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _any(flag: bool, world: int, device) -> bool:
    if world == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
