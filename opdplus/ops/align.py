"""Cross-tokenizer alignment and the span advantage of OPD+ with a teacher of another vocabulary.

Derivation: docs/derivations.md ("A teacher with another tokenizer"). The student's completion and the
teacher's tokenization of the same text are cut into spans at the byte positions where both have a token
boundary (and a UTF-8 character starts). For span k with student tokens S_k and teacher tokens Z_k,
l_k = sum_{Z_k} log q - sum_{S_k} log pi, u_k = exp(l_k), and J = E_pi[sum_k f(u_k)]. With gamma = 1 the
exact per-token advantage is

    A_t = -sum of f(u_k) over the spans k not final given the tokens before t  +  u_k(t) f'(u_k(t))

where k(t) is t's own span. Span ends are not stopping times (the teacher's tokenizer looks ahead), so the
return of token t starts at the first span that is not yet final, which may lie before t's own span.

Layout on [B, T] tensors (columns as in ``RolloutBatch``):

* ``span_end_B_T``: the column of the last student token of t's span; -1 outside the completion.
* ``return_from_B_T``: the column of the first student token of the earliest span that is not final given
  the tokens before t; -1 outside the completion.

Per-token teacher log-probs are carried so that their sum over a span is log q(span); the segment sums
here recover l_k from any student log-probs. Pure functions: offsets and tensors in, spans and tensors out.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from opdplus.ops.advantages import (
    ESTIMATORS,
    check_logprobs_at_loss_tokens,
    check_token_tensors,
    discounted_returns,
    masked_log_ratio,
)
from opdplus.ops.divergences import Divergence, get_divergence

Tensor = torch.Tensor


@dataclass(frozen=True)
class Span:
    """Student tokens [student_start, student_stop), teacher tokens [teacher_start, teacher_stop) and the
    bytes [byte_start, byte_stop) they both cover."""

    student_start: int
    student_stop: int
    teacher_start: int
    teacher_stop: int
    byte_start: int
    byte_stop: int


def token_ends(byte_lengths: Sequence[int]) -> list[int]:
    """Cumulative byte end offset of every token, from each token's length in bytes."""
    ends, total = [], 0
    for length in byte_lengths:
        if length < 0:
            raise ValueError(f"a token cannot have a negative byte length, got {length}")
        total += length
        ends.append(total)
    return ends


def char_starts(data: bytes) -> list[bool]:
    """For every byte offset 0..len(data): True where a UTF-8 character may start (not a continuation byte);
    the end offset is True."""
    return [(byte & 0xC0) != 0x80 for byte in data] + [True]


def align_spans(student_ends: Sequence[int], teacher_ends: Sequence[int], boundary_ok: Sequence[bool]) -> list[Span]:
    """Spans cut at the byte offsets where both token lists end a token and ``boundary_ok`` holds (a span
    that would end inside a multi-byte character is merged with the next). Both lists must cover the same
    number of bytes; zero-length tokens join the span they end in. Every span has at least one student
    token; a trailing run of zero-length student tokens joins the last span."""
    total = student_ends[-1] if student_ends else 0
    if (teacher_ends[-1] if teacher_ends else 0) != total:
        raise ValueError(
            f"student tokens cover {total} bytes but teacher tokens cover {teacher_ends[-1] if teacher_ends else 0}; "
            "both must tokenize the same text"
        )
    if len(boundary_ok) != total + 1:
        raise ValueError(f"boundary_ok must have one entry per byte offset 0..{total}, got {len(boundary_ok)}")
    if not student_ends:
        return []
    cuts = sorted((set(student_ends) & set(teacher_ends)) - {0})
    cuts = [b for b in cuts if boundary_ok[b] and b < total] + [total]
    spans: list[Span] = []
    s0 = t0 = b0 = 0
    for b in cuts:
        s1 = bisect.bisect_right(student_ends, b)
        t1 = bisect.bisect_right(teacher_ends, b)
        if b == total:
            s1, t1 = len(student_ends), len(teacher_ends)
        if s1 == s0:
            continue
        spans.append(Span(s0, s1, t0, t1, b0, b))
        s0, t0, b0 = s1, t1, b
    return spans


