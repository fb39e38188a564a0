"""A Chameleon-style decoder with dense, MoE or MoMa (modality-aware MoE) feed-forwards.

RMSNorm, rotary positions (restarting at each document), SwiGLU, QK-norm, optional
"swin norm" (Chameleon's reordering: normalise each sub-block's output before the
residual add), document-masked causal attention (a token sees only earlier tokens of
its own document) and a z-loss on the output softmax. `qk_norm="chameleon"` and
`norm_eps` give Chameleon's own variants, so its checkpoints load (trainer/hf_export.py).

A token's modality is a function of its id: it is an image token iff its id lies in
`image_range`. The model takes the batch contract of `mmtok.loader.PlanLoader`.

`mod-moma` adds Mixture-of-Depths (Raposo et al. 2024) before the MoE routing: in layers
0, 2, 4, ... a router lets only the top `mod_capacity` share of the batch's tokens through
the block; the others skip it on the residual path, and the router weight (a sigmoid)
multiplies the block's update. `routing="causal"` replaces every batch-wide choice (MoD
and expert choice) by the auxiliary routers' per-token predictions; with a `cache` (one
dict per layer) the model decodes incrementally, one document per row.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from mmtok.trainer.config import ModelConfig
from mmtok.trainer.kernels import linear_cross_entropy
from mmtok.trainer.moe import AuxRouter, MoEFFN, MoMaFFN, aux_stats


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


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        def qk_norm() -> nn.Module:
            return RMSNorm(self.head_dim) if cfg.qk_norm == "rms" else HeadLayerNorm(self.n_heads, self.head_dim)

        self.q_norm, self.k_norm = qk_norm(), qk_norm()
        self.flex = cfg.attention == "flex"

    def forward(self, x, rope, positions, doc_ids, mask, cache=None):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)  # QK-norm keeps attention logits bounded
        q, k = apply_rotary(q, rope, positions), apply_rotary(k, rope, positions)
        if cache is not None:  # incremental decoding: new queries see every cached key of their row
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
            n = k.shape[2]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(t, n, dtype=torch.bool, device=x.device).tril(n - t))
        elif self.flex:  # the decoder passes a BlockMask; other callers may pass a bool mask or none
            block = mask if mask is not None and not isinstance(mask, torch.Tensor) else document_block_mask(doc_ids)
            y = flex_document_attention(q, k, v, block)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d, hidden, bias=False)
        self.w3 = nn.Linear(d, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d, bias=False)

    def forward(self, x, is_image=None, real=None, causal=False):
        return self.w2(F.silu(self.w1(x)) * self.w3(x)), {}


def make_ffn(cfg: ModelConfig) -> nn.Module:
    noise = cfg.router_noise == "gumbel"
    if cfg.model == "dense":
        return SwiGLU(cfg.d_model, cfg.ffn_hidden)
    if cfg.model == "moe":
        return MoEFFN(cfg.d_model, cfg.ffn_hidden, int(cfg.experts), cfg.routing, cfg.capacity_factor, noise)
    (_, n_text), (_, n_image) = cfg.groups
    return MoMaFFN(cfg.d_model, cfg.ffn_hidden, n_text, n_image, cfg.capacity_factor, noise)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, depth_routed: bool = False):
        super().__init__()
        self.swin = cfg.swin_norm
        self.attn_norm, self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps), RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn = make_ffn(cfg)
        self.mod_capacity = cfg.mod_capacity
        if depth_routed:  # Mixture-of-Depths router and its causal predictor
            self.mod_router = nn.Linear(cfg.d_model, 1, bias=False)
            self.mod_aux = AuxRouter(cfg.d_model, 1)
        else:
            self.mod_router = None

    def inner(self, x, rope, positions, doc_ids, mask, is_image, real, causal=False, cache=None):
        if self.swin:
            h = x + self.attn_norm(self.attn(x, rope, positions, doc_ids, mask, cache))
            y, stats = self.ffn(h, is_image, real, causal)
            return h + self.ffn_norm(y), stats
        h = x + self.attn(self.attn_norm(x), rope, positions, doc_ids, mask, cache)
        y, stats = self.ffn(self.ffn_norm(h), is_image, real, causal)
        return h + y, stats

    def forward(self, x, rope, positions, doc_ids, mask, is_image, real, causal=False, cache=None):
        if self.mod_router is None:
            return self.inner(x, rope, positions, doc_ids, mask, is_image, real, causal, cache)
        return self.depth_routed(x, rope, positions, doc_ids, is_image, real, causal, cache)

    def depth_routed(self, x, rope, positions, doc_ids, is_image, real, causal, cache):
        """Mixture-of-Depths: the chosen tokens pass through the block packed into one row, in
        batch order (a document id per source row keeps rows apart in attention); the rest
        keep x. Chosen = the top `mod_capacity` share of the batch's real tokens by router
        weight, or (causal) those the auxiliary router passes.

        Batch routing keeps static shapes and never waits for the GPU: it always packs
        ceil(capacity * B * T) tokens, rounded up to a multiple of 8 for the attention kernels,
        best first, and marks as passed only the best ceil(capacity * real tokens); the rest of
        the pack (padding, rounding) gets no expert and no update."""
        b, t, d = x.shape
        flat, real = x.reshape(b * t, d), real.reshape(-1)
        weight = torch.sigmoid(self.mod_router(flat).squeeze(-1).float())  # [B*T]
        # a frozen auxiliary router's predictions would only be thrown away in training
        use_aux = causal or not (self.training and not self.mod_aux.out.weight.requires_grad)
        aux = self.mod_aux(flat.detach()).squeeze(-1) if use_aux else None
        n_real = real.sum()
        if causal:  # data-dependent count: waits for the device, as decoding does anyway
            idx = ((aux > 0) & real).nonzero().squeeze(1)
            passed = torch.ones_like(idx, dtype=torch.bool)
        else:
            slots = min(b * t, math.ceil(self.mod_capacity * b * t / 8) * 8)
            best = weight.masked_fill(~real, -1.0).topk(slots).indices  # padding ranks last
            passed = torch.arange(slots, device=x.device) < (n_real.double() * self.mod_capacity).ceil()
            idx, order = best.sort()
            passed = passed[order]
        stats = {"passed": passed.sum().float(), "candidates": n_real.float()}
        if use_aux:
            take = torch.zeros_like(real).index_copy_(0, idx, passed)
            stats |= aux_stats(aux.unsqueeze(1), take.unsqueeze(1), real)
        if idx.numel() == 0:
            return x, {"mod": stats}
        if cache is not None and b > 1:
            raise ValueError("incremental decoding through Mixture-of-Depths layers takes one row at a time")
        pick = lambda z: z.reshape(-1).index_select(0, idx).unsqueeze(0)  # noqa: E731
        docs = doc_ids.reshape(-1).index_select(0, idx).long() + (idx // t) * (doc_ids.max().long() + 1)
        docs = torch.where(passed, docs, 0).unsqueeze(0)  # the rest of the pack is one document of its own
        xs = flat.index_select(0, idx).unsqueeze(0)
        mask = None if cache is not None else attention_mask(docs, self.attn.flex)
        ys, inner_stats = self.inner(xs, rope, pick(positions), docs, mask, pick(is_image), passed.unsqueeze(0),
                                     causal, cache)
        update = (ys - xs).squeeze(0) * (weight.index_select(0, idx) * passed).unsqueeze(-1).to(x.dtype)
        return flat.index_add(0, idx, update).view(b, t, d), inner_stats | {"mod": stats}


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, cfg.model == "mod-moma" and i % 2 == 0) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.register_buffer("rope", rotary_table(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta), persistent=False)
        self.reset_parameters()
        # Auxiliary routers train only in joint mode or in the aux-routers stage; frozen here they
        # also stay out of the main optimizer's state (checkpoints agree on resume).
        self.set_aux_trainable(cfg.aux_routers == "joint")

    def set_aux_trainable(self, aux: bool, rest: bool = True) -> None:
        for name, p in self.named_parameters():
            p.requires_grad_(aux if is_aux_param(name) else rest)

    def reset_parameters(self) -> None:
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith("norm.bias"):
                nn.init.zeros_(p)
            elif name.endswith(("proj.weight", "w2.weight", "w2")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.cfg.n_layers))  # residual outputs
            else:
                nn.init.normal_(p, std=std)
        self.rope = rotary_table(self.cfg.d_model // self.cfg.n_heads, self.cfg.max_seq_len, self.cfg.rope_theta).to(self.rope.device)

    def is_image(self, ids: torch.Tensor) -> torch.Tensor:
        lo, hi = self.cfg.image_range
        return (ids >= lo) & (ids < hi)

    def forward(self, input_ids, positions, doc_ids, routing: str = "batch", cache: list | None = None,
                targets: torch.Tensor | None = None) -> tuple[torch.Tensor | dict, list[dict]]:
        """Logits [B, T, V] and, per MoE layer, routing statistics. `routing`: "batch"
        (expert choice over the batch, as trained) or "causal" (auxiliary routers). `cache`
        (a list of one dict per layer, empty at first) makes the call incremental. With
        `targets` [B, T] the head runs fused with the loss (trainer/kernels.py: the full
        logits never exist) and the first result is {"loss": cross-entropy + z-loss, "nll",
        "lse" per token}, which `loss_terms` takes in place of logits (the training path)."""
        if routing not in ("batch", "causal"):
            raise ValueError(f"unknown routing mode {routing!r}; choose batch or causal")
        is_image, real = self.is_image(input_ids), doc_ids > 0
        mask = None if cache is not None else attention_mask(doc_ids, self.cfg.attention == "flex")
        x = self.embed(input_ids)
        stats = []
        for i, layer in enumerate(self.layers):
            x, s = layer(x, self.rope, positions, doc_ids, mask, is_image, real, routing == "causal",
                         None if cache is None else cache[i])
            stats.append(s)
        if targets is None:
            return self.head(self.norm(x)), stats
        h = self.norm(x)
        loss, nll, lse = linear_cross_entropy(h.flatten(0, 1), self.head.weight, targets.flatten(), self.cfg.z_loss)
        return {"loss": loss, "nll": nll.view_as(targets), "lse": lse.view_as(targets)}, stats


def is_aux_param(name: str) -> bool:
    """Parameters of the auxiliary routers (expert choice and Mixture-of-Depths)."""
    return ".aux." in name or ".mod_aux." in name


def loss_terms(model_cfg: ModelConfig, logits: torch.Tensor | dict, targets: torch.Tensor, stats: list[dict]) -> dict:
    """Training loss and its parts. `loss` = mean cross-entropy over targets + z-loss
    (+ top-2 balance and router z-losses). Sums and counts by the modality of the
    predicted token are returned so that callers can average over ranks and steps.
    `logits` is the logits tensor or the fused head's result (`Decoder.forward(targets=)`)."""
    valid = targets != -100
    n = valid.sum().clamp(min=1)
    if isinstance(logits, dict):  # fused head: its loss carries the gradient, nll and lse are statistics
        nll, lse = logits["nll"], logits["lse"]
    else:
        lse = torch.logsumexp(logits.float(), -1)
        picked = logits.float().gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        nll = torch.where(valid, lse - picked, 0.0)
    ce = nll.sum() / n
    z = model_cfg.z_loss * torch.where(valid, lse.pow(2), 0.0).sum() / n
    lm = logits["loss"] if isinstance(logits, dict) else ce + z
    lo, hi = model_cfg.image_range
    image = valid & (targets >= lo) & (targets < hi)
    text = valid & ~image
    aux = nll.new_zeros((), dtype=torch.float32)
    aux_bce = nll.new_zeros((), dtype=torch.float32)
    for layer in stats:
        for s in layer.values():
            if "balance" in s:
                aux = aux + model_cfg.balance_loss * s["balance"] + model_cfg.router_z_loss * s["router_z"]
            if "aux_bce" in s:
                aux_bce = aux_bce + s["aux_bce"]
    # Auxiliary routers see detached inputs, so adding their BCE trains them and nothing else.
    joint = aux_bce if model_cfg.aux_routers == "joint" else 0.0
    return {
        "loss": lm + aux + joint, "ce": ce.detach(), "z_loss": z.detach(), "aux_loss": aux.detach(),
        "aux_router_bce": aux_bce,
        "text_nll": (nll * text).sum().detach(), "text_n": text.sum(),
        "image_nll": (nll * image).sum().detach(), "image_n": image.sum(),
    }


