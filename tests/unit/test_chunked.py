"""Chunked per-position divergences agree with their naive full-logit twins (values and gradients)."""

import pytest
import torch

from opdplus.ops.chunked import chunked_exact_divergence, chunked_topk_divergence
from opdplus.ops.exact import exact_divergence
from opdplus.ops.signals import topk_divergence

DIVS = ["reverse_kl", "forward_kl", "jsd", "total_variation", "pearson_chi2"]


def setup(seed=0, B=2, T=7, H=8, V=50):
    gen = torch.Generator().manual_seed(seed)
    student_head = torch.nn.Linear(H, V, bias=False, dtype=torch.float64)
    teacher_head = torch.nn.Linear(H, V, bias=False, dtype=torch.float64)
    with torch.no_grad():
        student_head.weight.copy_(0.5 * torch.randn(V, H, generator=gen, dtype=torch.float64))
        teacher_head.weight.copy_(0.5 * torch.randn(V, H, generator=gen, dtype=torch.float64))
    student_hidden = torch.randn(B, T, H, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(B, T, H, generator=gen, dtype=torch.float64)
    return student_head, teacher_head, student_hidden, teacher_hidden


def grads(value, student_head, student_hidden):
    return torch.autograd.grad(value.sum(), (student_hidden, student_head.weight))


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_chunked_exact_matches_naive(divergence, chunk_size):
    student_head, teacher_head, student_hidden, teacher_hidden = setup()
    naive = exact_divergence(student_head(student_hidden), teacher_head(teacher_hidden), divergence)
    chunked = chunked_exact_divergence(
        student_hidden, student_head, teacher_hidden, teacher_head, divergence, chunk_size=chunk_size
    )
    torch.testing.assert_close(chunked, naive, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads(chunked, student_head, student_hidden), grads(naive, student_head, student_hidden)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert teacher_head.weight.grad is None


@pytest.mark.parametrize("divergence", DIVS)
def test_chunked_topk_matches_naive(divergence):
    student_head, teacher_head, student_hidden, teacher_hidden = setup(1)
    with torch.no_grad():
        values, ids = torch.log_softmax(teacher_head(teacher_hidden), -1).topk(5, dim=-1)
    naive = topk_divergence(student_head(student_hidden), ids, values, divergence)
    chunked = chunked_topk_divergence(student_hidden, student_head, ids, values, divergence, chunk_size=2)
    torch.testing.assert_close(chunked, naive, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads(chunked, student_head, student_hidden), grads(naive, student_head, student_hidden)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_chunked_errors():
    student_head, teacher_head, student_hidden, teacher_hidden = setup()
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_exact_divergence(student_hidden, student_head, teacher_hidden, teacher_head, "jsd", chunk_size=0)
    with pytest.raises(ValueError, match="must share"):
        chunked_exact_divergence(student_hidden, student_head, teacher_hidden[:, :3], teacher_head, "jsd")
