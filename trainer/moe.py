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

Expert choice sees the whole batch, so it is not causal. Each expert-choice router has an
`AuxRouter` (MoMa's auxiliary router) that learns, from a token's hidden state alone,
whether each expert would pick it; with `causal=True` a token goes to the experts whose
auxiliary score passes 0.5, weighted by the main router's gates, so its routing depends
on nothing but itself.
"""

from __future__ import annotations

import math
import weakref

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

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e alone on x [N, d]."""
        return (F.silu(x @ self.w1[e]) * (x @ self.w3[e])) @ self.w2[e]


class AuxRouter(nn.Module):
    """d -> d/2 -> n logits (SiLU): predicts from one hidden state whether each of n batch
    routers would select the token (sigmoid > 0.5, i.e. logit > 0)."""

    def __init__(self, d: int, n: int):
        super().__init__()
        self.up = nn.Linear(d, d // 2)
        self.out = nn.Linear(d // 2, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.silu(self.up(x))).float()


def aux_stats(logits: torch.Tensor, chosen: torch.Tensor) -> dict:
    """BCE of auxiliary logits [N, n] against the batch router's selections, and hits."""
    n = max(chosen.numel(), 1)
    bce = F.binary_cross_entropy_with_logits(logits, chosen.float(), reduction="sum") / n
    return {"aux_bce": bce, "aux_hits": ((logits > 0) == chosen).sum().float(),
            "aux_n": logits.new_full((), float(chosen.numel()), dtype=torch.float32)}


def gumbel_sigmoid_noise(logits: torch.Tensor) -> torch.Tensor:
    """Logistic noise (the difference of two Gumbels): sigmoid(logits + noise) is a Gumbel-sigmoid."""
    u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    return torch.log(u) - torch.log1p(-u)


def capacity(n_tokens: int, n_experts: int, factor: float) -> int:
    """Tokens each expert takes: tokens / experts (times the factor), at least 1, at most all."""
    if n_tokens == 0:
        return 0
    return min(n_tokens, max(1, math.ceil(n_tokens * factor / n_experts)))


_recent_rows: list = []  # [(key, weakrefs to the masks, rows)], newest last


def token_rows(real: torch.Tensor, is_image: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Flat indices of the real tokens ([all]), or of the real text and the real image
    tokens ([text, image]), ascending. Finding them waits for the GPU (data-dependent
    sizes). Every unrouted layer of a forward asks with the same unchanged mask tensors,
    and Mixture-of-Depths layers in between ask with their own, so the last few answers
    are kept while those tensors live and are not modified in place."""
    masks = (real,) if is_image is None else (real, is_image)
    key = tuple((id(m), m._version) for m in masks)
    for i, (k, refs, rows) in enumerate(_recent_rows):
        if k == key and all(r() is m for r, m in zip(refs, masks)):
            _recent_rows.append(_recent_rows.pop(i))  # least recently used goes first
            return rows
    if is_image is None:
        rows = [real.reshape(-1).nonzero().squeeze(1)]
    else:  # one host sync for both groups: a stable sort by group (text 0, image 1, padding 2)
        group = torch.where(real, is_image.long(), 2).reshape(-1)
        counts = torch.bincount(group, minlength=3).tolist()
        rows = list(group.argsort(stable=True).split(counts)[:2])
    _recent_rows.append((key, tuple(weakref.ref(m) for m in masks), rows))
    del _recent_rows[:-2]  # the forward's own masks and the latest routed layer's
    return rows


class ExpertChoice(nn.Module):
    def __init__(self, d: int, hidden: int, n_experts: int, capacity_factor: float = 1.0, noise: bool = False):
        super().__init__()
        self.n_experts, self.capacity_factor, self.noise = n_experts, capacity_factor, noise
        self.router = nn.Linear(d, n_experts, bias=False)
        self.experts = Experts(n_experts, d, hidden)
        self.aux = AuxRouter(d, n_experts)

    def route(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sigmoid gates [k, E] and chosen token indices [k, E] (into rows) for the tokens
        x[rows] (all of x [N, d] if rows is None)."""
        logits = self.router(x).float()  # [N, E]: cheaper to score every token than to gather
        if rows is not None:
            logits = logits.index_select(0, rows)
        if self.noise and self.training:  # upcycled training: Gumbel-sigmoid exploration
            logits = logits + gumbel_sigmoid_noise(logits)
        gates = torch.sigmoid(logits)
        n = logits.shape[0]
        k = capacity(n, self.n_experts, self.capacity_factor)
        if k == n:  # every expert takes every token (e.g. one expert per group): nothing to select
            return gates, torch.arange(n, device=x.device).unsqueeze(1).expand(n, self.n_experts)
        # topk along the contiguous token axis, unsorted: the same set, without a full sort
        gate, idx = gates.T.topk(k, dim=1, sorted=False)
        return gate.T, idx.T

    def forward(self, x: torch.Tensor, causal: bool = False) -> tuple[torch.Tensor, dict]:
        out = torch.zeros_like(x)
        return out, self.add_into(out, x, None, causal)

    def add_into(self, out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor | None, causal: bool = False) -> dict:
        """Adds this layer's output for the tokens x[rows] (all of x if rows is None) into
        out[rows], gathering from and scattering into the caller's tensors directly (no
        per-group copies); returns the routing statistics."""
        if causal:
            return self.add_causal(out, x, rows)
        gate, idx = self.route(x, rows)
        n, k, d = x.shape[0] if rows is None else rows.shape[0], idx.shape[0], x.shape[-1]
        pick = idx.T.reshape(-1) if rows is None else rows[idx.T.reshape(-1)]  # [E*k] rows of x
        # index_select/index_add_ rather than x[idx] and index_put_: their backward passes
        # are a plain scatter-add and gather, with no sort of the indices.
        y = self.experts(x.index_select(0, pick).view(self.n_experts, k, d)) * gate.T.unsqueeze(-1).to(x.dtype)
        out.index_add_(0, pick, y.reshape(-1, d))
        chosen = torch.zeros(n, self.n_experts, dtype=torch.bool, device=x.device).scatter_(0, idx, True)
        # Counts are filled on the device: torch.tensor(n, device=cuda) would sync the host.
        stats = {"load": x.new_full((self.n_experts,), float(k), dtype=torch.float32),
                 "unrouted": (~chosen.any(1)).sum().float(), "tokens": x.new_full((), float(n), dtype=torch.float32)}
        if self.training and not self.aux.out.weight.requires_grad:
            return stats  # a frozen auxiliary router's predictions would only be thrown away
        mine = x.detach() if rows is None else x.detach().index_select(0, rows)
        # The auxiliary router learns on detached inputs: its loss never reaches the main weights.
        return stats | aux_stats(self.aux(mine), chosen)

    def add_causal(self, out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor | None) -> dict:
        """Each token alone: experts whose auxiliary score passes 0.5, weighted by the main gates."""
        mine = x if rows is None else x.index_select(0, rows)
        gates = torch.sigmoid(self.router(mine).float())
        take = self.aux(mine) > 0
        for e in range(self.n_experts):  # a loop over experts, not tokens
            sel = take[:, e].nonzero().squeeze(1)
            if sel.numel():
                y = self.experts.one(e, mine[sel]) * gates[sel, e:e + 1].to(x.dtype)
                out.index_add_(0, sel if rows is None else rows[sel], y)
        return {"load": take.sum(0).float(), "unrouted": (~take.any(1)).sum().float(),
                "tokens": x.new_full((), float(mine.shape[0]), dtype=torch.float32)}


class TopTwo(nn.Module):
    def __init__(self, d: int, hidden: int, n_experts: int):
        super().__init__()
        self.n_experts = n_experts
        self.router = nn.Linear(d, n_experts, bias=False)
        self.experts = Experts(n_experts, d, hidden)

    def forward(self, x: torch.Tensor, causal: bool = False) -> tuple[torch.Tensor, dict]:
        # token choice is causal already: `causal` changes nothing
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
        stats = {"load": counts.float(), "unrouted": x.new_zeros((), dtype=torch.float32), "tokens": x.new_full((), float(n), dtype=torch.float32)}
        return out, stats | {"balance": balance, "router_z": router_z}


class MoMaFFN(nn.Module):
    """Modality-aware experts: one expert-choice group for text tokens, one for image tokens."""

    def __init__(self, d: int, hidden: int, n_text: int, n_image: int, capacity_factor: float = 1.0, noise: bool = False):
        super().__init__()
        self.text = ExpertChoice(d, hidden, n_text, capacity_factor, noise)
        self.image = ExpertChoice(d, hidden, n_image, capacity_factor, noise)

    def forward(self, x: torch.Tensor, is_image: torch.Tensor, real: torch.Tensor, causal: bool = False) -> tuple[torch.Tensor, dict]:
        flat = x.reshape(-1, x.shape[-1])
        out = torch.zeros_like(flat)
        text_rows, image_rows = token_rows(real, is_image)
        stats = {"text": self.text.add_into(out, flat, text_rows, causal),
                 "image": self.image.add_into(out, flat, image_rows, causal)}
        return out.view_as(x), stats


class MoEFFN(nn.Module):
    """Modality-blind experts over all tokens (MoMa's "moe 8x" baseline, or token-choice top-2)."""

    def __init__(self, d: int, hidden: int, n_experts: int, routing: str, capacity_factor: float = 1.0, noise: bool = False):
        super().__init__()
        self.all = ExpertChoice(d, hidden, n_experts, capacity_factor, noise) if routing == "expert-choice" else TopTwo(d, hidden, n_experts)

    def forward(self, x: torch.Tensor, is_image: torch.Tensor, real: torch.Tensor, causal: bool = False) -> tuple[torch.Tensor, dict]:
        flat = x.reshape(-1, x.shape[-1])
        (rows,) = token_rows(real)
        out = torch.zeros_like(flat)
        if isinstance(self.all, ExpertChoice):
            stats = self.all.add_into(out, flat, rows, causal)
        else:
            y, stats = self.all(flat.index_select(0, rows), causal)
            out.index_add_(0, rows, y)
        return out.view_as(x), {"all": stats}
