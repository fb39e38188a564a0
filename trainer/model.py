"""A Chameleon-style decoder: dense, MoE, MoMa (modality-aware MoE), MoMa with
Mixture-of-Depths, or Mixture-of-Transformers.

RMSNorm, rotary positions (restarting at each document), SwiGLU, QK-norm, optional
"swin norm", document-masked causal attention and a z-loss on the output softmax
(trainer/attention.py, trainer/block.py). `qk_norm="chameleon"` and `norm_eps` give
Chameleon's own variants, so its checkpoints load (trainer/hf_export.py).

A token's modality is a function of its id: it is an image token iff its id lies in
`image_range` (`context.image_mask`). The model takes the batch contract of
`mmtok.loader.PlanLoader`. A model family is a block builder in `BLOCKS` (the FFNs come
from a factory, trainer/ffn.py); every layer reads one per-forward `Context` and returns a
tensor. `routing="causal"` replaces every batch-wide choice (MoD and expert choice) by the
auxiliary routers' per-token predictions; with a `cache` (one dict per layer) the model
decodes incrementally, one document per row.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from mmtok.trainer.attention import RMSNorm, attention_mask, rotary_table
from mmtok.trainer.block import Block, FFNFactory
from mmtok.trainer.config import ModelConfig
from mmtok.trainer.context import ROUTINGS, Context, image_mask
from mmtok.trainer.depth import DepthRoutedBlock
from mmtok.trainer.ffn import collect_stats, make_ffn
from mmtok.trainer.kernels import linear_cross_entropy
from mmtok.trainer.mot import MoTBlock


def alternate_depth_routing(cfg: ModelConfig, layer: int, ffn: FFNFactory) -> nn.Module:
    """MoMa's MoD: layers 0, 2, 4, ... are depth-routed."""
    return (DepthRoutedBlock if layer % 2 == 0 else Block)(cfg, layer, ffn)


# A model family = how block `layer` is built; the trainer never branches on the family.
BLOCKS: dict[str, Callable[[ModelConfig, int, FFNFactory], nn.Module]] = {
    "dense": Block, "moe": Block, "moma": Block, "mod-moma": alternate_depth_routing, "mot": MoTBlock,
}


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, ffn: FFNFactory = make_ffn):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(BLOCKS[cfg.model](cfg, i, ffn) for i in range(cfg.n_layers))
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
        """Init by name; a module whose weights the names do not fit (LoRA's B starts at zero)
        re-initialises its own afterwards (`init_weights`)."""
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
        for m in self.modules():
            if hasattr(m, "init_weights"):
                m.init_weights()
        self.rope = rotary_table(self.cfg.d_model // self.cfg.n_heads, self.cfg.max_seq_len, self.cfg.rope_theta).to(self.rope.device)

    def is_image(self, ids: torch.Tensor) -> torch.Tensor:
        return image_mask(ids, self.cfg.image_range)

    def context(self, input_ids, positions, doc_ids, routing: str = "batch", cache: list | None = None,
                expert_route: torch.Tensor | None = None) -> Context:
        """What every layer of this forward reads (the attention mask is built here, once)."""
        if routing not in ROUTINGS:
            raise ValueError(f"unknown routing mode {routing!r}; choose batch or causal")
        mask = None if cache is not None else attention_mask(doc_ids, self.cfg.attention == "flex")
        return Context(self.rope, positions, doc_ids, self.is_image(input_ids), doc_ids > 0, mask, routing, cache,
                       expert_route)

    def forward(self, input_ids, positions, doc_ids, routing: str = "batch", cache: list | None = None,
                targets: torch.Tensor | None = None, *, embed_hook: Callable | None = None,
                expert_route: torch.Tensor | None = None) -> tuple[torch.Tensor | dict, list[dict]]:
        """Logits [B, T, V] and, per layer, its routing statistics (`collect_stats`). `routing`:
        "batch" (expert choice over the batch, as trained) or "causal" (auxiliary routers).
        `cache` (a list of one dict per layer, empty at first) makes the call incremental.
        `embed_hook(x)` may rewrite the token embeddings [B, T, d] before the first layer
        (Uni-MoE writes its connectors' outputs there); `expert_route` [B, T] forces each
        token's expert (Uni-MoE's stage "experts"). With `targets` [B, T] the head runs fused
        with the loss (trainer/kernels.py: the full logits never exist) and the first result
        is {"loss": cross-entropy + z-loss, "nll", "lse" per token}, which `loss_terms` takes
        in place of logits (the training path)."""
        ctx = self.context(input_ids, positions, doc_ids, routing, cache, expert_route)
        x = self.embed(input_ids)
        if embed_hook is not None:
            x = embed_hook(x)
        for layer in self.layers:
            x = layer(x, ctx)
        stats = collect_stats(self.layers)
        h = self.norm(x)
        if targets is None:
            return self.head(h), stats
        loss, nll, lse = linear_cross_entropy(h.flatten(0, 1), self.head.weight, targets.flatten(), self.cfg.z_loss)
        return {"loss": loss, "nll": nll.view_as(targets), "lse": lse.view_as(targets)}, stats


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, fp32: the NLL of its target (0 where the target is -100) and the log-partition
    of its logits. The one NLL of the logits path: training, eval and Uni-MoE's scores."""
    lse = torch.logsumexp(logits.float(), -1)
    picked = logits.float().gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(targets != -100, lse - picked, 0.0), lse


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
    # fused head: its loss carries the gradient, nll and lse are statistics
    nll, lse = (logits["nll"], logits["lse"]) if isinstance(logits, dict) else token_nll(logits, targets)
    ce = nll.sum() / n
    z = model_cfg.z_loss * torch.where(valid, lse.pow(2), 0.0).sum() / n
    lm = logits["loss"] if isinstance(logits, dict) else ce + z
    image = valid & image_mask(targets, model_cfg.image_range)
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
    d, f = cfg.d_model, cfg.ffn_hidden  # MoT: one tower per token, so the dense count
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
