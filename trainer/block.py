"""The transformer block: attention, then a feed-forward, each on the residual path.

Pre-norm by default; `swin_norm` is Chameleon's reordering, which normalises each
sub-block's output before the residual add. The FFN comes from a factory (`ffn(cfg, layer)`,
default `trainer.ffn.make_ffn`), so a model family changes its FFN without touching the block.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from mmtok.trainer.attention import Attention, RMSNorm
from mmtok.trainer.config import ModelConfig
from mmtok.trainer.context import Context

FFNFactory = Callable[[ModelConfig, int], nn.Module]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, ffn: FFNFactory):
        super().__init__()
        self.swin = cfg.swin_norm
        self.attn_norm, self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps), RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.ffn = ffn(cfg, layer)

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        if self.swin:
            h = x + self.attn_norm(self.attn(x, ctx))
            return h + self.ffn_norm(self.ffn(h, ctx))
        h = x + self.attn(self.attn_norm(x), ctx)
        return h + self.ffn(self.ffn_norm(h), ctx)
