"""A teacher with another tokenizer: ``CrossTokenizerTeacher`` scores the student's completions span by span.

The derivation is docs/derivations.md ("A teacher with another tokenizer"); the span math is
``opdplus.ops.align``. For every row the completion's student tokens are turned into bytes (the tokenizer's
own byte table, never a decoded string's character offsets), the text is tokenized with the teacher's
tokenizer (the prompt rendered with the teacher's own chat template), and both are cut into spans at their
common byte boundaries. The inner teacher (local, served or any ``Teacher``) scores the teacher's token ids,
so a served teacher of another family needs no change on the server. Special tokens are atoms of their own:
the student's end-of-turn token maps to the teacher's, another special token to the teacher's token of the
same text, and one the teacher lacks is a masked span.

``score_spans`` returns per-token teacher log-probs whose sum over each span is log q(span), the span layout,
and the loss mask with non-canonical spans taken out: a span whose student tokens are not the student
tokenizer's own encoding of its text (the teacher scores text, so a rare tokenization would otherwise earn
a large advantage), a span the teacher cannot score, and bytes that are not valid UTF-8 (a completion cut
inside a character).
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from opdplus.ops.align import (
    Span,
    align_spans,
    char_starts,
    span_layout,
    spread_span_logprobs,
    token_ends,
    token_span_layout,
)
from opdplus.rollout.types import RolloutBatch, Teacher


@lru_cache(maxsize=1)
def byte_level_decoding() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's printable stand-ins for the 256 bytes) -> byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[chr(byte)] = byte
        else:
            mapping[chr(256 + extra)] = byte
            extra += 1
    return mapping


class TokenizerBytes:
    """What the alignment needs from one Hugging Face fast tokenizer: every id's bytes, its special ids, an
    encoder that never adds or matches special tokens, and how many leading bytes of a text prefix have a
    final tokenization (``final_bytes``)."""

    def __init__(self, tokenizer: Any) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = tokenizer
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        self.backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self.backend.encode_special_tokens = True  # text that spells a special token is text
        added = getattr(tokenizer, "added_tokens_decoder", {})
        self.special_ids = set(tokenizer.all_special_ids) | {i for i, tok in added.items() if tok.special}
        decoders = _component_types(spec.get("decoder"))
        vocab = {index: token for token, index in tokenizer.get_vocab().items()}
        self.byte_table = [_token_bytes(vocab.get(i, ""), decoders) for i in range(max(vocab) + 1)]
        self.pre_tokenizer = self.backend.pre_tokenizer
        self.normalizer = self.backend.normalizer
        model = spec.get("model") or {}
        self.merges_nothing = model.get("type") in ("BPE", "WordLevel") and not model.get("merges")

    def special_text(self, token_id: int) -> str:
        return str(self.tokenizer.convert_ids_to_tokens(token_id))

    def encode(self, texts: list[str]) -> list[tuple[list[int], list[int]] | None]:
        """For each text: (ids, byte length of each id) covering exactly the text's bytes (a SentencePiece
        leading "▁" added to the text is taken off the first token), or None when the tokens do not spell it."""
        out: list[tuple[list[int], list[int]] | None] = []
        for text, encoding in zip(texts, self.backend.encode_batch(texts, add_special_tokens=False)):
            ids = list(encoding.ids)
            lengths = [len(self.byte_table[i]) for i in ids]
            spelled = b"".join(self.byte_table[i] for i in ids)
            data = text.encode()
            if spelled != data and spelled == b" " + data and ids:
                lengths[0] -= 1
            elif spelled != data:
                out.append(None)
                continue
            out.append((ids, lengths))
        return out

    def final_bytes(self, data: bytes) -> int:
        """Leading bytes of ``data`` (a prefix of a longer text) whose tokenization no continuation can change:
        everything before the last pre-token of the normalized text (Gemma's pre-tokenizer splits on " ", which
        its normalizer has already replaced by "▁", so nothing); everything for a tokenizer without merges;
        nothing when there is no pre-tokenizer to bound the merges or the normalizer changes the length. Only
        the valid UTF-8 part of ``data`` counts."""
        text = _valid_prefix(data).decode()
        if self.merges_nothing:
            return len(text.encode())
        if self.pre_tokenizer is None or not text:
            return 0
        normalized = text if self.normalizer is None else self.normalizer.normalize_str(text)
        if len(normalized) != len(text):  # offsets would not map back to the text: nothing is known final
            return 0
        pieces = self.pre_tokenizer.pre_tokenize_str(normalized)  # the pre-tokenizer sees normalized text
        if not pieces:
            return 0
        return len(text[: pieces[-1][1][0]].encode())


def _component_types(node: Any) -> set[str]:
    if not isinstance(node, dict):
        return set()
    types = {str(node.get("type"))}
    for child in node.get("decoders") or []:
        types |= _component_types(child)
    return types


def _token_bytes(token: str, decoders: set[str]) -> bytes:
    if "ByteLevel" in decoders:
        table = byte_level_decoding()
        if all(ch in table for ch in token):
            return bytes(table[ch] for ch in token)
        return token.encode()
    if "ByteFallback" in decoders and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return bytes([int(token[3:5], 16)])
    if "Replace" in decoders or "Metaspace" in decoders:
        return token.replace("▁", " ").encode()
    return token.encode()


def _valid_prefix(data: bytes) -> bytes:
    try:
        data.decode()
        return data
    except UnicodeDecodeError as err:
        return data[: err.start]


@dataclass
class RowAlignment:
    """One row: spans over its completion tokens (indices from the first completion column), the teacher's
    completion ids, which spans count, and each token's return start (``opdplus.ops.align``)."""

    spans: list[Span]
    teacher_ids: list[int]
    canonical: list[bool]
    return_from: list[int]


