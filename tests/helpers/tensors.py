"""Weights before and after a training stage. A frozen weight is a copy, so `torch.equal` is
the property there; a trained one must have moved by more than kernels' rounding, which
differs between CPUs, so it is compared with a tolerance (`moved`), never by inequality."""

from __future__ import annotations

import torch

# Adam at lr 1e-2 moves a weight by about 1e-2 a step; rounding differences between kernels
# are about 1e-7 of a weight: 1e-4 lies between them.
MOVED = 1e-4


def moved(before: torch.Tensor, after: torch.Tensor, tol: float = MOVED) -> bool:
    """Whether any element moved by more than `tol`."""
    return before.numel() > 0 and bool((after.double() - before.double()).abs().max() > tol)
