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
(after the step in flight). Resuming a run restores model, optimizer, schedule, data
position and RNG, so the losses continue exactly as in an uninterrupted run (the
auxiliary-router stage, a short stage on a finished run, starts again instead).

`run_job` trains every `Job` (trainer/job.py): `LMJob`'s two here (`DecoderJob`, and
`unimoe_train.UniMoEJob`), the auxiliary-router stage (`aux_routers.AuxRouterJob`) and VQ
training (`vq_train.VQJob`).
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

from mmtok import runner
from mmtok.locks import LOCK_FILE, exclusive
from mmtok.shards import atomic_write, read_json
from mmtok.trainer.checkpoint import (CKPT_DIR, LATEST, TRAIN_STATE, Checkpointer, intact_checkpoint,
                                      latest_checkpoint, loader_position)
from mmtok.trainer.config import RunConfig, to_toml
from mmtok.trainer.job import CONFIG, CONFIG_TOML, METRICS, Job, RunKind, TrainError, json_bytes
from mmtok.trainer.metrics import LOSSES, Metrics, accumulate, memory_gb, peak_flops, reduce_interval
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


class LMJob(Job):
    """A language-model job on its own run directory: `--resume` continues it, the step is
    gradient accumulation over `grad_accum` micro-batches, clipping and the cosine schedule
    (`lr_at`), and the record is the interval's losses, per-group NLL, expert load,
    throughput and MFU. `DecoderJob` and `unimoe_train.UniMoEJob` are the two; each brings
    its model, forward pass, run files and checkpoint fields."""

    def __init__(self, cfg, make_loader: Callable[[int, int], object]):
        self.cfg, self.train, self._make_loader = cfg, cfg.train, make_loader
        self._acc, self._tokens, self._grad_norm = None, 0.0, None

    # what each LM job brings
    def model(self, device: torch.device) -> torch.nn.Module:
        """The model to train, on CPU, starting weights loaded."""
        raise NotImplementedError

    def config_files(self) -> dict[str, bytes]:
        """config.json (and what else records the settings), as the run directory keeps them."""
        raise NotImplementedError

    def files(self) -> dict[str, dict]:
        """Further JSON files of the run directory (after `model`; their names before it too)."""
        return {}

    def check_resume(self, saved: dict, where: str) -> None:
        """Raise TrainError unless the run's saved config.json may continue as this job."""
        raise NotImplementedError

    def forward(self, model, batch: dict) -> tuple[dict, list[dict], dict]:
        """Loss terms (`loss`, ...), routing statistics, and (NLL sum, token count) per reported group."""
        raise NotImplementedError

    def flops_per_token(self) -> float | None:
        """Training FLOPs per token for MFU (None: not reported)."""
        return None

    # the Job
    def claim(self, run: Path, resume: bool, world: int) -> Path | None:
        ckpt = intact_checkpoint(run, fallback=True) if resume else None
        _check_run_dir(run, self, resume, ckpt)
        return ckpt

    def make_loader(self, rank: int, world: int, ckpt: Path | None, start: int, end: int):
        """The loader at the checkpoint's position, checked against the steps to train before
        anything is written."""
        tc = self.train
        loader = self._make_loader(rank, world)
        saved = read_json(ckpt / TRAIN_STATE) if ckpt else {}
        if saved.get("global_batch", world * tc.grad_accum) != world * tc.grad_accum and rank == 0:
            warnings.warn(f"{ckpt}: trained with {saved['global_batch']} micro-batches per step (processes x "
                          f"--grad-accum), resumed with {world} x {tc.grad_accum}: the data continues where it "
                          "stopped, but each step now averages another number of micro-batches", GlobalBatchChanged,
                          stacklevel=2)
        if ckpt:
            loader.load_state_dict(loader_position(ckpt))
        if rank == 0 and hasattr(loader, "describe"):  # how the plan's ranks and steps map to this run's
            print(loader.describe(world, tc.grad_accum, start, end), file=sys.stderr, flush=True)
        # endless loaders have no length; a looping plan has one but starts again at its end
        if hasattr(loader, "__len__") and not getattr(loader, "loop", False) and len(loader) < (end - start) * tc.grad_accum:
            raise TrainError(f"{self.data}: {len(loader)} micro-batches per rank left, but steps "
                             f"{start}..{end} with grad_accum {tc.grad_accum} need {(end - start) * tc.grad_accum}; "
                             "make a longer plan (balance-mix --steps), lower --steps, or pass --loop-plan to go "
                             "through the plan again")
        return loader

    def build(self, run: Path, rank: int, world: int, device) -> torch.nn.Module:
        tc = self.train
        torch.manual_seed(tc.seed)
        model = self.model(device)  # same seed on every rank: identical initial weights before sharding
        if rank == 0:
            run.mkdir(parents=True, exist_ok=True)
            for name, content in self.config_files().items():
                atomic_write(run / name, content)
            for name, content in self.files().items():
                atomic_write(run / name, json_bytes(content))
        if world > 1:
            dist.barrier()
        self._device, self._peak = device, peak_flops(device)
        return parallelize(model, world, device, bf16=use_bf16(tc, device), act_ckpt=tc.act_ckpt,
                           compile=tc.compile).train()

    def optimizers(self, model) -> tuple:
        # the auxiliary routers (joint mode) stay out of the clipping norm: they must not change the model's updates
        self._clipped = [p for n, p in model.named_parameters() if p.requires_grad and not is_aux_param(n)]
        return (build_optimizer(model, self.train),)

    def step(self, model, optimizers: tuple, batches, step: int) -> bool:
        tc, (optimizer,) = self.train, optimizers
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, tc)
        acc = None
        for micro in range(tc.grad_accum):
            batch = next(batches, None)
            if batch is None:
                return False
            batch = {k: v.to(self._device, non_blocking=True) for k, v in batch.items()}
            if hasattr(model, "set_requires_gradient_sync"):  # FSDP: reduce gradients on the last micro-batch only
                model.set_requires_gradient_sync(micro == tc.grad_accum - 1)
            terms, stats, groups = self.forward(model, batch)
            (terms["loss"] / tc.grad_accum).backward()
            acc = accumulate(acc, terms, groups, expert_load(stats), (batch["doc_ids"] > 0).sum())
        self._grad_norm = torch.nn.utils.clip_grad_norm_(self._clipped, tc.grad_clip, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self._acc, self._tokens = acc, self._tokens + acc["tokens_real"]  # on the device: no sync per step
        return True

    def record(self, step: int, seconds: float, world: int) -> dict:
        acc = {**self._acc, "tokens_real": self._tokens}  # throughput counts every step since the last record
        rec = reduce_interval(acc, world, self.train.grad_accum)
        rec["tokens"] = rec.pop("tokens_real")
        rec.update(step=step, lr=lr_at(step - 1, self.train), grad_norm=float(_full(self._grad_norm)),
                   tokens_per_s=rec["tokens"] / seconds, memory_gb=memory_gb(self._device))
        flops_tok = self.flops_per_token()
        if self._peak and flops_tok:
            rec["mfu"] = rec["tokens_per_s"] * flops_tok / (self._peak * world)
        self._tokens = 0.0
        return rec

    def describe(self, rec: dict) -> str:
        groups = " ".join(f"{k[:-5].removeprefix('text_given_')} {v:.3f}" for k, v in rec.items()
                          if k.endswith("_loss") and k not in LOSSES and v is not None)
        return f"loss {rec['loss']:.3f} {groups} {rec['tokens_per_s']:.0f} tok/s"

    def checkpoint_meta(self, world: int) -> dict:
        return self.cfg.checkpoint_meta(world)

    def summary(self, run: Path, rank: int, step: int, status: str) -> dict:
        if status == "finished" and step < self.train.steps:
            status = "stopped"
        return {"status": status, "steps": self.train.steps, "checkpoint": str(latest_checkpoint(run))}


class DecoderJob(LMJob):
    """`mmtok train` of a Decoder (dense, moe, moma, mod-moma) on a balance-mix plan."""

    def __init__(self, cfg: RunConfig, make_loader: Callable[[int, int], object]):
        super().__init__(cfg, make_loader)
        self.data = cfg.plan or "the data"

    def check_resume(self, saved: dict, where: str) -> None:
        """Resuming may change training options (more steps, ...), not the model."""
        check_same_model(RunConfig.from_dict(saved).as_dict()["model"], self.cfg.as_dict()["model"], where)

    def model(self, device: torch.device) -> torch.nn.Module:
        if self.cfg.model.attention == "flex" and device.type != "cuda":
            raise TrainError("--attention flex needs a GPU (PyTorch's flex attention has no CPU backward); use sdpa")
        return DECODER.build(self.cfg)

    def config_files(self) -> dict[str, bytes]:
        # config.toml: the same settings in the form `--config` reads
        return {CONFIG: json_bytes(self.cfg.as_dict()), CONFIG_TOML: to_toml(self.cfg).encode()}

    def forward(self, model, batch: dict) -> tuple[dict, list[dict], dict]:
        # the fused head (chunked cross-entropy): the full logits never exist
        logits, stats = model(batch["input_ids"], batch["positions"], batch["doc_ids"], targets=batch["targets"])
        terms = loss_terms(self.cfg.model, logits, batch["targets"], stats)
        groups = {"text": (terms["text_nll"], terms["text_n"]), "image": (terms["image_nll"], terms["image_n"])}
        return terms, stats, groups

    def flops_per_token(self) -> float | None:
        return flops_per_token(self.cfg.model, self.cfg.model.max_seq_len)


DECODER = RunKind("decoder", lambda d, where: RunConfig.from_dict(d, where=where), lambda cfg: Decoder(cfg.model),
                  "pass the --out directory of `mmtok train`")


def train(cfg: RunConfig, run: str | Path, make_loader: Callable[[int, int], object], **kw) -> dict:
    """Train `cfg` into `run`. `make_loader(rank, world)` gives an iterator of batches (the
    PlanLoader contract) with state_dict/load_state_dict. Returns a summary dict (rank 0's view)."""
    return run_job(DecoderJob(cfg, make_loader), run, **kw)


def run_job(job: Job, run: str | Path, *, resume: bool = False, stop_at_step: int | None = None,
            live: bool = True) -> dict:
    """The training loop every job runs (trainer/job.py gives the order): one process or many
    under torchrun, the checkpoints, resume, SIGINT/SIGTERM, the metrics log and the progress bar."""
    run = Path(run)
    rank, world, device = init_distributed(job.device)
    with contextlib.ExitStack() as held:
        def claim() -> Path | None:
            # All ranks share the output directory, so rank 0 alone locks it, until the job ends
            # (a `--nproc` launcher trains nothing and takes no lock).
            held.enter_context(exclusive(run))
            return job.claim(run, resume, world)

        # Checked before anything is written or trained; every rank stops with rank 0's message.
        ckpt_path = from_rank0(claim, rank, world)
        return _train(job, run, rank, world, device, ckpt_path, stop_at_step, live)


def _train(job: Job, run: Path, rank: int, world: int, device, ckpt_path: Path | None, stop_at_step,
           live: bool) -> dict:
    tc = job.train
    start = job.first_step(ckpt_path) if ckpt_path else 0
    end = min(tc.steps, stop_at_step) if stop_at_step else tc.steps
    loader = job.make_loader(rank, world, ckpt_path, start, end)
    model = job.build(run, rank, world, device)
    optimizers = job.optimizers(model)
    ckpt = Checkpointer(run, rank, world, keep=job.keep)
    if ckpt_path:
        ckpt.load(ckpt_path, *job.checkpoint_state(model, optimizers, loader, start))
    step = start
    job.begin(model, optimizers)
    metrics = Metrics(run, rank, step, name=job.log_file, tensorboard=job.tensorboard)
    batches = iter(loader)
    status, last_saved = "finished", step if ckpt_path else -1
    t_log = time.perf_counter()

    def save():
        state = job.checkpoint_state(model, optimizers, loader, step)
        ckpt.save(job.saves_as(step), *state, job.checkpoint_meta(world))

    with _Stop() as stop, runner.progress_bar(job.name, tc.steps, step, live and rank == 0) as bar:
        while step < end:
            if not job.step(model, optimizers, batches, step):
                status = "plan exhausted"
                break
            step += 1
            bar.advance()
            if step % tc.log_every == 0 or step == end:
                rec = job.record(step, time.perf_counter() - t_log, world)
                metrics.write(rec)
                bar.describe(job.describe(rec))
                t_log = time.perf_counter()
            if _any(stop.requested, world, device):
                status = "interrupted"
                break
            if tc.ckpt_every and step % tc.ckpt_every == 0 and step < end:
                save()
                last_saved = step
        if step != last_saved:
            save()
    metrics.close()
    return {"run": str(run), "status": status, "step": step, "world_size": world,
            **job.summary(run, rank, step, status)}


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