def expert_load(stats: list[dict]) -> dict:
    """Per group: share of routed token slots per expert (summed over layers) and the share
    of tokens that no expert took."""
    out = {}
    for layer in stats:
        for group, s in layer.items():
            if "load" not in s:  # Mixture-of-Depths statistics, not an expert group
                continue
            acc = out.setdefault(group, {"load": 0, "unrouted": 0, "tokens": 0})
            acc["load"] = acc["load"] + s["load"].detach()
            acc["unrouted"] = acc["unrouted"] + s["unrouted"].detach()
            acc["tokens"] = acc["tokens"] + s["tokens"].detach()
    return out


def active_params(cfg: ModelConfig) -> int:
    """Parameters one token uses in a block it passes through (embeddings excluded): one
    expert's FFN (two for top-2), everything else dense; plus the output head."""
    d, f = cfg.d_model, cfg.ffn_hidden
    per_expert = 3 * d * f
    ffn = 2 * per_expert if cfg.model == "moe" and cfg.routing == "top2" else per_expert
    attn = 4 * d * d
    return cfg.n_layers * (attn + ffn) + d * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active parameters + attention scores (PaLM's estimate).
    Mixture-of-Depths blocks count only the share of tokens that pass through them, and
    those tokens attend to that share of the keys; skipped tokens do no work there."""
    d = cfg.d_model
    block = 6 * (active_params(cfg) - d * cfg.vocab_size) / cfg.n_layers
    scores = 12 * d * seq_len
    routed = (cfg.n_layers + 1) // 2 if cfg.model == "mod-moma" else 0
    c = cfg.mod_capacity
    return (6 * d * cfg.vocab_size + (cfg.n_layers - routed) * (block + scores)
            + routed * (c * block + c * c * scores))
