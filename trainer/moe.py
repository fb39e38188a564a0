"""Mixture-of-experts feed-forward layers.

Experts are stacked weights, never a per-token loop: expert choice runs them as one grouped
GEMM per projection (`torch._grouped_mm`: each expert's rows follow the previous
expert's, so only chosen tokens are computed) where the build and dtype allow it, else as a
padded batched matmul (`bmm`). Expert choice keeps static shapes and never waits for the
device (no `.item()`, no `nonzero`): a group's capacity is a tensor, the top-k runs at the
largest capacity the batch shape allows, and only its first k rows count. That makes the
blocks compile-clean (`torch.compile(fullgraph=True)`). Three routers:

- `ExpertChoice`: each expert picks its top-k tokens by its centred router logit
  (`selection_scores`) and scales them by a sigmoid gate (Zhou et al. 2022; MoMa inside
  each modality group). k = ceil(tokens * capacity_factor / experts), so the
  load is balanced by construction and no balancing loss is needed. A token may be picked
  by several experts or by none (then only the residual carries it).
- `TopTwo`: each token picks its two best experts by softmax (token choice, as MM1 and
  Uni-MoE use), dropless, with a load-balancing loss and a router z-loss. Its gate
  (`top2_gate`) and its layout of assignments per expert (`dispatch`) are the ones Uni-MoE's
  LoRA experts use too.
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


def grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` can run the experts: the build has it, the compute dtype
    is bf16 or fp16 (fp32 too on CPU, eager only: the compiler's shape rules refuse it), and
    rows are 16-byte aligned (its stride rule)."""
    if not hasattr(torch, "_grouped_mm") or x.device.type not in ("cpu", "cuda"):
        return False
    dt = compute_dtype(x)
    fp32 = x.device.type == "cpu" and not torch.compiler.is_compiling()
    if dt not in (torch.bfloat16, torch.float16) and not (fp32 and dt == torch.float32):
        return False
    size = torch.empty((), dtype=dt).element_size()
    return all(n * size % 16 == 0 for n in w.shape[1:])


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on (benchmarks), else the input's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class Experts(nn.Module):
    """E SwiGLU feed-forward networks as stacked weights: x [E, C, d] -> [E, C, d] (padded
    batched matmul), or x [S, d] with `counts` [E] -> [S, d] (grouped GEMM)."""

    def __init__(self, n: int, d: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n, d, hidden))
        self.w3 = nn.Parameter(torch.empty(n, d, hidden))
        self.w2 = nn.Parameter(torch.empty(n, hidden, d))

    def forward(self, x: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
        if counts is None:
            return torch.bmm(F.silu(torch.bmm(x, self.w1)) * torch.bmm(x, self.w3), self.w2)
        # x [S, d]: expert e's counts[e] rows follow expert e-1's. The grouped GEMM leaves rows
        # past the last group unwritten, so each output is masked: the rest come back as zeros
        # and no stray value reaches a gradient (the caller zeroes those input rows too).
        dt = compute_dtype(x)
        offs = counts.cumsum(0).to(torch.int32)
        keep = (torch.arange(x.shape[0], device=x.device) < offs[-1]).unsqueeze(-1)
        x = x.to(dt)

        def mm(a, w):
            return torch.where(keep, torch._grouped_mm(a, w.to(dt), offs), 0)

        return mm(F.silu(mm(x, self.w1)) * mm(x, self.w3), self.w2)

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


def aux_stats(logits: torch.Tensor, chosen: torch.Tensor, rows: torch.Tensor | None = None) -> dict:
    """BCE of auxiliary logits [N, n] against the batch router's selections, and counts over
    the rows where the mask `rows` [N] is set (all if None): hits (prediction = selection),
    predictions made, true positives, selections, predicted selections (for the trivial
    rate, precision and recall). A mask, not a selection, keeps the shapes static."""
    keep = torch.ones_like(chosen) if rows is None else rows.unsqueeze(-1).expand_as(chosen)
    n = keep.sum().float()
    bce = F.binary_cross_entropy_with_logits(logits, chosen.float(), weight=keep.float(), reduction="sum") / n.clamp(min=1)
    pred, chosen = (logits > 0) & keep, chosen & keep
    return {"aux_bce": bce, "aux_hits": ((pred == chosen) & keep).sum().float(), "aux_n": n,
            "aux_tp": (pred & chosen).sum().float(), "aux_pos": chosen.sum().float(), "aux_pred": pred.sum().float()}


def gumbel_sigmoid_noise(logits: torch.Tensor) -> torch.Tensor:
    """Logistic noise (the difference of two Gumbels): sigmoid(logits + noise) is a Gumbel-sigmoid."""
    u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    return torch.log(u) - torch.log1p(-u)


def capacity(n_tokens, n_experts: int, factor: float):
    """Tokens each expert takes: tokens / experts (times the factor), at least 1, at most all.
    `n_tokens` may be a tensor (a count on the device): then so is the answer, with no sync."""
    if isinstance(n_tokens, torch.Tensor):
        k = torch.ceil(n_tokens.double() * factor / n_experts).clamp(min=1).long()
        return torch.minimum(k, n_tokens.long())  # 0 when there are no tokens
    if n_tokens == 0:
        return 0
    return min(n_tokens, max(1, math.ceil(n_tokens * factor / n_experts)))


_recent_rows: list = []  # [(key, weakref to the mask, rows)], newest last


def token_rows(real: torch.Tensor) -> torch.Tensor:
    """Flat indices of the real tokens, ascending (for top-2 routing, whose expert loads are
    data-dependent anyway). Finding them waits for the GPU; every layer of a forward asks
    with the same unchanged mask tensor, so the last answers are kept while it lives and is
    not modified in place."""
    key = (id(real), real._version)
    for i, (k, ref, rows) in enumerate(_recent_rows):
        if k == key and ref() is real:
            _recent_rows.append(_recent_rows.pop(i))  # least recently used goes first
            return rows
    rows = real.reshape(-1).nonzero().squeeze(1)
    _recent_rows.append((key, weakref.ref(real), rows))
    del _recent_rows[:-2]
    return rows


def selection_scores(logits: torch.Tensor) -> torch.Tensor:
    """What each expert ranks tokens by: its router logit minus the token's mean logit over
    the group's experts. Trained routers share one direction ("this token wants an FFN"):
    ranked on raw gates every expert picks the same tokens and most reach none. Centred, that
    common part cancels and experts compete for tokens, as the softmax over experts of Zhou
    et al.'s expert choice makes them; the gate that scales the output stays the sigmoid.
    A lone expert keeps its logit (its centred score would be 0 for every token)."""
    return logits - logits.mean(1, keepdim=True) if logits.shape[1] > 1 else logits


class ExpertChoice(nn.Module):
    # "centred" (selection_scores) or "gate" (rank on the sigmoid gate itself, as before the
    # fix; kept for benchmarks/bench_routing_coverage.py's before/after)
    select = "centred"

    def __init__(self, d: int, hidden: int, n_experts: int, capacity_factor: float = 1.0, noise: bool = False):
        super().__init__()
        self.n_experts, self.capacity_factor, self.noise = n_experts, capacity_factor, noise
        self.router = nn.Linear(d, n_experts, bias=False)
        self.experts = Experts(n_experts, d, hidden)
        self.aux = AuxRouter(d, n_experts)

    def route(self, x: torch.Tensor, member: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gates [E, K] and token indices [E, K] of x [N, d], best first per expert, and each
        expert's capacity k (a tensor): its first k are its choice among the tokens where
        `member` [N] is set (all if None). K = the capacity at N members, so the shapes depend
        on the batch shape alone."""
        logits = self.router(x).float()  # [N, E]
        if self.noise and self.training:  # upcycled training: Gumbel-sigmoid exploration
            logits = logits + gumbel_sigmoid_noise(logits)
        gates = torch.sigmoid(logits)
        n_all, n_e = x.shape[0], self.n_experts
        n = x.new_full((), n_all, dtype=torch.long) if member is None else member.sum()
        k = capacity(n, n_e, self.capacity_factor)
        if self.capacity_factor >= n_e:  # every expert takes every member (e.g. one expert per group)
            order = torch.arange(n_all, device=x.device) if member is None else (~member).byte().argsort(stable=True)
            return gates.index_select(0, order).T, order.expand(n_e, n_all), k
        scores = selection_scores(logits) if self.select == "centred" else gates
        if member is not None:  # non-members rank after every member
            scores = scores.masked_fill(~member.unsqueeze(1), -math.inf)
        idx = scores.T.topk(capacity(n_all, n_e, self.capacity_factor), dim=1).indices
        return gates.T.gather(1, idx), idx, k

    def forward(self, x: torch.Tensor, causal: bool = False) -> tuple[torch.Tensor, dict]:
        out = torch.zeros_like(x)
        return out, self.add_into(out, x, None, causal)

    def add_into(self, out: torch.Tensor, x: torch.Tensor, member: torch.Tensor | None, causal: bool = False) -> dict:
        """Adds this layer's output for the tokens where `member` [N] is set (all of x [N, d]
        if None) into out, gathering from and scattering into the caller's tensors directly;
        returns the routing statistics."""
        if causal:
            return self.add_causal(out, x, member)
        gate, idx, k = self.route(x, member)
        n_e, cap, d = *idx.shape, x.shape[-1]
        if grouped_mm_ok(x, self.experts.w1):
            # packed: expert e's k choices at rows [e*k, (e+1)*k); rows from E*k on are unused
            s = torch.arange(n_e * cap, device=x.device)
            e = (s // k.clamp(min=1)).clamp(max=n_e - 1)
            j = (s - e * k).clamp(max=cap - 1)
            used, pick, g = s < n_e * k, idx[e, j], gate[e, j]
            counts = k.expand(n_e)
        else:  # padded [E, K]: each expert's rows past its k are unused
            used = (torch.arange(cap, device=x.device) < k).expand(n_e, cap).reshape(-1)
            pick, g, counts = idx.reshape(-1), gate.reshape(-1), None
        used = used.unsqueeze(-1)
        # index_select/index_add_ rather than x[idx] and index_put_: their backward passes
        # are a plain scatter-add and gather, with no sort of the indices.
        xs = torch.where(used, x.index_select(0, pick), 0)
        y = self.experts(xs if counts is not None else xs.view(n_e, cap, d), counts).reshape(-1, d)
        out.index_add_(0, pick, torch.where(used, y * g.unsqueeze(-1).to(y.dtype), 0).to(out.dtype))
        chosen = torch.zeros(n_e, x.shape[0], dtype=torch.bool, device=x.device).scatter_(
            1, idx, (torch.arange(cap, device=x.device) < k).expand(n_e, cap)).T  # [N, E]: each expert's row of idx has no repeats
        unrouted = ~chosen.any(1) if member is None else member & ~chosen.any(1)
        stats = {"load": k.float().expand(n_e), "unrouted": unrouted.sum().float(),
                 "tokens": (x.new_full((), x.shape[0], dtype=torch.long) if member is None else member.sum()).float()}
        if self.training and not self.aux.out.weight.requires_grad:
            return stats  # a frozen auxiliary router's predictions would only be thrown away
        # The auxiliary router learns on detached inputs: its loss never reaches the main weights.
        return stats | aux_stats(self.aux(x.detach()), chosen, member)

    def add_causal(self, out: torch.Tensor, x: torch.Tensor, member: torch.Tensor | None) -> dict:
        """Each token alone: experts whose auxiliary score passes 0.5, weighted by the main gates
        (data-dependent shapes: decoding waits for the device anyway)."""
        rows = None if member is None else member.nonzero().squeeze(1)
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


def top2_gate(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Token-choice top-2 over router logits [n, E]: each token's two experts [n, 2], their
    softmax weights renormalised to sum to 1, and the losses that keep the router healthy:
    Switch-style balance, E * sum_e (share of assignments to e) * (mean prob of e), which is 1
    when perfectly balanced, and the router z-loss, which keeps the logits small."""
    n, n_e = logits.shape
    probs = logits.softmax(-1)
    weight, expert = probs.topk(2, dim=-1)
    weight = weight / weight.sum(-1, keepdim=True)
    share = torch.bincount(expert.reshape(-1), minlength=n_e).float() / max(2 * n, 1)
    balance = n_e * (share * probs.mean(0)).sum() if n else logits.sum() * 0
    router_z = torch.logsumexp(logits, -1).pow(2).mean() if n else logits.sum() * 0
    return weight, expert, {"balance": balance, "router_z": router_z}


def dispatch(expert: torch.Tensor, n_experts: int, cap: int | None = None):
    """Token-choice assignments expert [n, k] laid out per expert, in token order: for each
    kept assignment, sorted by expert, its index into `expert.reshape(-1)` (the token is
    that // k), its expert and its slot among the expert's rows; each expert keeps its first
    `cap` (all if None: dropless). Also every expert's count before the cap."""
    flat = expert.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    by_expert = flat[order]
    slot = torch.arange(flat.numel(), device=expert.device) - (counts.cumsum(0) - counts)[by_expert]
    if cap is not None:
        keep = slot < cap
        order, by_expert, slot = order[keep], by_expert[keep], slot[keep]
    return order, by_expert, slot, counts


class TopTwo(nn.Module):
    def __init__(self, d: int, hidden: int, n_experts: int):
        super().__init__()
        self.n_experts = n_experts
        self.router = nn.Linear(d, n_experts, bias=False)
        self.experts = Experts(n_experts, d, hidden)

    def forward(self, x: torch.Tensor, causal: bool = False) -> tuple[torch.Tensor, dict]:
        # token choice is causal already: `causal` changes nothing
        n, d = x.shape[0], x.shape[-1]
        weight, expert, losses = top2_gate(self.router(x).float())
        # dropless: a padded [E, C, d] batch, C = the busiest expert's count
        order, by_expert, slot, counts = dispatch(expert, self.n_experts)
        token = order // 2
        buf = x.new_zeros(self.n_experts, int(counts.max()) if n else 0, d)
        buf[by_expert, slot] = x[token]
        y = self.experts(buf)[by_expert, slot] * weight.reshape(-1)[order].unsqueeze(-1).to(x.dtype)
        out = torch.zeros_like(x).index_add_(0, token, y)
        stats = {"load": counts.float(), "unrouted": x.new_zeros((), dtype=torch.float32), "tokens": x.new_full((), float(n), dtype=torch.float32)}
        return out, stats | losses


class MoMaFFN(nn.Module):
    """Modality-aware experts: one expert-choice group for text tokens, one for image tokens."""

    def __init__(self, d: int, hidden: int, n_text: int, n_image: int, capacity_factor: float = 1.0, noise: bool = False):
        super().__init__()
        self.text = ExpertChoice(d, hidden, n_text, capacity_factor, noise)
        self.image = ExpertChoice(d, hidden, n_image, capacity_factor, noise)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = torch.zeros_like(flat)
        real, is_image = ctx.real.reshape(-1), ctx.is_image.reshape(-1)
        self.routing_stats = {"text": self.text.add_into(out, flat, real & ~is_image, ctx.causal),
                              "image": self.image.add_into(out, flat, real & is_image, ctx.causal)}
        return out.view_as(x)


class MoEFFN(nn.Module):
    """Modality-blind experts over all tokens (MoMa's "moe 8x" baseline, or token-choice top-2)."""

    def __init__(self, d: int, hidden: int, n_experts: int, routing: str, capacity_factor: float = 1.0, noise: bool = False):
        super().__init__()
        self.all = ExpertChoice(d, hidden, n_experts, capacity_factor, noise) if routing == "expert-choice" else TopTwo(d, hidden, n_experts)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = torch.zeros_like(flat)
        if isinstance(self.all, ExpertChoice):
            stats = self.all.add_into(out, flat, ctx.real.reshape(-1), ctx.causal)
        else:
            rows = token_rows(ctx.real)
            y, stats = self.all(flat.index_select(0, rows), ctx.causal)
            out.index_add_(0, rows, y)
        self.routing_stats = {"all": stats}
        return out.view_as(x)
