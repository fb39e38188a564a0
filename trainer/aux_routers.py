"""MoMa's auxiliary-router stage (`mmtok train --train-aux-routers`): after main training,
freeze the model and train only the auxiliary routers (expert choice and Mixture-of-Depths)
with binary cross-entropy against the batch routers' selections, so that the model can
route causally at inference.

`AuxRouterJob` is a job of the one loop (`train.run_job`) on the run's own directory: it
starts from the run's newest checkpoint and saves it again at that checkpoint's own step
(`saves_as`), with the trained auxiliary routers; the main optimizer's state and the
loader position pass through untouched, so the main training could still continue from
it. One process or many under torchrun, sharded and in mixed precision as the run's
`mmtok train` was (`parallel.use_bf16`). The model is frozen in eval mode and sharded with
`keep_gathered` (no block output needs a gradient, so FSDP2's pre-backward gather never
runs); the plan is read from its start, repeated; the curve goes to aux_routers.json (no
metrics.jsonl of its own).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mmtok.shards import atomic_write, read_json
from mmtok.trainer.checkpoint import (TRAIN_STATE, LoaderState, checkpoint_step, intact_checkpoint, latest_checkpoint,
                                      read_run_config)
from mmtok.trainer.job import Cadence, Job, TrainError
from mmtok.trainer.model import Decoder, is_aux_param, loss_terms
from mmtok.trainer.parallel import parallelize, use_bf16
from mmtok.trainer.train import build_optimizer, run_job

AUX_REPORT = "aux_routers.json"


AUX_SUMS = ("hits", "n", "tp", "pos", "pred")  # aux_stats' counts, without their "aux_" prefix


def aux_agreement(stats: list[dict]) -> dict:
    """Per router kind ("experts", "depth"): the auxiliary routers' counts against the batch
    routers' selections (AUX_SUMS: agreeing predictions, predictions, true positives,
    selections, predicted selections), summed over layers."""
    out = {}
    for layer in stats:
        for group, s in layer.items():
            if "aux_hits" in s:
                acc = out.setdefault("depth" if group == "mod" else "experts", dict.fromkeys(AUX_SUMS, 0.0))
                for key in AUX_SUMS:
                    acc[key] += float(s[f"aux_{key}"])
    return out


def agreement_summary(sums: dict) -> dict:
    """Agreement beside what it must beat: `trivial` is the agreement of always predicting
    "not selected" (1 - capacity share: 0.75 for four experts), and precision and recall
    of "selected" show which way the auxiliary router errs. None where undefined."""
    n = sums["n"]
    return {"agreement": sums["hits"] / n if n else None, "trivial": 1 - sums["pos"] / n if n else None,
            "precision": sums["tp"] / sums["pred"] if sums["pred"] else None,
            "recall": sums["tp"] / sums["pos"] if sums["pos"] else None}


class AuxRouterJob(Job):
    """`steps` BCE steps of the auxiliary routers alone on `plan`, into the run's newest checkpoint."""

    name = "aux-routers"
    log_file = None  # the curve goes to aux_routers.json

    def __init__(self, plan, steps: int, lr: float):
        self.plan, self.lr, self.data = plan, lr, str(plan)
        self.train = Cadence(steps=steps, log_every=1, ckpt_every=None)
        self.curve, self._position = [], LoaderState()

    def claim(self, run: Path, resume: bool, world: int) -> Path:
        ckpt = intact_checkpoint(run)
        cfg, _ = read_run_config(run, "decoder")
        if ckpt is None:
            raise TrainError(f"{run}: has no checkpoint yet; train it first")
        if cfg.model.model == "dense" or (cfg.model.model == "moe" and cfg.model.routing == "top2"):
            raise TrainError(f"{run}: a {cfg.model.model} model ({cfg.model.routing}) routes causally already; "
                             "auxiliary routers are for expert-choice models (moma, mod-moma, moe --routing "
                             "expert-choice)")
        return ckpt

    def make_loader(self, rank: int, world: int, ckpt: Path, start: int, end: int):
        from mmtok.loader import PlanLoader

        # the checkpoint keeps the main run's own world size and global batch: only its routers change
        saved = read_json(ckpt / TRAIN_STATE)
        self._world, self._at = world, checkpoint_step(ckpt)
        self._keep = {k: saved[k] for k in ("world_size", "global_batch") if k in saved}
        return PlanLoader(self.plan, rank, world, loop=True)  # from its start, round again as often as needed

    def build(self, run: Path, rank: int, world: int, device) -> torch.nn.Module:
        self.cfg, _ = read_run_config(run, "decoder")  # again: `claim` ran on rank 0 alone
        self._device, tc = device, self.cfg.train
        return parallelize(Decoder(self.cfg.model), world, device, bf16=use_bf16(tc, device), act_ckpt=tc.act_ckpt,
                           compile=False, keep_gathered=True)

    def optimizers(self, model) -> tuple:
        return (build_optimizer(model, self.cfg.train),)  # the main one: its state passes through

    def checkpoint_state(self, model, optimizers: tuple, loader, step: int) -> tuple:
        return model, optimizers[0], self._position

    def begin(self, model, optimizers: tuple) -> None:
        # after the main optimizer's state is loaded: it was built over the run's trainable set
        model.set_aux_trainable(True, rest=False)
        self._opt = torch.optim.AdamW([p for n, p in model.named_parameters() if is_aux_param(n)], lr=self.lr,
                                      weight_decay=0.0)
        model.eval()  # no router noise: the targets are the routers' clean selections
        self._t0 = time.perf_counter()

    def first_step(self, ckpt: Path) -> int:
        return 0  # its own steps; the checkpoint keeps the run's (saves_as)

    def saves_as(self, step: int) -> int:
        return self._at

    def step(self, model, optimizers: tuple, batches, step: int) -> bool:
        batch = next(batches, None)
        if batch is None:
            return False
        batch = {k: v.to(self._device, non_blocking=True) for k, v in batch.items()}
        logits, stats = model(batch["input_ids"], batch["positions"], batch["doc_ids"])
        bce = loss_terms(self.cfg.model, logits, batch["targets"], stats)["aux_router_bce"]
        self._opt.zero_grad(set_to_none=True)
        bce.backward()
        self._opt.step()
        self._last = (bce, stats)
        return True

    def record(self, step: int, seconds: float, world: int) -> dict:
        self.curve.append(_aux_record(step, *self._last, world, self._device))
        return self.curve[-1]

    def describe(self, rec: dict) -> str:
        agree = rec.get("agreement_experts", rec.get("agreement_depth"))
        return f"bce {rec['bce']:.4f}" + (f" agreement {agree:.3f}" if agree is not None else "")

    def checkpoint_meta(self, world: int) -> dict:
        return {**self.cfg.checkpoint_meta(world), **self._keep}

    def summary(self, run: Path, rank: int, step: int, status: str) -> dict:
        summary = {"checkpoint": str(latest_checkpoint(run)), "step": self._at, "aux_steps": step,
                   "lr": self.lr, "final": self.curve[-1] if self.curve else {}, "seconds": time.perf_counter() - self._t0}
        if rank == 0:
            atomic_write(run / AUX_REPORT, json.dumps({"run": str(run), **summary, "world_size": self._world,
                                                       "curve": self.curve}, indent=1).encode())
        return summary


