"""The student/teacher vocabulary checks: tokenizers compared id by id, and the probe a served teacher decodes."""

from __future__ import annotations

import pytest

from opdplus.models.load import check_same_tokenizer, decoded_tokens, first_token_difference, probe_token_ids
from opdplus.models.tiny import DEFAULT_CHARS, build_char_tokenizer


def test_same_size_tokenizers_with_other_ids_name_the_first_difference():
    student = build_char_tokenizer()
    swapped = build_char_tokenizer(chars=DEFAULT_CHARS[1] + DEFAULT_CHARS[0] + DEFAULT_CHARS[2:])
    check_same_tokenizer(student, build_char_tokenizer())
    with pytest.raises(
        ValueError, match=r"both have 102 tokens .* \(first difference: id 5 is '0' for the student, '1'"
    ):
        check_same_tokenizer(student, swapped)


def test_the_probe_covers_special_tokens_text_and_the_whole_vocabulary():
    tokenizer = build_char_tokenizer()
    ids = probe_token_ids(tokenizer)
    assert set(tokenizer.all_special_ids) <= set(ids)
    assert {0, len(tokenizer) - 1} <= set(ids) and len(ids) == len(set(ids))
    assert all(0 <= i < len(tokenizer) for i in ids)
    tokens = decoded_tokens(tokenizer, ids)
    assert first_token_difference(ids, tokens, tokens) is None
    first = list(range(8))
    other = decoded_tokens(build_char_tokenizer(chars="abc"), first)
    assert first_token_difference(first, decoded_tokens(tokenizer, first), other) == (
        "id 5 is '0' for the student, 'a' for the teacher"
    )
