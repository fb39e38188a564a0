"""A Chameleon-style decoder with dense, MoE or MoMa (modality-aware MoE) feed-forwards.

RMSNorm, rotary positions (restarting at each document), SwiGLU, QK-norm, optional
"swin norm" (Chameleon's reordering: normalise each sub-block's output before the
residual add), document-masked causal attention (a token sees only earlier tokens of
its own document) and a z-loss on the output softmax.

A token's modality is a function of its id: it is an image token iff its id lies in
`image_range`. The model takes the batch contract of `mmtok.loader.PlanLoader`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmtok.trainer.config import ModelConfig
from mmtok.trainer.moe import MoEFFN, MoMaFFN


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


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


def flex_document_attention(q, k, v, doc_ids):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, qi, ki):
        return (ki <= qi) & (doc_ids[b, qi] == doc_ids[b, ki])

    b, _, t, _ = q.shape
    block_mask = create_block_mask(mask_mod, b, None, t, t, device=q.device)
    return flex_attention(q, k, v, block_mask=block_mask)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)
        self.flex = cfg.attention == "flex"

    def forward(self, x, rope, positions, doc_ids, mask):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)  # QK-norm keeps attention logits bounded
        q, k = apply_rotary(q, rope, positions), apply_rotary(k, rope, positions)
        if self.flex:
            y = flex_document_attention(q, k, v, doc_ids)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d, hidden, bias=False)
        self.w3 = nn.Linear(d, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d, bias=False)

    def forward(self, x, is_image=None, real=None):
        return self.w2(F.silu(self.w1(x)) * self.w3(x)), {}


def make_ffn(cfg: ModelConfig) -> nn.Module:
    if cfg.model == "dense":
        return SwiGLU(cfg.d_model, cfg.ffn_hidden)
    if cfg.model == "moe":
        return MoEFFN(cfg.d_model, cfg.ffn_hidden, int(cfg.experts), cfg.routing, cfg.capacity_factor)
    (_, n_text), (_, n_image) = cfg.groups
    return MoMaFFN(cfg.d_model, cfg.ffn_hidden, n_text, n_image, cfg.capacity_factor)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swin = cfg.swin_norm
        self.attn_norm, self.ffn_norm = RMSNorm(cfg.d_model), RMSNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ffn = make_ffn(cfg)

    def forward(self, x, rope, positions, doc_ids, mask, is_image, real):
        if self.swin:
            h = x + self.attn_norm(self.attn(x, rope, positions, doc_ids, mask))
            y, stats = self.ffn(h, is_image, real)
            return h + self.ffn_norm(y), stats
        h = x + self.attn(self.attn_norm(x), rope, positions, doc_ids, mask)
        y, stats = self.ffn(self.ffn_norm(h), is_image, real)
        return h + y, stats


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.register_buffer("rope", rotary_table(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("proj.weight", "w2.weight", "w2")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.cfg.n_layers))  # residual outputs
            else:
                nn.init.normal_(p, std=std)
        self.rope = rotary_table(self.cfg.d_model // self.cfg.n_heads, self.cfg.max_seq_len, self.cfg.rope_theta).to(self.rope.device)

    def is_image(self, ids: torch.Tensor) -> torch.Tensor:
        lo, hi = self.cfg.image_range
        return (ids >= lo) & (ids < hi)

    def forward(self, input_ids, positions, doc_ids) -> tuple[torch.Tensor, list[dict]]:
        """Logits [B, T, V] and, per MoE layer, routing statistics."""
        is_image, real = self.is_image(input_ids), doc_ids > 0
        mask = None if self.cfg.attention == "flex" else document_causal_mask(doc_ids)
        x = self.embed(input_ids)
        stats = []
        for layer in self.layers:
            x, s = layer(x, self.rope, positions, doc_ids, mask, is_image, real)
            stats.append(s)
        return self.head(self.norm(x)), stats


def loss_terms(model_cfg: ModelConfig, logits: torch.Tensor, targets: torch.Tensor, stats: list[dict]) -> dict:
    """Training loss and its parts. `loss` = mean cross-entropy over targets + z-loss
    (+ top-2 balance and router z-losses). Sums and counts by the modality of the
    predicted token are returned so that callers can average over ranks and steps."""
    valid = targets != -100
    lse = torch.logsumexp(logits.float(), -1)
    picked = logits.float().gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    nll = torch.where(valid, lse - picked, 0.0)
    n = valid.sum().clamp(min=1)
    ce = nll.sum() / n
    z = model_cfg.z_loss * torch.where(valid, lse.pow(2), 0.0).sum() / n
    lo, hi = model_cfg.image_range
    image = valid & (targets >= lo) & (targets < hi)
    text = valid & ~image
    aux = logits.new_zeros((), dtype=torch.float32)
    for layer in stats:
        for s in layer.values():
            if "balance" in s:
                aux = aux + model_cfg.balance_loss * s["balance"] + model_cfg.router_z_loss * s["router_z"]
    return {
        "loss": ce + z + aux, "ce": ce.detach(), "z_loss": z.detach(), "aux_loss": aux.detach(),
        "text_nll": (nll * text).sum().detach(), "text_n": text.sum(),
        "image_nll": (nll * image).sum().detach(), "image_n": image.sum(),
    }


def expert_load(stats: list[dict]) -> dict:
    """Per group: share of routed token slots per expert (summed over layers) and the share
    of tokens that no expert took."""
    out = {}
    for layer in stats:
        for group, s in layer.items():
            acc = out.setdefault(group, {"load": 0, "unrouted": 0, "tokens": 0})
            acc["load"] = acc["load"] + s["load"].detach()
            acc["unrouted"] = acc["unrouted"] + s["unrouted"].detach()
            acc["tokens"] = acc["tokens"] + s["tokens"].detach()
    return out


def active_params(cfg: ModelConfig) -> int:
    """Parameters one token uses (for FLOPs/MFU): embeddings excluded, one expert's FFN
    (two for top-2), everything else dense."""
    d, f = cfg.d_model, cfg.ffn_hidden
    per_expert = 3 * d * f
    ffn = 2 * per_expert if cfg.model == "moe" and cfg.routing == "top2" else per_expert
    attn = 4 * d * d
    return cfg.n_layers * (attn + ffn) + d * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active parameters + attention scores (PaLM's estimate)."""
    return 6 * active_params(cfg) + 12 * cfg.n_layers * cfg.d_model * seq_len
