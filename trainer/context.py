"""What every layer of one forward pass reads, built once by `Decoder.forward`.

Layers take `(x, ctx)` and return a tensor; a layer that routes records its statistics on
itself (`routing_stats`) for `mmtok.trainer.ffn.collect_stats`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROUTINGS = ("batch", "causal")


def image_mask(ids: torch.Tensor, image_range: tuple[int, int]) -> torch.Tensor:
    """Per token: whether its id is an image code (the unified vocabulary's `image_range`)."""
    lo, hi = image_range
    return (ids >= lo) & (ids < hi)


@dataclass
class Context:
    rope: torch.Tensor  # rotary table [max_len, head_dim / 2, 2]
    positions: torch.Tensor  # [B, T] position inside the token's document
    doc_ids: torch.Tensor  # [B, T] document id; 0 = padding
    is_image: torch.Tensor  # [B, T] bool: the token is an image code
    real: torch.Tensor  # [B, T] bool: the token takes part (not padding; in MoD: passed)
    mask: object = None  # the attention mask every layer shares: bool [B, 1, T, T], a BlockMask, or None
    routing: str = "batch"  # "batch": expert choice over the batch, as trained; "causal": auxiliary routers
    cache: list | None = None  # incremental decoding: one dict of keys and values per layer
    expert_route: torch.Tensor | None = None  # [B, T] Uni-MoE's forced expert per token (stage "experts")
    split: tuple | None = None  # MoT's modality sort of the tokens, made by the first layer that needs it

    @property
    def causal(self) -> bool:
        return self.routing == "causal"

    def layer_cache(self, layer: int) -> dict | None:
        return None if self.cache is None else self.cache[layer]
