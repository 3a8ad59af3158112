"""The fused LM head + per-token loss against the checkpointed chunked log-probs: same log-probs, loss and
gradients (hidden states and head weight), with and without PPO clipping, a frozen head, odd block sizes."""

import pytest
import torch

from opdplus.ops.fused_head import fused_head_loss
from opdplus.ops.logprobs import chunked_target_logprobs
from opdplus.ops.loss import policy_loss

B, C, H, V = 3, 7, 16, 50


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden_B_C_H = torch.randn(B, C, H, generator=g, dtype=torch.float64).float()
    weight_V_H = (torch.randn(V, H, generator=g) * 0.5).requires_grad_()
    targets_B_C = torch.randint(0, V, (B, C), generator=g)
    sampler_B_C = torch.randn(B, C, generator=g) * 0.1 - 4.0
    advantages_B_C = torch.randn(B, C, generator=g)
    mask_B_C = torch.rand(B, C, generator=g) > 0.2
    return hidden_B_C_H, weight_V_H, targets_B_C, sampler_B_C, advantages_B_C, mask_B_C


@pytest.mark.parametrize("clip_eps", [None, 0.2])
@pytest.mark.parametrize("chunk_size", [1, 4, 256])
@pytest.mark.parametrize("weight_grad", [True, False], ids=["trained_head", "frozen_head"])
def test_fused_head_loss_equals_the_checkpointed_path(clip_eps, chunk_size, weight_grad):
    hidden, weight, targets, sampler, adv, mask = _inputs()
    weight.requires_grad_(weight_grad)
    normalizer = float(mask.sum())

    def token_loss(lp_B_c, cols):
        return policy_loss(
            lp_B_c, sampler[:, cols], adv[:, cols], mask[:, cols], clip_eps=clip_eps, normalizer=normalizer
        )

    fused_hidden = hidden.clone().requires_grad_()
    loss, lp = fused_head_loss(fused_hidden, weight, targets, token_loss, chunk_size=chunk_size)
    loss.backward()
    fused_grads = (fused_hidden.grad, None if weight.grad is None else weight.grad.clone())
    weight.grad = None

    ref_hidden = hidden.clone().requires_grad_()
    ref_lp = chunked_target_logprobs(
        ref_hidden, lambda h: torch.nn.functional.linear(h, weight), targets, chunk_size=chunk_size
    )
    ref_loss = policy_loss(ref_lp, sampler, adv, mask, clip_eps=clip_eps, normalizer=normalizer)
    ref_loss.backward()

    assert not lp.requires_grad
    torch.testing.assert_close(lp, ref_lp.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    assert fused_grads[0] is not None and ref_hidden.grad is not None
    torch.testing.assert_close(fused_grads[0], ref_hidden.grad, atol=1e-6, rtol=1e-5)
    if weight_grad:
        torch.testing.assert_close(fused_grads[1], weight.grad, atol=1e-6, rtol=1e-5)
    else:
        assert fused_grads[1] is None


def test_fused_head_loss_scales_with_the_incoming_gradient():
    hidden, weight, targets, sampler, adv, mask = _inputs(1)
    hidden.requires_grad_()

    def token_loss(lp_B_c, cols):
        return policy_loss(lp_B_c, sampler[:, cols], adv[:, cols], mask[:, cols], normalizer=10.0)

    loss, _ = fused_head_loss(hidden, weight, targets, token_loss, chunk_size=5)
    (3.0 * loss).backward()
    assert hidden.grad is not None
    grad3, hidden.grad = hidden.grad.clone(), None
    loss, _ = fused_head_loss(hidden, weight, targets, token_loss, chunk_size=5)
    loss.backward()
    assert hidden.grad is not None
    torch.testing.assert_close(grad3, 3.0 * hidden.grad)


def test_fused_head_loss_checks_shapes():
    hidden, weight, targets, *_ = _inputs()
    with pytest.raises(ValueError, match=r"expected hidden_B_C_H \[B, C, H\]"):
        fused_head_loss(hidden[0], weight, targets, lambda lp, cols: lp.sum())
