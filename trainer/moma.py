"""MoMa's training recipes beyond the main loop: the auxiliary-router stage and upcycling.

- `train_aux_routers`: after main training, freeze the model and train only the
  auxiliary routers (expert choice and Mixture-of-Depths) with binary cross-entropy
  against the batch routers' selections, so that the model can route causally at
  inference. The run's newest checkpoint is saved again with the trained auxiliary
  routers; its step, optimizer state and loader position are unchanged, so the main
  training could still continue from it. One process or many under torchrun (FSDP2).
- `upcycle`: turn a trained 1t1i (or dense) run into the first checkpoint (step 0) of an
  NtMi run: every expert of a group starts as a copy of that modality's FFN, expert
  routers start fresh, the learning-rate schedule restarts (step 0) and the loader
  position carries over from the parent, so no data is seen twice.
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
from mmtok.trainer.config import RunConfig, parse_layout
from mmtok.trainer.export import load_weights, read_run_config
from mmtok.trainer.model import Decoder, is_aux_param, loss_terms
from mmtok.trainer.parallel import init_distributed, parallelize
from mmtok.trainer.train import CONFIG, Checkpointer, TrainError, build_optimizer, from_rank0, intact_checkpoint

AUX_REPORT = "aux_routers.json"


class _LoaderState:
    """Stands in for a loader in Checkpointer.load/save: keeps the saved position as it is."""

    def __init__(self, state: dict | None = None):
        self.state = state

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state


def aux_agreement(stats: list[dict]) -> dict:
    """Per router kind ("experts", "depth"): [auxiliary predictions agreeing with the batch
    routers' selections, predictions made], summed over layers."""
    out = {}
    for layer in stats:
        for group, s in layer.items():
            if "aux_hits" in s:
                acc = out.setdefault("depth" if group == "mod" else "experts", [0.0, 0.0])
                acc[0] += float(s["aux_hits"])
                acc[1] += float(s["aux_n"])
    return out


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

    cfg = read_run_config(run)
    if ckpt is None:
        raise TrainError(f"{run}: has no checkpoint yet; train it first")
    if cfg.model.model == "dense" or (cfg.model.model == "moe" and cfg.model.routing == "top2"):
        raise TrainError(f"{run}: a {cfg.model.model} model ({cfg.model.routing}) routes causally already; "
                         "auxiliary routers are for expert-choice models (moma, mod-moma, moe --routing expert-choice)")
    saved = json.loads((ckpt / "train_state.json").read_text())
    tc = cfg.train
    bf16 = tc.mixed_precision == "bf16" or (tc.mixed_precision == "auto" and device.type == "cuda")
    model = parallelize(Decoder(cfg.model), world, device, bf16=bf16, act_ckpt=tc.act_ckpt, compile=False)
    main_opt = build_optimizer(model, tc)
    position = _LoaderState()
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
    path = ckptr.save(step, model, main_opt, position, cfg,
                      keep={k: saved[k] for k in ("world_size", "global_batch") if k in saved})
    summary = {"run": str(run), "checkpoint": str(path), "step": step, "aux_steps": steps, "lr": lr,
               "world_size": world, "final": curve[-1] if curve else {}, "seconds": time.perf_counter() - t0}
    if rank == 0:
        atomic_write(run / AUX_REPORT, json.dumps({**summary, "curve": curve}, indent=1).encode())
    return summary


def _aux_record(step: int, bce: torch.Tensor, stats: list[dict], world: int, device) -> dict:
    """BCE (mean over processes) and agreement with the batch routers (over all processes)."""
    kinds = ("experts", "depth")
    agree = aux_agreement(stats)
    vals = torch.tensor([float(bce)] + [x for k in kinds for x in agree.get(k, (0.0, 0.0))], dtype=torch.float64,
                        device=device)
    if world > 1:
        dist.all_reduce(vals)
    vals = vals.tolist()
    rec = {"step": step, "bce": vals[0] / world}
    for j, k in enumerate(kinds):
        hits, n = vals[1 + 2 * j], vals[2 + 2 * j]
        if n:
            rec[f"agreement_{k}"] = hits / n
    return rec


def upcycle(run: str | Path, experts: str, out: str | Path, *, router_noise: str = "gumbel", seed: int = 0) -> dict:
    """Write `out` as a run at step 0 whose model is `run`'s newest checkpoint upcycled to
    `experts` (NtMi). Continue it with `mmtok train --resume --out OUT` and the same model options."""
    run, out = Path(run), Path(out)
    parent = read_run_config(run)
    ckpt = intact_checkpoint(run)
    if ckpt is None:
        raise TrainError(f"{run}: has no checkpoint yet; train it first")
    kind = parent.model.model
    if not (kind == "dense" or (kind in ("moma", "mod-moma") and parse_layout(parent.model.experts) == (1, 1))):
        raise TrainError(f"{run}: upcycling starts from a dense or a 1t1i model, this one is {kind} {parent.model.experts}")
    parse_layout(experts)
    with exclusive(out):
        if (out / CONFIG).exists():
            raise TrainError(f"{out} already holds a run; choose a new --out")
        return _upcycle(run, parent, ckpt, experts, out, router_noise, seed)


def _upcycle(run: Path, parent: RunConfig, ckpt: Path, experts: str, out: Path, router_noise: str, seed: int) -> dict:
    kind = parent.model.model
    old = Decoder(parent.model)
    load_weights(old, ckpt)
    cfg = RunConfig.from_dict(parent.as_dict())
    cfg.model.model = "moma" if kind == "dense" else kind
    cfg.model.experts, cfg.model.router_noise = experts, router_noise
    cfg = RunConfig.from_dict(cfg.as_dict())  # validates the new model config
    torch.manual_seed(seed)
    new = Decoder(cfg.model)  # fresh routers and auxiliary routers come from here
    copied = upcycle_weights(old, new, kind == "dense")
    position = json.loads((ckpt / "rank-0.json").read_text())["loader"]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / CONFIG, json.dumps(cfg.as_dict(), indent=1, sort_keys=True).encode())
    parent_state = json.loads((ckpt / "train_state.json").read_text())
    keep = {k: parent_state[k] for k in ("world_size", "global_batch") if k in parent_state}  # as the parent trained
    path = Checkpointer(out, 0, 1).save(0, new, build_optimizer(new, cfg.train), _LoaderState(position), cfg, keep)
    parent_step = parent_state["step"]
    meta = {"parent": str(run.resolve()), "parent_step": parent_step, "experts": experts, "router_noise": router_noise}
    atomic_write(out / "upcycled_from.json", json.dumps(meta, indent=1).encode())
    return {"out": str(out), "checkpoint": str(path), "parent": str(run), "parent_step": parent_step,
            "model": cfg.model.model, "experts": experts, "copied_tensors": copied, "loader": position}


def upcycle_weights(old: Decoder, new: Decoder, from_dense: bool) -> int:
    """Everything but the expert routers from `old`; each group's experts from the
    modality's FFN (a dense parent's one FFN serves both modalities)."""
    src, dst = old.state_dict(), new.state_dict()
    copied = 0
    for name, t in dst.items():
        if ".ffn." in name and (".router." in name or ".aux." in name):
            continue  # expert routers start fresh
        if ".experts." in name:
            prefix, group, _, w = name.rsplit(".", 3)  # layers.i.ffn . text . experts . w1
            if from_dense:
                ffn = src[f"{prefix}.{w}.weight"].T  # nn.Linear [out, in] -> [in, out]
            else:
                ffn = src[f"{prefix}.{group}.experts.{w}"][0]
            t.copy_(ffn.unsqueeze(0).expand_as(t))
        elif name in src and src[name].shape == t.shape:
            t.copy_(src[name])
        else:
            raise TrainError(f"cannot upcycle: parameter {name} has no counterpart in the parent model")
        copied += 1
    return copied
