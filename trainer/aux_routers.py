"""MoMa's auxiliary-router stage (`mmtok train --train-aux-routers`): after main training,
freeze the model and train only the auxiliary routers (expert choice and Mixture-of-Depths)
with binary cross-entropy against the batch routers' selections, so that the model can
route causally at inference.

The run's newest checkpoint is saved again, through the loop's checkpoint manager, with
the trained auxiliary routers; its step, main optimizer state and loader position are
unchanged, so the main training could still continue from it. One process or many under
torchrun, sharded and in mixed precision as the run's `mmtok train` was (`parallel.use_bf16`).

It shares the loop's process-group setup, bf16 rule, checkpoint manager and rank-0 checks,
not `train.run_job`, whose step it would have to replace almost whole: a frozen model in
eval mode, sharded with `keep_gathered` (no block output needs a gradient, so FSDP2's
pre-backward gather never runs); an optimizer over the auxiliary routers alone at a
constant learning rate, while the main optimizer's state and the loader position pass
through untouched; the plan from its start, repeated; and one save at the checkpoint's
own step, with no config files, metrics.jsonl or step-numbered checkpoints of its own
(the curve goes to aux_routers.json).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mmtok.locks import exclusive
from mmtok.shards import atomic_write, read_json
from mmtok.trainer.checkpoint import TRAIN_STATE, Checkpointer, LoaderState, intact_checkpoint, read_run_config
from mmtok.trainer.job import TrainError
from mmtok.trainer.model import Decoder, is_aux_param, loss_terms
from mmtok.trainer.parallel import init_distributed, parallelize, use_bf16
from mmtok.trainer.train import build_optimizer, from_rank0

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


def train_aux_routers(run: str | Path, plan: str | Path, steps: int = 100, lr: float = 1e-2, log=None) -> dict:
    """Train the auxiliary routers of `run`'s newest checkpoint for `steps` micro-batches of
    `plan` per process (from its start; the plan repeats if shorter), main weights frozen.
    Under torchrun every process reads its own micro-batches and the model is sharded with
    FSDP2, as in `mmtok train`; the checkpoint is saved again at its own step."""
    run = Path(run)
    rank, world, device = init_distributed()
    with contextlib.ExitStack() as held:
        def claim() -> Path | None:  # rank 0 locks the run for the whole stage, as train does
            held.enter_context(exclusive(run))
            return intact_checkpoint(run)

        ckpt = from_rank0(claim, rank, world)
        return _train_aux(run, plan, steps, lr, log, rank, world, device, ckpt)


def _train_aux(run: Path, plan, steps: int, lr: float, log, rank: int, world: int, device, ckpt: Path | None) -> dict:
    from mmtok.loader import PlanLoader

    cfg, _ = read_run_config(run, "decoder")
    if ckpt is None:
        raise TrainError(f"{run}: has no checkpoint yet; train it first")
    if cfg.model.model == "dense" or (cfg.model.model == "moe" and cfg.model.routing == "top2"):
        raise TrainError(f"{run}: a {cfg.model.model} model ({cfg.model.routing}) routes causally already; "
                         "auxiliary routers are for expert-choice models (moma, mod-moma, moe --routing expert-choice)")
    saved = read_json(ckpt / TRAIN_STATE)
    tc = cfg.train
    model = parallelize(Decoder(cfg.model), world, device, bf16=use_bf16(tc, device), act_ckpt=tc.act_ckpt, compile=False,
                        keep_gathered=True)
    main_opt = build_optimizer(model, tc)
    position = LoaderState()
    ckptr = Checkpointer(run, rank, world)
    step = ckptr.load(ckpt, model, main_opt, position)
    model.set_aux_trainable(True, rest=False)
    aux = [p for n, p in model.named_parameters() if is_aux_param(n)]
    opt = torch.optim.AdamW(aux, lr=lr, weight_decay=0.0)
    model.eval()  # no router noise: the targets are the routers' clean selections
    loader = PlanLoader(plan, rank, world)
    batches, curve, t0 = iter(loader), [], time.perf_counter()
    for i in range(steps):
        try:
            batch = next(batches)
        except StopIteration:
            loader.load_state_dict({**loader.state_dict(), "next_microbatch": 0})
            batches = iter(loader)
            batch = next(batches)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        logits, stats = model(batch["input_ids"], batch["positions"], batch["doc_ids"])
        bce = loss_terms(cfg.model, logits, batch["targets"], stats)["aux_router_bce"]
        opt.zero_grad(set_to_none=True)
        bce.backward()
        opt.step()
        curve.append(_aux_record(i + 1, bce, stats, world, device))
        if log and rank == 0:
            log(curve[-1])
    model.set_aux_trainable(cfg.model.aux_routers == "joint")  # as the main optimizer expects
    # the checkpoint keeps the main run's own world size and global batch: only its routers changed
    keep = {k: saved[k] for k in ("world_size", "global_batch") if k in saved}
    path = ckptr.save(step, model, main_opt, position, {**cfg.checkpoint_meta(world), **keep})
    summary = {"run": str(run), "checkpoint": str(path), "step": step, "aux_steps": steps, "lr": lr,
               "world_size": world, "final": curve[-1] if curve else {}, "seconds": time.perf_counter() - t0}
    if rank == 0:
        atomic_write(run / AUX_REPORT, json.dumps({**summary, "curve": curve}, indent=1).encode())
    return summary


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
