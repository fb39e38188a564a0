"""Mixture-of-Depths (Raposo et al. 2024) before the MoE routing (`--model mod-moma`).

In a depth-routed block a router lets only the top `mod_capacity` share of the batch's real
tokens through; the others skip the block on the residual path, and the router weight (a
sigmoid) multiplies the block's update. With `routing="causal"` the auxiliary router's
per-token prediction decides instead. The block's statistics are recorded under "mod".
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mmtok.trainer.attention import attention_mask
from mmtok.trainer.block import Block, FFNFactory
from mmtok.trainer.config import ModelConfig
from mmtok.trainer.context import Context
from mmtok.trainer.moe import AuxRouter, aux_stats


class DepthRoutedBlock(Block):
    def __init__(self, cfg: ModelConfig, layer: int, ffn: FFNFactory):
        super().__init__(cfg, layer, ffn)
        self.mod_capacity = cfg.mod_capacity
        self.mod_router = nn.Linear(cfg.d_model, 1, bias=False)
        self.mod_aux = AuxRouter(cfg.d_model, 1)  # the router's causal predictor

    def choose(self, weight: torch.Tensor, aux: torch.Tensor | None, real: torch.Tensor, causal: bool):
        """Flat indices of the tokens to pack, ascending, and which of them pass. Batch routing
        keeps static shapes and never waits for the GPU: it always packs ceil(capacity * B * T)
        tokens, rounded up to a multiple of 8 for the attention kernels, best first, and marks
        as passed only the best ceil(capacity * real tokens); the rest of the pack (padding,
        rounding) gets no expert and no update."""
        if causal:  # data-dependent count: waits for the device, as decoding does anyway
            idx = ((aux > 0) & real).nonzero().squeeze(1)
            return idx, torch.ones_like(idx, dtype=torch.bool)
        n = real.numel()
        slots = min(n, math.ceil(self.mod_capacity * n / 8) * 8)
        best = weight.masked_fill(~real, -1.0).topk(slots).indices  # padding ranks last
        passed = torch.arange(slots, device=real.device) < (real.sum().double() * self.mod_capacity).ceil()
        idx, order = best.sort()
        return idx, passed[order]

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        """The chosen tokens pass through the block packed into one row, in batch order (a
        document id per source row keeps rows apart in attention); the rest keep x."""
        b, t, d = x.shape
        flat, real = x.reshape(b * t, d), ctx.real.reshape(-1)
        weight = torch.sigmoid(self.mod_router(flat).squeeze(-1).float())  # [B*T]
        # a frozen auxiliary router's predictions would only be thrown away in training
        use_aux = ctx.causal or not (self.training and not self.mod_aux.out.weight.requires_grad)
        aux = self.mod_aux(flat.detach()).squeeze(-1) if use_aux else None
        idx, passed = self.choose(weight, aux, real, ctx.causal)
        stats = {"passed": passed.sum().float(), "candidates": real.sum().float()}
        if use_aux:
            take = torch.zeros_like(real).index_copy_(0, idx, passed)
            stats |= aux_stats(aux.unsqueeze(1), take.unsqueeze(1), real)
        self.routing_stats = {"mod": stats}
        if idx.numel() == 0:
            return x
        if ctx.cache is not None and b > 1:
            raise ValueError("incremental decoding through Mixture-of-Depths layers takes one row at a time")
        pick = lambda z: z.reshape(-1).index_select(0, idx).unsqueeze(0)  # noqa: E731
        docs = ctx.doc_ids.reshape(-1).index_select(0, idx).long() + (idx // t) * (ctx.doc_ids.max().long() + 1)
        docs = torch.where(passed, docs, 0).unsqueeze(0)  # the rest of the pack is one document of its own
        xs = flat.index_select(0, idx).unsqueeze(0)
        packed = Context(ctx.rope, pick(ctx.positions), docs, pick(ctx.is_image), passed.unsqueeze(0),
                         None if ctx.cache is not None else attention_mask(docs, self.attn.flex), ctx.routing, ctx.cache)
        update = (super().forward(xs, packed) - xs).squeeze(0) * (weight.index_select(0, idx) * passed).unsqueeze(-1).to(x.dtype)
        return flat.index_add(0, idx, update).view(b, t, d)
