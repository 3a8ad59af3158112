"""The LM head and a per-token loss, forward and backward in one pass over each block of logits.

For a loss that is a sum over positions of a function of each position's target log-prob,

    L = sum_t l_t(lp_t),   lp_t = z_t[y_t] - logsumexp(z_t),   z_t = W h_t,

the gradients are

    dL/dz_t = l_t'(lp_t) (e_{y_t} - softmax(z_t)),   dL/dh_t = W^T dL/dz_t,   dL/dW = sum_t dL/dz_t h_t^T,

and ``l_t'`` is known as soon as ``lp_t`` is (the policy-gradient loss of docs/derivations.md is such a
sum). So the forward forms each block of logits once, takes its log-probs, the loss and both gradients, and
keeps only the gradients (``dL/dh``: the hidden states' shape; ``dL/dW``: the head's); the backward scales
them by the incoming gradient. Checkpointed chunked log-probs (``opdplus.ops.logprobs``) form every block
of logits twice (forward, then the recompute in the backward) and run the softmax three times; here it is
one LM-head product and one log-softmax per block, plus the two gradient products. Same values and
gradients up to float rounding (``tests/unit/test_fused_head.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from opdplus.ops.logprobs import positions_per_chunk

Tensor = torch.Tensor
# (lp_B_c, cols) -> the loss of the positions ``cols`` (a scalar), given their target log-probs ``lp_B_c``
TokenLoss = Callable[[Tensor, slice], Tensor]


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden_B_C_H: Tensor,
        weight_V_H: Tensor,
        targets_B_C: Tensor,
        token_loss: TokenLoss,
        chunk_size: int,
    ) -> tuple[Tensor, Tensor]:
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden_B_C_H) if need_hidden else None
        grad_weight = torch.zeros_like(weight_V_H) if need_weight else None
        logprobs, losses = [], []
        positions = positions_per_chunk(chunk_size, hidden_B_C_H.shape[0])
        for start in range(0, hidden_B_C_H.shape[1], positions):
            cols = slice(start, start + positions)
            hidden_B_c_H, targets_B_c = hidden_B_C_H[:, cols], targets_B_C[:, cols]
            logp_B_c_V = torch.log_softmax(F.linear(hidden_B_c_H, weight_V_H).float(), dim=-1)
            lp_B_c = logp_B_c_V.gather(-1, targets_B_c[..., None]).squeeze(-1)
            with torch.enable_grad():
                leaf_B_c = lp_B_c.detach().requires_grad_()
                loss = token_loss(leaf_B_c, cols)
                (grad_lp_B_c,) = torch.autograd.grad(loss, leaf_B_c, allow_unused=True)
            logprobs.append(lp_B_c)
            losses.append(loss.detach())
            if grad_lp_B_c is None or not (need_hidden or need_weight):
                continue
            # dL/dz = g (e_y - p), built in place over the block's log-softmax
            grad_lp_B_c = grad_lp_B_c.to(logp_B_c_V.dtype)
            grad_z_B_c_V = logp_B_c_V.exp_().mul_(-grad_lp_B_c[..., None])
            grad_z_B_c_V.scatter_add_(-1, targets_B_c[..., None], grad_lp_B_c[..., None])
            if grad_hidden is not None:
                grad_hidden[:, cols] = torch.matmul(grad_z_B_c_V.to(weight_V_H.dtype), weight_V_H).to(grad_hidden.dtype)
            if grad_weight is not None:
                flat_z, flat_h = grad_z_B_c_V.flatten(0, 1), hidden_B_c_H.flatten(0, 1)
                grad_weight.add_(torch.mm(flat_z.T.to(weight_V_H.dtype), flat_h.to(weight_V_H.dtype)))
        ctx.grad_hidden, ctx.grad_weight = grad_hidden, grad_weight
        logprobs_B_C = (
            torch.cat(logprobs, dim=1) if logprobs else hidden_B_C_H.new_zeros(targets_B_C.shape, dtype=torch.float32)
        )
        total = torch.stack(losses).sum() if losses else hidden_B_C_H.new_zeros((), dtype=torch.float32)
        ctx.mark_non_differentiable(logprobs_B_C)
        return total, logprobs_B_C

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, grad_logprobs: Tensor | None) -> tuple[Tensor | None, ...]:
        grad_hidden = None if ctx.grad_hidden is None else ctx.grad_hidden * grad_loss.to(ctx.grad_hidden.dtype)
        grad_weight = None if ctx.grad_weight is None else ctx.grad_weight * grad_loss.to(ctx.grad_weight.dtype)
        ctx.grad_hidden = ctx.grad_weight = None
        return grad_hidden, grad_weight, None, None, None


def fused_head_loss(
    hidden_B_C_H: Tensor, weight_V_H: Tensor, targets_B_C: Tensor, token_loss: TokenLoss, *, chunk_size: int = 256
) -> tuple[Tensor, Tensor]:
    """``(loss, logprobs_B_C)``: ``logprobs_B_C[b, c] = log softmax(hidden[b, c] @ W^T)[targets[b, c]]`` (float32,
    no gradient) and ``loss = sum over blocks of token_loss(logprobs of the block, its columns)``, whose
    gradient reaches ``hidden_B_C_H`` and ``weight_V_H`` (the LM head's ``[V, H]`` weight, no bias). ``token_loss``
    must be a sum over positions of a function of each position's log-prob (its gradient is taken per block);
    blocks hold about ``chunk_size`` tokens."""
    if hidden_B_C_H.dim() != 3 or targets_B_C.shape != hidden_B_C_H.shape[:2]:
        raise ValueError(
            f"expected hidden_B_C_H [B, C, H] and targets_B_C [B, C], got {tuple(hidden_B_C_H.shape)} and "
            f"{tuple(targets_B_C.shape)}"
        )
    loss, logprobs_B_C = _FusedHeadLoss.apply(hidden_B_C_H, weight_V_H, targets_B_C, token_loss, chunk_size)
    return loss, logprobs_B_C
