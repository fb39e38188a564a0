"""Mixture-of-experts feed-forward layers.

Experts are stacked weights run with one batched matmul (`bmm`) per projection, never a
per-token loop. Three routers:

- `ExpertChoice`: each expert picks its top-k tokens by a sigmoid gate (Zhou et al. 2022;
  MoMa inside each modality group). k = ceil(tokens * capacity_factor / experts), so the
  load is balanced by construction and no balancing loss is needed. A token may be picked
  by several experts or by none (then only the residual carries it).
- `TopTwo`: each token picks its two best experts by softmax (token choice, as MM1 and
  Uni-MoE use), dropless, with a load-balancing loss and a router z-loss.
- `MoMaFFN`: per-modality groups; a text token reaches only the text group's experts and
  an image token only the image group's. Padding reaches no expert.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Experts(nn.Module):
    """E SwiGLU feed-forward networks as stacked weights: x [E, C, d] -> [E, C, d]."""

    def __init__(self, n: int, d: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n, d, hidden))
        self.w3 = nn.Parameter(torch.empty(n, d, hidden))
        self.w2 = nn.Parameter(torch.empty(n, hidden, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bmm(F.silu(torch.bmm(x, self.w1)) * torch.bmm(x, self.w3), self.w2)


def capacity(n_tokens: int, n_experts: int, factor: float) -> int:
    """Tokens each expert takes: tokens / experts (times the factor), at least 1, at most all."""
    if n_tokens == 0:
        return 0
    return min(n_tokens, max(1, math.ceil(n_tokens * factor / n_experts)))


class ExpertChoice(nn.Module):
    def __init__(self, d: int, hidden: int, n_experts: int, capacity_factor: float = 1.0):
        super().__init__()
        self.n_experts, self.capacity_factor = n_experts, capacity_factor
        self.router = nn.Linear(d, n_experts, bias=False)
        self.experts = Experts(n_experts, d, hidden)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sigmoid gates [k, E] and chosen token indices [k, E] for tokens x [N, d]."""
        gates = torch.sigmoid(self.router(x).float())
        k = capacity(x.shape[0], self.n_experts, self.capacity_factor)
        return gates.topk(k, dim=0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        gate, idx = self.route(x)
        y = self.experts(x[idx.T]) * gate.T.unsqueeze(-1).to(x.dtype)  # [E, k, d]
        out = torch.zeros_like(x).index_add_(0, idx.T.reshape(-1), y.reshape(-1, x.shape[-1]))
        reached = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        reached[idx.reshape(-1)] = True
        load = torch.full((self.n_experts,), idx.shape[0], dtype=torch.float32, device=x.device)
        return out, {"load": load, "unrouted": (~reached).sum().float(), "tokens": torch.tensor(float(x.shape[0]), device=x.device)}


class TopTwo(nn.Module):
    def __init__(self, d: int, hidden: int, n_experts: int):
        super().__init__()
        self.n_experts = n_experts
        self.router = nn.Linear(d, n_experts, bias=False)
        self.experts = Experts(n_experts, d, hidden)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        n, d, E = x.shape[0], x.shape[-1], self.n_experts
        logits = self.router(x).float()
        probs = logits.softmax(-1)
        weight, expert = probs.topk(2, dim=-1)
        weight = weight / weight.sum(-1, keepdim=True)
        # Sort the 2N (token, expert) assignments by expert and lay them out as a padded
        # [E, C, d] batch, C = the busiest expert's count (dropless).
        flat = expert.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=E)
        by_expert = flat[order]
        slot = torch.arange(flat.numel(), device=x.device) - (counts.cumsum(0) - counts)[by_expert]
        token = order // 2
        buf = x.new_zeros(E, int(counts.max()) if n else 0, d)
        buf[by_expert, slot] = x[token]
        y = self.experts(buf)[by_expert, slot] * weight.reshape(-1)[order].unsqueeze(-1).to(x.dtype)
        out = torch.zeros_like(x).index_add_(0, token, y)
        # Switch-style balance loss: E * sum_e (share of assignments to e) * (mean prob of e);
        # equals 1 when perfectly balanced. Router z-loss keeps the logits small.
        share = counts.float() / max(flat.numel(), 1)
        balance = E * (share * probs.mean(0)).sum() if n else logits.sum() * 0
        router_z = torch.logsumexp(logits, -1).pow(2).mean() if n else logits.sum() * 0
        stats = {"load": counts.float(), "unrouted": x.new_zeros((), dtype=torch.float32), "tokens": torch.tensor(float(n), device=x.device)}
        return out, stats | {"balance": balance, "router_z": router_z}


class MoMaFFN(nn.Module):
    """Modality-aware experts: one expert-choice group for text tokens, one for image tokens."""

    def __init__(self, d: int, hidden: int, n_text: int, n_image: int, capacity_factor: float = 1.0):
        super().__init__()
        self.text = ExpertChoice(d, hidden, n_text, capacity_factor)
        self.image = ExpertChoice(d, hidden, n_image, capacity_factor)

    def forward(self, x: torch.Tensor, is_image: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, dict]:
        flat = x.reshape(-1, x.shape[-1])
        is_image, real = is_image.reshape(-1), real.reshape(-1)
        out = torch.zeros_like(flat)
        stats = {}
        for name, group, mask in (("text", self.text, ~is_image & real), ("image", self.image, is_image & real)):
            rows = mask.nonzero().squeeze(1)
            y, stats[name] = group(flat[rows])
            out = out.index_add(0, rows, y)
        return out.view_as(x), stats


class MoEFFN(nn.Module):
    """Modality-blind experts over all tokens (MoMa's "moe 8x" baseline, or token-choice top-2)."""

    def __init__(self, d: int, hidden: int, n_experts: int, routing: str, capacity_factor: float = 1.0):
        super().__init__()
        self.all = ExpertChoice(d, hidden, n_experts, capacity_factor) if routing == "expert-choice" else TopTwo(d, hidden, n_experts)

    def forward(self, x: torch.Tensor, is_image: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, dict]:
        flat = x.reshape(-1, x.shape[-1])
        rows = real.reshape(-1).nonzero().squeeze(1)
        y, stats = self.all(flat[rows])
        return torch.zeros_like(flat).index_add(0, rows, y).view_as(x), {"all": stats}