def return_from_tokens(spans: Sequence[Span], final_bytes: Sequence[int]) -> list[int]:
    """For every student token t (``final_bytes[t]``: how many leading bytes of the completion have a final
    teacher tokenization given the tokens before t), the index of the first student token of the earliest
    span that is not final given those tokens. A span is final when its bytes end within the final bytes;
    t's own span is never final before t."""
    starts = [span.student_start for span in spans]
    stops = [span.byte_stop for span in spans]
    out = []
    for t, final in enumerate(final_bytes):
        own = bisect.bisect_right(starts, t) - 1
        first_open = bisect.bisect_right(stops, final)  # spans [0, first_open) end within the final bytes
        out.append(starts[min(first_open, own)])
    return out


# ---------------------------------------------------------------- [B, T] tensors


def span_layout(
    rows: Sequence[tuple[int, Sequence[Span], Sequence[int]]], shape: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """``(span_end_B_T, return_from_B_T)`` from, per row, ``(first completion column, spans, return_from
    token indices)`` (token indices count from the first completion column); -1 elsewhere."""
    span_end_B_T = torch.full(shape, -1, dtype=torch.long)
    return_from_B_T = torch.full(shape, -1, dtype=torch.long)
    for b, (first_col, spans, return_from) in enumerate(rows):
        for span in spans:
            span_end_B_T[b, first_col + span.student_start : first_col + span.student_stop] = (
                first_col + span.student_stop - 1
            )
        for t, start in enumerate(return_from):
            return_from_B_T[b, first_col + t] = first_col + start
    return span_end_B_T, return_from_B_T


def token_span_layout(loss_mask_B_T: Tensor) -> tuple[Tensor, Tensor]:
    """The layout of one tokenizer: every loss token is its own span, final at once."""
    cols_B_T = torch.arange(loss_mask_B_T.shape[1], device=loss_mask_B_T.device).expand(loss_mask_B_T.shape)
    layout_B_T = torch.where(loss_mask_B_T, cols_B_T, torch.full_like(cols_B_T, -1))
    return layout_B_T, layout_B_T.clone()


def span_ends_mask(span_end_B_T: Tensor) -> Tensor:
    """True at the column of each span's last student token."""
    cols_B_T = torch.arange(span_end_B_T.shape[1], device=span_end_B_T.device).expand(span_end_B_T.shape)
    return span_end_B_T == cols_B_T


def span_sums(values_B_T: Tensor, span_end_B_T: Tensor) -> Tensor:
    """Segment sums: at every completion token the sum of ``values`` over its span (0 outside spans)."""
    inside_B_T = span_end_B_T >= 0
    index_B_T = span_end_B_T.clamp(min=0)
    kept_B_T = torch.where(inside_B_T, values_B_T, torch.zeros_like(values_B_T))
    at_end_B_T = torch.zeros_like(values_B_T).scatter_add(1, index_B_T, kept_B_T)
    return torch.where(inside_B_T, at_end_B_T.gather(1, index_B_T), torch.zeros_like(values_B_T))


def spread_span_logprobs(span_logprob_B_T: Tensor, sampler_logprobs_B_T: Tensor, span_end_B_T: Tensor) -> Tensor:
    """Per-token teacher log-probs whose sum over each span is its ``span_logprob`` (read at the span's last
    column): the sampler's log-prob at the other tokens of the span (log-ratio 0 there), the rest at the end.
    With one-token spans this is ``span_logprob`` itself. 0 outside the completion."""
    is_end_B_T = span_ends_mask(span_end_B_T)
    others_B_T = span_sums(sampler_logprobs_B_T, span_end_B_T) - sampler_logprobs_B_T
    spread_B_T = torch.where(is_end_B_T, span_logprob_B_T - others_B_T, sampler_logprobs_B_T)
    return torch.where(span_end_B_T >= 0, spread_B_T, torch.zeros_like(spread_B_T))


def span_log_ratios(
    student_logprobs: Tensor, teacher_logprobs: Tensor, loss_mask: Tensor, span_end_B_T: Tensor
) -> Tensor:
    """l_k = sum over span k of (log q - log pi), float64, at every loss token of the span; 0 elsewhere."""
    log_ratio_B_T = masked_log_ratio(student_logprobs, teacher_logprobs, loss_mask).double()
    inside_B_T = loss_mask & (span_end_B_T >= 0)
    return torch.where(inside_B_T, span_sums(log_ratio_B_T, span_end_B_T), torch.zeros_like(log_ratio_B_T))


def span_advantages(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    loss_mask: Tensor,
    span_end_B_T: Tensor,
    return_from_B_T: Tensor,
    *,
    divergence: str | Divergence,
    estimator: str,
    gamma: float = 1.0,
    log_ratio_clip: float | None = None,
) -> Tensor:
    """Detached per-token advantages [B, T] of J = E_pi[sum_k f(u_k)] over spans (module docstring).

    ``estimator="opd_plus"``: A_t = -R_t + u_k(t) f'(u_k(t)); ``"opd"`` drops the local term. R_t sums, without
    discount, f(u_k) over the spans from the first one not final given the tokens before t up to t's own span
    (exclusive), plus the discounted return from t's own span on, time counted in spans. gamma = 1 is exact;
    gamma < 1 is an approximation (there is no exact per-position target across tokenizers). With one-token
    spans final at once (``token_span_layout``) this equals ``opdplus.ops.advantages``. Every token of a span
    must be a loss token or none (mask whole spans). Zero where ``loss_mask`` is False.
    """
    check_token_tensors(loss_mask, student_logprobs=student_logprobs, teacher_logprobs=teacher_logprobs)
    for name, layout in (("span_end_B_T", span_end_B_T), ("return_from_B_T", return_from_B_T)):
        if layout.shape != loss_mask.shape or layout.dtype != torch.long:
            raise ValueError(f"{name} must be a long tensor shaped like loss_mask, got {layout.dtype} {layout.shape}")
    if bool((loss_mask & ((span_end_B_T < 0) | (return_from_B_T < 0))).any()):
        raise ValueError("every loss token needs a span (span_end_B_T and return_from_B_T >= 0 where loss_mask)")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; valid estimators: {', '.join(ESTIMATORS)}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if log_ratio_clip is not None and not log_ratio_clip > 0:
        raise ValueError(f"log_ratio_clip must be > 0, got {log_ratio_clip}")
    div = get_divergence(divergence)
    check_logprobs_at_loss_tokens(student_logprobs, teacher_logprobs, loss_mask)
    out_dtype = torch.promote_types(student_logprobs.dtype, teacher_logprobs.dtype)
    with torch.no_grad():
        log_ratio_B_T = span_log_ratios(student_logprobs, teacher_logprobs, loss_mask, span_end_B_T)
        if log_ratio_clip is not None:
            log_ratio_B_T = log_ratio_B_T.clamp(-log_ratio_clip, log_ratio_clip)
        log_ratio_B_T = div.safe_log_ratio(log_ratio_B_T)
        is_end_B_T = span_ends_mask(span_end_B_T) & loss_mask
        f_end_B_T = torch.where(is_end_B_T, div.f(log_ratio_B_T), torch.zeros_like(log_ratio_B_T))
        own_index_B_T = span_end_B_T.clamp(min=0)
        own_return_B_T = discounted_returns(f_end_B_T, is_end_B_T, gamma).gather(1, own_index_B_T)
        before_B_T = f_end_B_T.cumsum(-1) - f_end_B_T  # sum of f over span ends in columns < t
        open_before_B_T = before_B_T - before_B_T.gather(1, return_from_B_T.clamp(min=0))
        advantages_B_T = -(open_before_B_T + own_return_B_T)
        if estimator == "opd_plus":
            advantages_B_T = advantages_B_T + div.u_fprime(log_ratio_B_T)
        advantages_B_T = torch.where(loss_mask, advantages_B_T, torch.zeros_like(advantages_B_T))
        finite_max = torch.finfo(out_dtype).max
        return advantages_B_T.clamp(-finite_max, finite_max).to(out_dtype)


def alignment_metrics(span_end_B_T: Tensor, loss_mask_B_T: Tensor) -> dict[str, float]:
    """``align/spans_per_token`` (spans over student completion tokens), ``align/max_span_tokens`` and
    ``align/masked_fraction`` (completion tokens taken out of the loss: non-canonical or unmapped spans)."""
    inside_B_T = span_end_B_T >= 0
    tokens = int(inside_B_T.sum())
    ends = int((span_ends_mask(span_end_B_T) & inside_B_T).sum())
    ones_B_T = inside_B_T.long()
    lengths_B_T = torch.zeros_like(ones_B_T).scatter_add(1, span_end_B_T.clamp(min=0), ones_B_T)
    return {
        "align/spans_per_token": ends / max(tokens, 1),
        "align/max_span_tokens": float(lengths_B_T.max()) if tokens else 0.0,
        "align/masked_fraction": int((inside_B_T & ~loss_mask_B_T).sum()) / max(tokens, 1),
    }
