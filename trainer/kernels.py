"""The output head fused with the loss: cross-entropy + z-loss over a large vocabulary
without the full logits.

The logits of a 4 x 4096 micro-batch over 65,536 ids are 2 GiB in fp32, and autograd would
keep them (and their softmax) for the backward pass. Here the tokens go through the head in
chunks; each chunk's logits give its loss and, right away, its gradients (the loss is a
fixed function of them), and are then dropped. Backward only scales the stored gradients by
the incoming one. The matmuls are the same as an unfused head's (no recomputation).
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 1 << 28  # fp32 logits per chunk: 256 MiB (1,024 tokens at 65,536 ids)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, z_loss: float, chunk: int):
        valid = targets != -100
        n = valid.sum().clamp(min=1)
        want_grad = any(ctx.needs_input_grad[:2])
        grad_h = torch.empty_like(h) if want_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grad else None
        nll = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        lse = torch.empty_like(nll)
        for lo in range(0, h.shape[0], chunk):
            hc, tc, vc = h[lo:lo + chunk], targets[lo:lo + chunk].clamp(min=0).unsqueeze(1), valid[lo:lo + chunk]
            logits = (hc @ weight.T).float()  # as an unfused head: its dtype's matmul, then fp32
            lse_c = torch.logsumexp(logits, -1)
            nll[lo:lo + chunk] = torch.where(vc, lse_c - logits.gather(1, tc).squeeze(1), 0.0)
            lse[lo:lo + chunk] = lse_c
            if want_grad:
                # d/dlogits of (nll + z * lse^2) * valid / n = coef * ((1 + 2 z lse) * softmax - onehot)
                coef = vc.float() / n
                g = logits.sub_(lse_c.unsqueeze(1)).exp_().mul_((coef * (1 + 2 * z_loss * lse_c)).unsqueeze(1))
                g = g.scatter_add_(1, tc, -coef.unsqueeze(1)).to(h.dtype)
                grad_h[lo:lo + chunk] = g @ weight
                grad_w.add_(g.T @ hc)
        ctx.mark_non_differentiable(nll, lse)
        if want_grad:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        loss = (nll.sum() + z_loss * torch.where(valid, lse.pow(2), 0.0).sum()) / n
        return loss, nll, lse

    @staticmethod
    def backward(ctx, grad_loss, _nll, _lse):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype), None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, z_loss: float,
                         chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, nll, lse) of the head `weight` [V, d] over hidden states h [N, d]: loss = mean over
    targets != -100 of nll + z_loss * lse^2 (differentiable); nll (0 where ignored) and the
    log-partition lse per token [N] (fp32, not differentiable: statistics). `chunk` tokens at
    a time (default: 256 MiB of fp32 logits)."""
    chunk = chunk or max(1, CHUNK_BYTES // (4 * weight.shape[0]))
    return _LinearCrossEntropy.apply(h, weight, targets, float(z_loss), chunk)
