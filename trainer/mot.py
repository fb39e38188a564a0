"""Mixture-of-Transformers (Liang et al. 2024, arXiv 2411.04996) as a block (`--model mot`).

Every non-embedding parameter of a block is untied by modality: a text token goes through
the text tower's norms, attention projections (q, k, v, o and QK-norm) and FFN, an image
token through the image tower's; self-attention itself stays global over the whole mixed
sequence (document-masked and causal, as in the other models). There is no router, so the
model is causal by construction and needs no auxiliary routers; each token uses one tower,
so its FLOPs equal the dense model's. Embeddings, the final norm and the head are shared.

Each tower carries the dense block's parameter names (`layers.i.text.attn.qkv.weight`, ...),
so a dense block's weights copy into either tower as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from mmtok.trainer.attention import Attention, RMSNorm, attend
from mmtok.trainer.block import FFNFactory
from mmtok.trainer.config import ModelConfig
from mmtok.trainer.context import Context


class Tower(nn.Module):
    """One modality's weights of a block (the dense block's parameters, under its own name)."""

    def __init__(self, cfg: ModelConfig, layer: int, ffn: FFNFactory):
        super().__init__()
        self.attn_norm, self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps), RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer)  # its projections and QK-norms; the attention itself is the block's
        self.ffn = ffn(cfg, layer)


def modality_split(ctx: Context) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The tokens sorted text first, image last (stable), the inverse permutation and the
    number of text tokens; made once per forward and shared by the layers (the count waits
    for the device, once)."""
    if ctx.split is None:
        flat = ctx.is_image.reshape(-1)
        order = flat.byte().argsort(stable=True)
        ctx.split = (order, order.argsort(), int((~flat).sum()))
    return ctx.split


class MoTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, ffn: FFNFactory):
        super().__init__()
        if cfg.qk_norm != "rms":
            raise ValueError("--model mot uses qk_norm rms (the chameleon QK-norm is for Chameleon's dense checkpoints)")
        self.swin, self.layer, self.flex = cfg.swin_norm, layer, cfg.attention == "flex"
        self.n_heads, self.head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.text, self.image = Tower(cfg, layer, ffn), Tower(cfg, layer, ffn)

    def per_modality(self, x: torch.Tensor, ctx: Context, fn) -> torch.Tensor:
        """fn(tower, rows) over each modality's tokens of x [B, T, n], back in token order."""
        order, inverse, n_text = modality_split(ctx)
        rows = x.reshape(-1, x.shape[-1]).index_select(0, order)
        y = torch.cat([fn(self.text, rows[:n_text]), fn(self.image, rows[n_text:])])
        return y.index_select(0, inverse).view(*x.shape[:-1], -1)

    def qkv(self, tower: Tower, x: torch.Tensor) -> torch.Tensor:
        h = x if self.swin else tower.attn_norm(x)
        q, k, v = tower.attn.qkv(h).view(-1, 3, self.n_heads, self.head_dim).unbind(1)
        return torch.stack([tower.attn.q_norm(q), tower.attn.k_norm(k), v], 1).flatten(1)

    def out(self, tower: Tower, y: torch.Tensor) -> torch.Tensor:
        y = tower.attn.proj(y)
        return tower.attn_norm(y) if self.swin else y

    def ffn(self, tower: Tower, h: torch.Tensor) -> torch.Tensor:
        return tower.ffn_norm(tower.ffn(h)) if self.swin else tower.ffn(tower.ffn_norm(h))

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.per_modality(x, ctx, self.qkv)
        q, k, v = qkv.view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        h = x + self.per_modality(attend(q, k, v, ctx, ctx.layer_cache(self.layer), self.flex), ctx, self.out)
        return h + self.per_modality(h, ctx, self.ffn)
