"""MoMa upcycling (`mmtok upcycle`): turn a trained 1t1i (or dense) run into the first
checkpoint (step 0) of an NtMi run. Every expert of a group starts as a copy of that
modality's FFN, each expert's router as the parent's router plus a small random part (from a
dense parent: fresh), the learning-rate schedule restarts (step 0) and the loader position
carries over from the parent, so no data is seen twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mmtok.locks import exclusive
from mmtok.shards import atomic_write
from mmtok.trainer.checkpoint import Checkpointer, LoadedRun, LoaderState, load_run, loader_position, read_run_config
from mmtok.plan import parse_layout
from mmtok.trainer.config import RunConfig
from mmtok.trainer.job import CONFIG, TrainError, json_bytes
from mmtok.trainer.model import Decoder
from mmtok.trainer.train import build_optimizer


def upcycle(run: str | Path, experts: str, out: str | Path, *, router_noise: str = "gumbel", seed: int = 0) -> dict:
    """Write `out` as a run at step 0 whose model is `run`'s newest checkpoint upcycled to
    `experts` (NtMi). Continue it with `mmtok train --resume --out OUT` and the same model options."""
    run, out = Path(run), Path(out)
    model = read_run_config(run, "decoder")[0].model  # refused before any weights are read
    if not (model.model == "dense" or (model.model in ("moma", "mod-moma") and parse_layout(model.experts) == (1, 1))):
        raise TrainError(f"{run}: upcycling starts from a dense or a 1t1i model, this one is {model.model} {model.experts}")
    parse_layout(experts)
    parent = load_run(run, "decoder")
    with exclusive(out):
        if (out / CONFIG).exists():
            raise TrainError(f"{out} already holds a run; choose a new --out")
        return _upcycle(run, parent, experts, out, router_noise, seed)


def _upcycle(run: Path, parent: LoadedRun, experts: str, out: Path, router_noise: str, seed: int) -> dict:
    kind = parent.config.model.model
    cfg = RunConfig.from_dict(parent.config.as_dict())
    cfg.model.model = "moma" if kind == "dense" else kind
    cfg.model.experts, cfg.model.router_noise = experts, router_noise
    cfg = RunConfig.from_dict(cfg.as_dict())  # validates the new model config
    torch.manual_seed(seed)
    new = Decoder(cfg.model)  # fresh routers and auxiliary routers come from here
    copied = upcycle_weights(parent.model, new, kind == "dense")
    position = loader_position(parent.checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / CONFIG, json_bytes(cfg.as_dict()))
    keep = {k: parent.state[k] for k in ("world_size", "global_batch") if k in parent.state}  # as the parent trained
    path = Checkpointer(out, 0, 1).save(0, new, build_optimizer(new, cfg.train), LoaderState(position),
                                        {**cfg.checkpoint_meta(1), **keep})
    meta = {"parent": str(run.resolve()), "parent_step": parent.step, "experts": experts, "router_noise": router_noise}
    atomic_write(out / "upcycled_from.json", json.dumps(meta, indent=1).encode())
    return {"out": str(out), "checkpoint": str(path), "parent": str(run), "parent_step": parent.step,
            "model": cfg.model.model, "experts": experts, "copied_tensors": copied, "loader": position}


ROUTER_SPREAD = 0.01  # the random part of an upcycled router row, relative to the parent row's scale


def upcycle_weights(old: Decoder, new: Decoder, from_dense: bool, router_spread: float | None = ROUTER_SPREAD) -> int:
    """Everything but the auxiliary routers from `old`; each group's experts from the
    modality's FFN (a dense parent's one FFN serves both modalities). From a 1t1i parent each
    expert's router row is the parent's row plus a random part `router_spread` times its
    scale: the gates start at the parent's trained gate (a fresh router's sit near 0.5, and
    the copied experts stop computing the parent's function: docs/SCIENCE.md measures the
    shock), while selection ranks on scores centred over the experts (moe.selection_scores),
    where the shared row cancels and the random parts split the tokens. `router_spread=None`
    leaves the routers fresh (the benchmark's control)."""
    src, dst = old.state_dict(), new.state_dict()
    copied = 0
    for name, t in dst.items():
        if ".ffn." in name and ".router." in name and not from_dense and router_spread is not None:
            row = src[name][0]
            t.copy_(row + router_spread * row.norm() / row.numel() ** 0.5 * torch.randn_like(t))
        elif ".ffn." in name and (".router." in name or ".aux." in name):
            continue  # fresh: a dense parent has no router; the auxiliary routers learn in their own stage
        elif ".experts." in name:
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
