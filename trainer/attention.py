"""Attention and the norms around it: RMSNorm, Chameleon's per-head LayerNorm, rotary
positions restarting at each document, and document-masked causal attention (a token sees
only earlier tokens of its own document) through SDPA, flex attention or a KV cache.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from mmtok.trainer.config import ModelConfig
from mmtok.trainer.context import Context


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


class HeadLayerNorm(nn.Module):
    """Chameleon's QK-norm: LayerNorm over each head's dims, with a weight and a bias of
    its own per head (statistics per head, never across heads). Kept flat, [heads * dims],
    so that the optimizer treats them as gains (no weight decay) like the other norms'."""

    def __init__(self, n_heads: int, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_heads * head_dim))
        self.bias = nn.Parameter(torch.zeros(n_heads * head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, H, T, hd]
        h, hd = x.shape[1], x.shape[-1]
        y = F.layer_norm(x.float(), (hd,), eps=1e-5)
        return (y * self.weight.float().view(h, 1, hd) + self.bias.float().view(h, 1, hd)).type_as(x)


def rotary_table(head_dim: int, max_len: int, theta: float) -> torch.Tensor:
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv)
    return torch.stack([angles.cos(), angles.sin()], -1).float()  # [max_len, head_dim/2, 2]


def apply_rotary(x: torch.Tensor, table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, hd]; positions [B, T] index into the table (per-document positions)."""
    cs = table[positions.long()].unsqueeze(1)  # [B, 1, T, hd/2, 2]
    cos, sin = cs[..., 0], cs[..., 1]
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2).type_as(x)


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] bool: query i sees key j iff j <= i and both are in the same document.
    Padding (doc 0) sees earlier padding only, so no row is empty."""
    t = doc_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    return (doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1)).unsqueeze(1) & causal


def document_block_mask(doc_ids: torch.Tensor):
    """The document-causal mask as a flex-attention BlockMask (built once per forward and
    shared by the layers: building it evaluates the mask over every block)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, qi, ki):
        return (ki <= qi) & (doc_ids[b, qi] == doc_ids[b, ki])

    b, t = doc_ids.shape
    return create_block_mask(mask_mod, b, None, t, t, device=doc_ids.device)


def attention_mask(doc_ids: torch.Tensor, flex: bool):
    return document_block_mask(doc_ids) if flex else document_causal_mask(doc_ids)


@functools.cache
def compiled_flex_attention():
    """Flex attention runs as a fused kernel only when compiled; eager it materialises the
    scores (still used on CPU, where compiling would need a C++ toolchain and minutes)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def flex_document_attention(q, k, v, block_mask):
    from torch.nn.attention.flex_attention import flex_attention

    return (compiled_flex_attention() if q.is_cuda else flex_attention)(q, k, v, block_mask=block_mask)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Context, cache: dict | None,
           flex: bool) -> torch.Tensor:
    """q, k, v [B, H, T, hd] (QK-normed) -> [B, T, H * hd]: rotary positions, then attention under
    the forward's mask. With a cache the new queries see every cached key of their row."""
    b, _, t, _ = q.shape
    q, k = apply_rotary(q, ctx.rope, ctx.positions), apply_rotary(k, ctx.rope, ctx.positions)
    if cache is not None:
        if "k" in cache:
            k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
        cache["k"], cache["v"] = k, v
        n = k.shape[2]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(t, n, dtype=torch.bool, device=q.device).tril(n - t))
    elif flex:  # the decoder passes a BlockMask; other callers may pass a bool mask or none
        block = ctx.mask if ctx.mask is not None and not isinstance(ctx.mask, torch.Tensor) else document_block_mask(ctx.doc_ids)
        y = flex_document_attention(q, k, v, block)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask)
    return y.transpose(1, 2).reshape(b, t, -1)


def qk_norm(cfg: ModelConfig) -> nn.Module:
    head_dim = cfg.d_model // cfg.n_heads
    return RMSNorm(head_dim) if cfg.qk_norm == "rms" else HeadLayerNorm(cfg.n_heads, head_dim)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.n_heads, self.head_dim, self.layer = cfg.n_heads, cfg.d_model // cfg.n_heads, layer
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.q_norm, self.k_norm = qk_norm(cfg), qk_norm(cfg)
        self.flex = cfg.attention == "flex"

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)  # QK-norm keeps attention logits bounded
        return self.proj(attend(q, k, v, ctx, ctx.layer_cache(self.layer), self.flex))
