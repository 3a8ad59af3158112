"""Cross-tokenizer alignment (opdplus.ops.align) and the tokenizer side of it (opdplus.rollout.cross_tokenizer)."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from opdplus.ops.advantages import advantages
from opdplus.ops.align import (
    Span,
    align_spans,
    alignment_metrics,
    char_starts,
    return_from_tokens,
    span_advantages,
    span_layout,
    span_sums,
    spread_span_logprobs,
    token_ends,
    token_span_layout,
)
from opdplus.rollout.cross_tokenizer import CrossTokenizerTeacher, TokenizerBytes, byte_level_decoding

# ---------------------------------------------------------------- offsets in, spans out


def test_spans_cut_at_common_boundaries():
    # student "ab|c|de", teacher "abc|de": common boundaries at 3 and 5
    spans = align_spans(token_ends([2, 1, 2]), token_ends([3, 2]), [True] * 6)
    assert spans == [Span(0, 2, 0, 1, 0, 3), Span(2, 3, 1, 2, 3, 5)]


def test_a_boundary_inside_a_character_is_merged_with_the_next():
    # "é" is two bytes; both sides split it after the first byte, which is not a character start
    data = "éa".encode()
    assert char_starts(data) == [True, False, True, True]
    spans = align_spans([1, 2, 3], [1, 2, 3], char_starts(data))
    assert spans == [Span(0, 2, 0, 2, 0, 2), Span(2, 3, 2, 3, 2, 3)]


def test_zero_length_tokens_join_the_span_they_end_in():
    spans = align_spans([1, 3], [0, 3], [True] * 4)  # a teacher token of no bytes (a stripped "▁") first
    assert spans == [Span(0, 2, 0, 2, 0, 3)]


def test_both_sides_must_cover_the_same_bytes():
    with pytest.raises(ValueError, match="cover 3 bytes but teacher tokens cover 2"):
        align_spans([1, 3], [2], [True] * 4)


def test_return_starts_at_the_first_span_not_final():
    spans = align_spans(token_ends([1, 1, 1, 1]), token_ends([2, 1, 1]), [True] * 5)  # ab|c|d
    assert [(s.student_start, s.student_stop) for s in spans] == [(0, 2), (2, 3), (3, 4)]
    # before token 2 only 1 byte is final: span "ab" is open, so token 2's return starts at token 0
    assert return_from_tokens(spans, [0, 0, 1, 3]) == [0, 0, 0, 3]
    # everything final at once: each token's return starts at its own span
    assert return_from_tokens(spans, [0, 1, 2, 3]) == [0, 0, 2, 3]


# ---------------------------------------------------------------- [B, T] tensors


def test_span_layout_sums_and_spread():
    spans = [Span(0, 2, 0, 1, 0, 2), Span(2, 3, 1, 2, 2, 3)]
    span_end_B_T, return_from_B_T = span_layout([(1, spans, [0, 0, 0])], (1, 5))
    assert span_end_B_T.tolist() == [[-1, 2, 2, 3, -1]]
    assert return_from_B_T.tolist() == [[-1, 1, 1, 1, -1]]
    values_B_T = torch.tensor([[9.0, 1.0, 2.0, 4.0, 9.0]])
    assert span_sums(values_B_T, span_end_B_T).tolist() == [[0.0, 3.0, 3.0, 4.0, 0.0]]
    sampler_B_T = torch.tensor([[0.0, -0.5, -0.25, -1.0, 0.0]], dtype=torch.float64)
    span_lp_B_T = torch.tensor([[0.0, 0.0, -2.0, -3.0, 0.0]], dtype=torch.float64)
    spread_B_T = spread_span_logprobs(span_lp_B_T, sampler_B_T, span_end_B_T)
    assert span_sums(spread_B_T, span_end_B_T)[0, 1:4].tolist() == [-2.0, -2.0, -3.0]
    assert spread_B_T[0, 1] == sampler_B_T[0, 1]  # log-ratio 0 before a span's last token


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd", "pearson_chi2"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("estimator", ["opd", "opd_plus"])
def test_one_token_spans_are_the_token_estimator(divergence, gamma, estimator):
    generator = torch.Generator().manual_seed(0)
    student_B_T = -torch.rand(3, 7, generator=generator) * 3
    teacher_B_T = -torch.rand(3, 7, generator=generator) * 3
    loss_mask_B_T = torch.rand(3, 7, generator=generator) > 0.3
    span_end_B_T, return_from_B_T = token_span_layout(loss_mask_B_T)
    kwargs = {"divergence": divergence, "estimator": estimator, "gamma": gamma, "log_ratio_clip": 1.5}
    expected = advantages(student_B_T, teacher_B_T, loss_mask_B_T, **kwargs)
    got = span_advantages(student_B_T, teacher_B_T, loss_mask_B_T, span_end_B_T, return_from_B_T, **kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_span_advantage_by_hand():
    # tokens 0,1 form span A, token 2 span B; before token 2, span A is not final
    spans = [Span(0, 2, 0, 1, 0, 2), Span(2, 3, 1, 2, 2, 3)]
    span_end_B_T, return_from_B_T = span_layout([(0, spans, [0, 0, 0])], (1, 3))
    student_B_T = torch.tensor([[-1.0, -0.5, -2.0]], dtype=torch.float64)
    teacher_B_T = torch.tensor([[-1.0, -1.0, -1.0]], dtype=torch.float64)  # sums: span A -2, span B -1
    mask_B_T = torch.ones(1, 3, dtype=torch.bool)
    got = span_advantages(
        student_B_T, teacher_B_T, mask_B_T, span_end_B_T, return_from_B_T, divergence="reverse_kl", estimator="opd_plus"
    )
    l_a, l_b = -2.0 - (-1.5), -1.0 - (-2.0)  # reverse KL: f = -l, u f'(u) = -1
    expected = [-(-l_a - l_b) - 1, -(-l_a - l_b) - 1, -(-l_a - l_b) - 1]
    assert got[0].tolist() == pytest.approx(expected)
    # span A final before token 2: its cost leaves token 2's return
    span_end_B_T, return_from_B_T = span_layout([(0, spans, [0, 0, 2])], (1, 3))
    got = span_advantages(
        student_B_T, teacher_B_T, mask_B_T, span_end_B_T, return_from_B_T, divergence="reverse_kl", estimator="opd_plus"
    )
    assert got[0, 2].item() == pytest.approx(l_b - 1)


def test_alignment_metrics():
    span_end_B_T = torch.tensor([[-1, 2, 2, 3, 5, 5], [-1, -1, 2, -1, -1, -1]])
    loss_B_T = torch.tensor([[False, True, True, True, False, False], [False, False, True, False, False, False]])
    got = alignment_metrics(span_end_B_T, loss_B_T)
    assert got == {"align/spans_per_token": 4 / 6, "align/max_span_tokens": 2.0, "align/masked_fraction": 2 / 6}


# ---------------------------------------------------------------- real tokenizers (built locally)


def _fast(core: Tokenizer, **special) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=core, **special)


def byte_level_tokenizer(merges: list[tuple[str, str]]) -> PreTrainedTokenizerFast:
    """Byte-level BPE over the 256 byte symbols plus ``merges``, GPT-2 pre-tokenizer, </s> as EOS."""
    alphabet = sorted(byte_level_decoding(), key=lambda ch: byte_level_decoding()[ch])
    vocab = {"</s>": 0, **{ch: i + 1 for i, ch in enumerate(alphabet)}}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(["</s>"])
    return _fast(core, eos_token="</s>")


def b(text: str) -> str:
    """``text`` in byte-level symbols."""
    table = {v: k for k, v in byte_level_decoding().items()}
    return "".join(table[byte] for byte in text.encode())


def test_multibyte_character_split_across_byte_level_tokens():
    student = byte_level_tokenizer([])  # one token per byte: "é" is two tokens
    teacher = byte_level_tokenizer([(b("é")[0], b("é")[1]), (b(" ")[0], b("é")[0] + b("é")[1])])
    cross = CrossTokenizerTeacher(None, student, teacher)  # pyright: ignore[reportArgumentType]
    ids = student("aé é", add_special_tokens=False).input_ids
    assert len(ids) == 6
    row = cross.align_row(ids)
    assert [(s.student_start, s.student_stop) for s in row.spans] == [(0, 1), (1, 3), (3, 6)]
    assert row.canonical == [True, True, True]
    assert teacher.convert_ids_to_tokens(row.teacher_ids) == ["a", b("é"), b(" é")]
    # a completion cut inside "é": the dangling byte is a masked span with no teacher token
    row = cross.align_row(ids[:2])
    assert [(s.student_start, s.student_stop, s.teacher_stop - s.teacher_start) for s in row.spans] == [
        (0, 1, 1),
        (1, 2, 0),
    ]
    assert row.canonical == [True, False]


def test_whitespace_merges_look_ahead():
    student = byte_level_tokenizer([])
    teacher = byte_level_tokenizer([(b(" "), b(" ")), (b(" "), "b")])
    side = TokenizerBytes(teacher)
    # GPT-2's `\s+(?!\S)`: "a  " may still become "a", " ", " b", so only "a" is final
    assert side.final_bytes(b"a  ") == 1
    assert side.final_bytes(b"a  b") == 2
    cross = CrossTokenizerTeacher(None, student, teacher)  # pyright: ignore[reportArgumentType]
    ids = student("a  b", add_special_tokens=False).input_ids + [student.eos_token_id]
    row = cross.align_row(ids)
    assert teacher.convert_ids_to_tokens(row.teacher_ids) == ["a", b(" "), b(" ") + "b", "</s>"]
    assert [(s.student_start, s.student_stop) for s in row.spans] == [(0, 1), (1, 2), (2, 4), (4, 5)]
    # before token 1 "a" may still grow; before token 3 (the "b") the first " " may still merge into "  ",
    # so span 1 stays in its return though token 3 is in span 2
    assert row.return_from == [0, 0, 1, 1, 2]


def test_truncated_mid_word():
    student = byte_level_tokenizer([])
    teacher = byte_level_tokenizer([("h", "e"), ("he", "l"), ("hel", "l"), ("hell", "o")])
    cross = CrossTokenizerTeacher(None, student, teacher)  # pyright: ignore[reportArgumentType]
    ids = student("hi hel", add_special_tokens=False).input_ids  # no EOS: cut inside "hello"
    row = cross.align_row(ids)
    assert teacher.convert_ids_to_tokens(row.teacher_ids) == ["h", "i", b(" "), "hel"]
    assert [(s.student_start, s.student_stop) for s in row.spans] == [(0, 1), (1, 2), (2, 3), (3, 6)]
    assert all(row.canonical)
    # "hi" is final once " " follows it; " hel" is the last pre-token and never final
    assert row.return_from == [0, 0, 0, 2, 2, 2]


def test_sentencepiece_leading_underscore_does_not_shift_offsets():
    vocab = {"<unk>": 0, "</s>": 1, "▁": 2, "h": 3, "i": 4, "▁h": 5, "▁hi": 6}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "h"), ("▁h", "i")], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    core.add_special_tokens(["</s>", "<unk>"])
    sentencepiece = _fast(core, eos_token="</s>", unk_token="<unk>")
    side = TokenizerBytes(sentencepiece)
    ids, lengths = side.encode(["hi hi"])[0] or ([], [])
    assert sentencepiece.convert_ids_to_tokens(ids) == ["▁hi", "▁hi"]
    assert lengths == [2, 3]  # the added leading "▁" is not a byte of the completion
    student = byte_level_tokenizer([])
    cross = CrossTokenizerTeacher(None, student, sentencepiece)  # pyright: ignore[reportArgumentType]
    row = cross.align_row(student("hi hi", add_special_tokens=False).input_ids)
    assert [(s.student_start, s.student_stop) for s in row.spans] == [(0, 2), (2, 5)]
    assert row.canonical == [True, True]


def test_non_canonical_student_tokens_are_masked():
    student = byte_level_tokenizer([("a", "b")])
    teacher = byte_level_tokenizer([("a", "b"), ("x", "y")])
    cross = CrossTokenizerTeacher(None, student, teacher)  # pyright: ignore[reportArgumentType]
    a, bb = (student.get_vocab()[token] for token in ("a", "b"))
    row = cross.align_row([a, bb])  # "a" + "b": the student's own encoding of "ab" is one token
    assert row.canonical == [False]  # one span "ab" (the teacher's one token)
    row = cross.align_row(student("ab", add_special_tokens=False).input_ids)
    assert row.canonical == [True]


def test_an_id_beyond_the_tokenizer_is_a_masked_span_of_its_own():
    student, teacher = byte_level_tokenizer([]), byte_level_tokenizer([("a", "b")])
    cross = CrossTokenizerTeacher(None, student, teacher)  # pyright: ignore[reportArgumentType]
    ids = student("ab", add_special_tokens=False).input_ids
    row = cross.align_row([ids[0], len(student) + 5, ids[1]])  # a model head larger than the vocabulary
    assert [(s.student_start, s.student_stop) for s in row.spans] == [(0, 1), (1, 2), (2, 3)]
    assert row.canonical == [True, False, True]


def test_a_gemma_style_tokenizer_bounds_no_merge_before_the_end():
    """Gemma: the normalizer turns " " into "▁" before a pre-tokenizer that splits on " ", so merges are not
    bounded by spaces and no prefix is final (the raw text would wrongly split at its spaces)."""
    from tokenizers import normalizers

    vocab = {"<unk>": 0, "▁": 1, "a": 2, "b": 3, "▁b": 4, "a▁": 5}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "▁"), ("▁", "b")], unk_token="<unk>"))
    core.normalizer = normalizers.Replace(" ", "▁")  # pyright: ignore[reportAttributeAccessIssue]
    core.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")  # pyright: ignore[reportAttributeAccessIssue]
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])  # pyright: ignore[reportAttributeAccessIssue]
    gemma_like = _fast(core, unk_token="<unk>")
    side = TokenizerBytes(gemma_like)
    assert gemma_like.convert_ids_to_tokens(gemma_like("a b", add_special_tokens=False).input_ids) == ["a▁", "b"]
    assert side.final_bytes(b"a b") == 0 and side.final_bytes(b"a ") == 0
