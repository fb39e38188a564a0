"""What the training loop reports: the metrics log (metrics.jsonl and TensorBoard, on rank
0; VQ training keeps its vq_log.jsonl with it too), the per-interval sums of every rank
reduced into one record (losses, per-group NLL, expert load, unrouted tokens, real tokens),
the device's peak for MFU and peak memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from mmtok.trainer.checkpoint import truncate_jsonl
from mmtok.trainer.job import METRICS


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core peak


class Metrics:
    """A job's metrics log on rank 0: JSONL (`name`, cut back to the step a run resumes from)
    and, with `tensorboard`, TensorBoard event files in tb/. No `name`: no log."""

    def __init__(self, run: Path, rank: int, resume_step: int, name: str | None = METRICS, tensorboard: bool = True):
        self.path = run / name if name and rank == 0 else None  # None: this process writes no log
        self.tb = None
        if self.path is None:
            return
        truncate_jsonl(self.path, resume_step)
        if not tensorboard:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run / "tb"), purge_step=resume_step + 1)

    def write(self, rec: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
        if self.tb is None:
            return
        for k, v in rec.items():
            if isinstance(v, (int, float)) and k != "step":
                self.tb.add_scalar(k, v, rec["step"])
        for group, shares in rec.get("expert_load", {}).items():
            for e, share in enumerate(shares):
                self.tb.add_scalar(f"expert_load/{group}/{e}", share, rec["step"])
        for group, share in rec.get("unrouted", {}).items():  # tokens that reached no expert
            self.tb.add_scalar(f"unrouted/{group}", share, rec["step"])
        self.tb.flush()

    def close(self):
        if self.tb:
            self.tb.close()


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


LOSSES = ("loss", "ce", "z_loss", "aux_loss", "aux_router_bce")


def accumulate(acc, terms, groups, load, tokens_real):
    vals = {k: terms[k].detach().float() for k in LOSSES}
    vals["tokens_real"] = tokens_real.float()
    for g, (nll, n) in groups.items():
        vals[f"nll/{g}"] = torch.stack([nll.detach().float(), n.float()])
    for group, s in load.items():
        vals[f"load/{group}"] = s["load"].float()
        vals[f"unrouted/{group}"] = torch.stack([s["unrouted"], s["tokens"]]).float()
    if acc is None:
        return vals
    return {k: acc[k] + v for k, v in vals.items()}


def reduce_interval(acc: dict, world: int, accum: int) -> dict:
    """Sum every accumulated value over ranks with one all-reduce; turn sums into means.
    Per group g (text and image tokens, or Uni-MoE's text given each modality):
    `g_loss` (null when the interval had none of its tokens) and `g_tokens`."""
    keys = sorted(acc)
    flat = torch.cat([acc[k].reshape(-1).double() for k in keys])
    if world > 1:
        dist.all_reduce(flat)
    flat = flat.cpu()
    out, i = {}, 0
    for k in keys:
        n = acc[k].numel()
        out[k] = flat[i:i + n]
        i += n
    rec = {k: float(out[k]) / (world * accum) for k in LOSSES}
    for k in keys:
        if k.startswith("nll/"):
            (s, n), g = out[k].tolist(), k.split("/", 1)[1]
            rec[f"{g}_loss"], rec[f"{g}_tokens"] = (s / n if n else None), int(n)
    rec["tokens_real"] = int(out["tokens_real"])
    loads = {k.split("/", 1)[1]: out[k] for k in keys if k.startswith("load/")}
    if loads:
        rec["expert_load"] = {g: (v / v.sum().clamp(min=1)).tolist() for g, v in loads.items()}
        rec["unrouted"] = {g: float(out[f"unrouted/{g}"][0] / out[f"unrouted/{g}"][1].clamp(min=1)) for g in loads}
    return rec