@dataclass
class SpanScores:
    """What ``CrossTokenizerTeacher.score_spans`` gives a batch (see ``opdplus.ops.align`` for the layout)."""

    teacher_logprobs_B_T: torch.Tensor
    span_end_B_T: torch.Tensor
    return_from_B_T: torch.Tensor
    loss_mask_B_T: torch.Tensor


class CrossTokenizerTeacher:
    """A ``Teacher`` whose tokenizer differs from the student's (module docstring). ``inner`` scores teacher
    token ids: a ``LocalTeacher`` or an ``HTTPTeacher`` (its tokenizer known locally, ``teacher.tokenizer``)."""

    cross_tokenizer = True

    def __init__(self, inner: Teacher, student_tokenizer: Any, teacher_tokenizer: Any) -> None:
        from opdplus.rollout.sampler import end_of_turn_id

        self.inner = inner
        self.student = TokenizerBytes(student_tokenizer)
        self.teacher = TokenizerBytes(teacher_tokenizer)
        self.teacher_tokenizer = teacher_tokenizer
        self.student_tokenizer = student_tokenizer
        ends = {student_tokenizer.eos_token_id, end_of_turn_id(student_tokenizer)} - {None}
        teacher_end = end_of_turn_id(teacher_tokenizer)
        self.teacher_end = teacher_end if teacher_end is not None else teacher_tokenizer.eos_token_id
        teacher_vocab = teacher_tokenizer.get_vocab()
        self.special_map: dict[int, int | None] = {}
        for token_id in self.student.special_ids:
            if token_id in ends:
                self.special_map[token_id] = self.teacher_end
            else:
                mapped = teacher_vocab.get(self.student.special_text(token_id))
                self.special_map[token_id] = mapped if mapped in self.teacher.special_ids else None

    def __repr__(self) -> str:
        return f"CrossTokenizerTeacher({self.inner!r})"

    def score(self, batch: RolloutBatch) -> torch.Tensor:
        """Per-token teacher log-probs summing to log q(span) over each span (0 off the loss mask; a masked
        span's tokens hold the sampler's log-probs, log-ratio 0)."""
        return self.score_spans(batch).teacher_logprobs_B_T

    def metrics(self, reset: bool = False) -> dict[str, float]:
        usage = getattr(self.inner, "metrics", None)
        return {} if usage is None else usage(reset=reset)

    # ------------------------------------------------------------------ alignment

    def align_row(self, ids: list[int]) -> RowAlignment:
        """Spans of one completion (its student token ids, in order)."""
        spans: list[Span] = []
        teacher_ids: list[int] = []
        canonical: list[bool] = []
        final_counts: list[int] = []
        closed = 0  # spans of atoms that no later token can change
        pending: tuple[list[Span], bytes] | None = None  # the text run the next token may still extend
        start = 0
        while start < len(ids):
            if self._is_atom(ids[start]):
                if pending is not None:
                    closed_run = _count_final(pending[0], self.teacher.final_bytes(pending[1]))
                    final_counts.append(closed + closed_run)
                    closed += len(pending[0])
                    pending = None
                else:
                    final_counts.append(closed)
                mapped = self.special_map.get(ids[start])
                spans.append(Span(start, start + 1, len(teacher_ids), len(teacher_ids) + (mapped is not None), 0, 0))
                canonical.append(mapped is not None)
                teacher_ids += [] if mapped is None else [mapped]
                closed += 1
                start += 1
                continue
            stop = start
            while stop < len(ids) and not self._is_atom(ids[stop]):
                stop += 1
            run_spans, run_teacher, run_canonical, run_counts, data = self._align_text(ids[start:stop])
            offset_spans = [_shift(span, start, len(teacher_ids)) for span in run_spans]
            final_counts += [closed + c for c in run_counts]
            spans += offset_spans
            teacher_ids += run_teacher
            canonical += run_canonical
            pending = (run_spans, data)
            start = stop
        starts = [span.student_start for span in spans]
        return_from = []
        for t, count in enumerate(final_counts):
            own = bisect.bisect_right(starts, t) - 1
            return_from.append(starts[min(count, own)])
        return RowAlignment(spans, teacher_ids, canonical, return_from)

    def _is_atom(self, token_id: int) -> bool:
        """A special token, or an id the tokenizer does not know (a model head larger than the vocabulary):
        a span of its own (masked when the teacher has no counterpart)."""
        return token_id in self.student.special_ids or token_id >= len(self.student.byte_table)

    def _align_text(self, ids: list[int]) -> tuple[list[Span], list[int], list[bool], list[int], bytes]:
        """Spans of one run of text tokens, the teacher's ids, canonical flags, per token the number of this
        run's spans final given the tokens before it, and the run's bytes."""
        pieces = [self.student.byte_table[i] for i in ids]
        data = b"".join(pieces)
        ends = token_ends([len(p) for p in pieces])
        valid = len(_valid_prefix(data))
        cut = bisect.bisect_right(ends, valid)  # student tokens wholly inside the valid UTF-8 prefix
        text_bytes = data[: ends[cut - 1]] if cut else b""
        encoded = self.teacher.encode([text_bytes.decode()])[0] if cut else ([], [])
        spans: list[Span] = []
        if encoded is None:  # the teacher's tokens do not spell the text: one masked span
            spans, teacher_ids, canonical = [Span(0, len(ids), 0, 0, 0, len(data))], [], [False]
            return spans, teacher_ids, canonical, [0] * len(ids), data
        teacher_ids, teacher_lengths = encoded
        if cut:
            spans = align_spans(ends[:cut], token_ends(teacher_lengths), char_starts(text_bytes))
        canonical = self._canonical(ids, spans, text_bytes)
        if cut < len(ids):  # bytes that are not valid UTF-8 (a character cut at the end): one masked span
            spans.append(Span(cut, len(ids), len(teacher_ids), len(teacher_ids), len(text_bytes), len(data)))
            canonical.append(False)
        counts = [
            _count_final(spans, self.teacher.final_bytes(data[: ends[t - 1] if t else 0])) for t in range(len(ids))
        ]
        return spans, teacher_ids, canonical, counts, data

    def _canonical(self, ids: list[int], spans: list[Span], data: bytes) -> list[bool]:
        texts = [data[s.byte_start : s.byte_stop].decode() for s in spans]
        encoded = self.student.encode(texts)
        return [
            got is not None and got[0] == ids[s.student_start : s.student_stop] and s.teacher_stop > s.teacher_start
            for s, got in zip(spans, encoded)
        ]

    # ------------------------------------------------------------------ scoring

    def teacher_prompt_ids(self, batch: RolloutBatch, row: int) -> list[int]:
        """The row's prompt rendered with the teacher's chat template (``batch.meta[row]["prompt"]``); without
        one (or a teacher without a chat template) the student's rendered prompt text tokenized by the teacher."""
        from opdplus.rollout.sampler import tokenize_prompts
        from opdplus.tasks.base import TaskItem

        meta = batch.meta[row] if row < len(batch.meta) else {}
        renders = isinstance(meta.get("prompt"), str) or bool(getattr(self.teacher_tokenizer, "chat_template", None))
        if "prompt" in meta and renders:
            tools = {"tools": meta["tools"]} if meta.get("tools") else {}
            task = batch.tasks[row] if row < len(batch.tasks) else ""
            return tokenize_prompts(self.teacher_tokenizer, [TaskItem("", task, meta["prompt"], meta=tools)])[0]
        ids = batch.input_ids_B_T[row, : batch.prompt_len][batch.attention_mask_B_T[row, : batch.prompt_len]]
        text = self.student_tokenizer.decode(ids.tolist())
        return list(self.teacher_tokenizer(text, add_special_tokens=False).input_ids)

    def score_spans(self, batch: RolloutBatch) -> SpanScores:
        """Teacher log-probs, span layout and loss mask of ``batch`` (module docstring)."""
        from opdplus.rollout.sampler import left_pad, pad_token_id

        loss_B_T = batch.loss_mask_B_T.cpu()
        ids_B_T = batch.input_ids_B_T.cpu()
        width = ids_B_T.shape[1]
        rows, prompts, completions = [], [], []
        for b in range(batch.batch_size):
            cols = loss_B_T[b].nonzero().squeeze(-1)
            first = int(cols[0]) if len(cols) else batch.prompt_len
            if len(cols) and int(cols[-1]) - first + 1 != len(cols):
                raise ValueError(
                    f"row {b}: the loss mask is not one run of completion tokens (multi-turn rollouts); a "
                    "cross-tokenizer teacher scores single-turn completions only"
                )
            alignment = self.align_row(ids_B_T[b, cols].tolist())
            rows.append((first, alignment))
            prompts.append(self.teacher_prompt_ids(batch, b))
            completions.append(alignment.teacher_ids)
        teacher_lp = self._score_teacher_ids(prompts, completions, left_pad, pad_token_id(self.teacher_tokenizer))
        span_lp_B_T = torch.zeros(ids_B_T.shape, dtype=torch.float64)
        keep_B_T = torch.zeros_like(loss_B_T)
        for b, (first, alignment) in enumerate(rows):
            for span, kept in zip(alignment.spans, alignment.canonical):
                end = first + span.student_stop - 1
                span_lp_B_T[b, end] = float(sum(teacher_lp[b][span.teacher_start : span.teacher_stop]))
                keep_B_T[b, first + span.student_start : end + 1] = kept
        span_end_B_T, return_from_B_T = span_layout(
            [(first, a.spans, a.return_from) for first, a in rows], (batch.batch_size, width)
        )
        sampler_B_T = batch.sampler_logprobs_B_T.detach().cpu().double()
        teacher_B_T = spread_span_logprobs(span_lp_B_T, sampler_B_T, span_end_B_T)
        teacher_B_T = torch.where(keep_B_T, teacher_B_T, torch.where(loss_B_T, sampler_B_T, 0.0))
        device = batch.input_ids_B_T.device
        return SpanScores(
            teacher_B_T.float().to(device),
            span_end_B_T.to(device),
            return_from_B_T.to(device),
            (loss_B_T & keep_B_T).to(device),
        )

    def _score_teacher_ids(self, prompts, completions, left_pad, pad_id: int) -> list[list[float]]:
        """The inner teacher's log-prob of every completion token, per row."""
        prompt_ids_B_P, prompt_mask_B_P = left_pad(prompts, pad_id)
        width = max([len(c) for c in completions] + [1])
        completion_B_C = torch.full((len(completions), width), pad_id, dtype=torch.long)
        completion_mask_B_C = torch.zeros((len(completions), width), dtype=torch.bool)
        for b, ids in enumerate(completions):
            completion_B_C[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            completion_mask_B_C[b, : len(ids)] = True
        loss_B_T = torch.cat([torch.zeros_like(prompt_mask_B_P), completion_mask_B_C], dim=1)
        teacher_batch = RolloutBatch(
            input_ids_B_T=torch.cat([prompt_ids_B_P, completion_B_C], dim=1),
            attention_mask_B_T=torch.cat([prompt_mask_B_P, completion_mask_B_C], dim=1),
            loss_mask_B_T=loss_B_T,
            sampler_logprobs_B_T=torch.zeros(loss_B_T.shape),
            prompt_len=prompt_ids_B_P.shape[1],
        )
        scores_B_T = self.inner.score(teacher_batch).double().cpu()
        start = prompt_ids_B_P.shape[1]
        return [scores_B_T[b, start : start + len(ids)].tolist() for b, ids in enumerate(completions)]


def _shift(span: Span, student: int, teacher: int) -> Span:
    return Span(
        span.student_start + student,
        span.student_stop + student,
        span.teacher_start + teacher,
        span.teacher_stop + teacher,
        span.byte_start,
        span.byte_stop,
    )


def _count_final(spans: list[Span], final_bytes: int) -> int:
    """Leading spans of a text run whose bytes end within its ``final_bytes``."""
    return bisect.bisect_right([span.byte_stop for span in spans], final_bytes)


# ---------------------------------------------------------------- the trainer's side


def score_rollouts(teacher: Teacher, batch: RolloutBatch) -> None:
    """Set ``batch.teacher_logprobs_B_T``; for a cross-tokenizer teacher also the span layout
    (``batch.span_end_B_T``, ``batch.span_return_from_B_T``) and the loss mask without non-canonical spans."""
    if not getattr(teacher, "cross_tokenizer", False):
        batch.teacher_logprobs_B_T = teacher.score(batch)
        return
    scores: SpanScores = teacher.score_spans(batch)  # pyright: ignore[reportAttributeAccessIssue]
    batch.teacher_logprobs_B_T = scores.teacher_logprobs_B_T
    batch.loss_mask_B_T = scores.loss_mask_B_T
    batch.span_end_B_T = scores.span_end_B_T
    batch.span_return_from_B_T = scores.return_from_B_T


def rollout_advantages(
    batch: RolloutBatch,
    student_logprobs_B_T: torch.Tensor,
    *,
    divergence: Any,
    estimator: str,
    gamma: float,
    log_ratio_clip: float | None,
) -> torch.Tensor:
    """The advantages of ``batch``: ``opdplus.ops.advantages`` per token, or with a span layout (a
    cross-tokenizer teacher) ``opdplus.ops.align.span_advantages``."""
    from opdplus.ops.advantages import advantages
    from opdplus.ops.align import span_advantages

    if batch.teacher_logprobs_B_T is None:
        raise ValueError("score the batch first: batch.teacher_logprobs_B_T is None")
    kwargs = {"divergence": divergence, "estimator": estimator, "gamma": gamma, "log_ratio_clip": log_ratio_clip}
    if batch.span_end_B_T is None or batch.span_return_from_B_T is None:
        return advantages(student_logprobs_B_T, batch.teacher_logprobs_B_T, batch.loss_mask_B_T, **kwargs)
    return span_advantages(
        student_logprobs_B_T,
        batch.teacher_logprobs_B_T,
        batch.loss_mask_B_T,
        batch.span_end_B_T,
        batch.span_return_from_B_T,
        **kwargs,
    )


def token_span_scores(teacher: Teacher, batch: RolloutBatch) -> SpanScores:
    """``SpanScores`` of a teacher of the student's tokenizer: every token its own span, final at once."""
    span_end_B_T, return_from_B_T = token_span_layout(batch.loss_mask_B_T)
    return SpanScores(teacher.score(batch), span_end_B_T, return_from_B_T, batch.loss_mask_B_T)
