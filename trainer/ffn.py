"""Feed-forward layers as the blocks see them: `ffn(x, ctx) -> tensor`.

`make_ffn` is the default FFN factory of `Decoder` (dense SwiGLU, modality-blind MoE, or
MoMa's modality groups; their routers live in trainer/moe.py). A layer that routes keeps its
last forward's statistics in `routing_stats` (a dict: group -> statistics), and
`collect_stats` takes them out of every layer after the forward, so the statistics never
travel through the blocks' return values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmtok.trainer.config import ModelConfig
from mmtok.trainer.context import Context
from mmtok.trainer.moe import MoEFFN, MoMaFFN


class SwiGLU(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d, hidden, bias=False)
        self.w3 = nn.Linear(d, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor, ctx: Context | None = None) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def make_ffn(cfg: ModelConfig, layer: int = 0) -> nn.Module:
    """The FFN of block `layer` for `cfg.model` (the default factory of `Decoder`)."""
    noise = cfg.router_noise == "gumbel"
    if cfg.model in ("dense", "mot"):
        return SwiGLU(cfg.d_model, cfg.ffn_hidden)
    if cfg.model == "moe":
        return MoEFFN(cfg.d_model, cfg.ffn_hidden, int(cfg.experts), cfg.routing, cfg.capacity_factor, noise)
    (_, n_text), (_, n_image) = cfg.groups
    return MoMaFFN(cfg.d_model, cfg.ffn_hidden, n_text, n_image, cfg.capacity_factor, noise)


def collect_stats(layers) -> list[dict]:
    """Per block, the routing statistics its modules recorded in the last forward (group ->
    statistics; {} for a block that routes nothing), taken out so that none outlives its
    step. Inner modules come first: the FFN's expert groups, then the block's "mod"."""
    out = []
    for block in layers:
        found = [m.__dict__.pop("routing_stats") for m in reversed(list(block.modules())) if "routing_stats" in m.__dict__]
        out.append({group: s for stats in found for group, s in stats.items()})
    return out
