"""Chunked target-token log-probs against the naive full-vocabulary twin; sampler distributions."""

import pytest
import torch

from opdplus.ops.logprobs import (
    chunked_target_logprobs,
    naive_target_logprobs,
    sampling_logprobs,
    shifted_completion_logprobs,
)


def _setup(B=2, T=7, H=5, V=11, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=g)
    return hidden, weight, targets


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 100])
@pytest.mark.parametrize("temperature,softcap", [(1.0, None), (0.7, None), (1.0, 2.0)])
def test_chunked_matches_naive_values_and_gradients(chunk_size, temperature, softcap):
    hidden, weight, targets = _setup()
    chunked = chunked_target_logprobs(
        hidden, lambda h: h @ weight.T, targets, chunk_size=chunk_size, temperature=temperature, logit_softcap=softcap
    )
    logits = hidden @ weight.T
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    naive = naive_target_logprobs(logits, targets, temperature=temperature)
    torch.testing.assert_close(chunked.double(), naive.double(), atol=1e-6, rtol=0)
    grads_chunked = torch.autograd.grad(chunked.sum(), (hidden, weight))
    grads_naive = torch.autograd.grad(naive.sum(), (hidden, weight))
    for a, b in zip(grads_chunked, grads_naive):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_logits_are_only_ever_formed_one_chunk_at_a_time():
    """Forward and backward call the head on at most ``chunk_size`` tokens: never a [B, T, V] block."""
    hidden, weight, targets = _setup(T=10, dtype=torch.float32)
    seen = []

    def head(h):
        seen.append(h.shape[0] * h.shape[1])
        return h @ weight.T

    out = chunked_target_logprobs(hidden, head, targets, chunk_size=4 * hidden.shape[0])
    out.sum().backward()
    assert max(seen) <= 4 * hidden.shape[0]
    assert len(seen) == 2 * 3  # 3 chunks forward, recomputed once each in backward
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()


def test_shifted_completion_logprobs_alignment():
    hidden, weight, _ = _setup(T=6)
    ids = torch.randint(0, 11, (2, 6))
    out = shifted_completion_logprobs(hidden, lambda h: h @ weight.T, ids, 3, chunk_size=2)
    assert out.shape == (2, 6)
    assert (out[:, :3] == 0).all()
    full = naive_target_logprobs(hidden[:, :-1] @ weight.T, ids[:, 1:])  # position t predicts token t+1
    torch.testing.assert_close(out[:, 3:].double(), full[:, 2:].double(), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="start"):
        shifted_completion_logprobs(hidden, lambda h: h @ weight.T, ids, 0)


def test_shape_errors_name_the_shapes():
    hidden, weight, targets = _setup()
    with pytest.raises(ValueError, match=r"\(2, 7, 5\)"):
        chunked_target_logprobs(hidden, lambda h: h @ weight.T, targets[:, :3])


def test_sampling_logprobs_untempered_is_log_softmax():
    logits = torch.randn(3, 9)
    torch.testing.assert_close(sampling_logprobs(logits), torch.log_softmax(logits, -1))
    torch.testing.assert_close(sampling_logprobs(logits, temperature=0.5), torch.log_softmax(logits / 0.5, -1))


def test_sampling_logprobs_top_k_and_top_p():
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.1]])
    logits = probs.log()
    top2 = sampling_logprobs(logits, top_k=2).exp()
    torch.testing.assert_close(top2, torch.tensor([[2 / 3, 1 / 3, 0.0, 0.0]]))
    # top_p=0.7: 0.5 alone is below 0.7, 0.5 + 0.25 reaches it -> the two most likely tokens remain
    torch.testing.assert_close(sampling_logprobs(logits, top_p=0.7).exp(), top2)
    torch.testing.assert_close(sampling_logprobs(logits, top_p=0.5).exp(), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    # both: top_k first, then the nucleus of the renormalised rest
    torch.testing.assert_close(sampling_logprobs(logits, top_k=3, top_p=0.99).exp().sum(-1), torch.tensor([1.0]))
    assert sampling_logprobs(logits, top_k=3)[0, 3] == float("-inf")