def train_aux_routers(run: str | Path, plan: str | Path, steps: int = 100, lr: float = 1e-2, live: bool = True) -> dict:
    """Train the auxiliary routers of `run`'s newest checkpoint for `steps` micro-batches of
    `plan` per process (from its start; the plan repeats if shorter), main weights frozen.
    Under torchrun every process reads its own micro-batches and the model is sharded with
    FSDP2, as in `mmtok train`; the checkpoint is saved again at its own step."""
    return run_job(AuxRouterJob(plan, steps, lr), run, live=live)


def _aux_record(step: int, bce: torch.Tensor, stats: list[dict], world: int, device) -> dict:
    """BCE (mean over processes) and, over all processes, agreement with the batch routers
    with its trivial rate, precision and recall (`agreement_summary`)."""
    kinds, m = ("experts", "depth"), len(AUX_SUMS)
    agree = aux_agreement(stats)
    vals = torch.tensor([bce.item()] + [agree.get(k, {}).get(key, 0.0) for k in kinds for key in AUX_SUMS],
                        dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(vals)
    vals = vals.tolist()
    rec = {"step": step, "bce": vals[0] / world}
    for j, k in enumerate(kinds):
        sums = dict(zip(AUX_SUMS, vals[1 + m * j:1 + m * (j + 1)]))
        if sums["n"]:
            rec |= {f"{name}_{k}": v for name, v in agreement_summary(sums).items()}
    return rec
