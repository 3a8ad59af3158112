"""Sampler, local teacher and the chunked forward on tiny random models."""

from typing import Any

import pytest
import torch

from opdplus.models.forward import completion_logprobs
from opdplus.models.tiny import build_char_tokenizer, build_tiny_model
from opdplus.ops.logprobs import naive_target_logprobs
from opdplus.rollout.sampler import Sampler, SamplingSettings, left_pad, tokenize_prompts
from opdplus.rollout.teacher import LocalTeacher
from opdplus.rollout.types import Teacher
from opdplus.tasks.base import TaskItem


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def student(tok):
    return build_tiny_model(len(tok), hidden_size=32, intermediate_size=64, seed=0)


def _items():
    return [
        TaskItem(id="a", task="t", prompt="count: 1 2"),
        TaskItem(id="b", task="t", prompt="hi"),
        TaskItem(id="c", task="t", prompt=[{"role": "user", "content": "2+2?"}]),
    ]


def _sample(student, tok, seed=0, **settings):
    settings = {"max_new_tokens": 12, "samples_per_prompt": 2, "batch_size": 4, **settings}
    return Sampler(student, tok, SamplingSettings(**settings), torch.Generator().manual_seed(seed)).sample(_items())


def test_rollout_batch_layout(student, tok):
    batch = _sample(student, tok)
    B, T = batch.input_ids_B_T.shape
    assert B == 6 and batch.prompt_len == max(len(ids) for ids in tokenize_prompts(tok, _items()))
    assert T <= batch.prompt_len + 12
    assert not batch.loss_mask_B_T[:, : batch.prompt_len].any(), "prompt tokens never count"
    assert (batch.loss_mask_B_T <= batch.attention_mask_B_T).all(), "padding never counts"
    assert (batch.sampler_logprobs_B_T[~batch.loss_mask_B_T] == 0).all()
    assert (batch.sampler_logprobs_B_T[batch.loss_mask_B_T] < 0).all()
    assert batch.tasks == ["t"] * 6 and [m["item_id"] for m in batch.meta] == ["a", "a", "b", "b", "c", "c"]
    eos = tok.eos_token_id
    assert batch.truncated_B is not None
    for row, mask, truncated in zip(batch.input_ids_B_T, batch.loss_mask_B_T, batch.truncated_B):
        completion = row[mask]
        assert truncated == (eos not in completion.tolist())
        if not truncated:  # the completion ends at its first EOS, which counts in the loss
            assert completion.tolist().index(eos) == len(completion) - 1
        else:
            assert len(completion) == 12


def test_sampler_logprobs_equal_a_full_forward_of_the_student(student, tok):
    batch = _sample(student, tok)
    recomputed = completion_logprobs(
        student, batch.input_ids_B_T, batch.attention_mask_B_T, batch.prompt_len, chunk_size=5
    )
    torch.testing.assert_close(
        recomputed.where(batch.loss_mask_B_T, 0.0), batch.sampler_logprobs_B_T, atol=1e-5, rtol=0
    )


def test_tempered_sampler_records_tempered_logprobs(student, tok):
    with pytest.warns(UserWarning, match="off-policy"):
        batch = _sample(student, tok, temperature=0.7)
    recomputed = completion_logprobs(
        student, batch.input_ids_B_T, batch.attention_mask_B_T, batch.prompt_len, temperature=0.7
    )
    torch.testing.assert_close(
        recomputed.where(batch.loss_mask_B_T, 0.0), batch.sampler_logprobs_B_T, atol=1e-5, rtol=0
    )


def test_sampler_is_deterministic_per_generator_seed(student, tok):
    a, b, c = _sample(student, tok, seed=3), _sample(student, tok, seed=3), _sample(student, tok, seed=4)
    assert torch.equal(a.input_ids_B_T, b.input_ids_B_T)
    assert not torch.equal(a.input_ids_B_T, c.input_ids_B_T) or a.input_ids_B_T.shape != c.input_ids_B_T.shape


@pytest.mark.parametrize("greedy", [{"greedy": True}, {"top_k": 1}], ids=["greedy", "top_k_1"])
def test_greedy_setting_and_top_k_one_take_the_argmax(student, tok, greedy):
    batch = _sample(student, tok, max_new_tokens=6, **greedy)
    logits = student(
        input_ids=batch.input_ids_B_T,
        attention_mask=batch.attention_mask_B_T.long(),
        position_ids=(batch.attention_mask_B_T.long().cumsum(-1) - 1).clamp(min=0),
    ).logits
    greedy = logits[:, batch.prompt_len - 1 : -1].argmax(-1)
    completion = batch.input_ids_B_T[:, batch.prompt_len :]
    mask = batch.loss_mask_B_T[:, batch.prompt_len :]
    assert torch.equal(completion[mask], greedy[mask])
    assert torch.allclose(batch.sampler_logprobs_B_T[batch.loss_mask_B_T], torch.zeros(()), atol=1e-6)


def test_padding_side_does_not_change_scores(student, tok):
    rows = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    left_ids, left_mask = left_pad(rows, tok.pad_token_id)
    right_ids = torch.full_like(left_ids, tok.pad_token_id)
    right_mask = torch.zeros_like(left_mask)
    for i, r in enumerate(rows):
        right_ids[i, : len(r)] = torch.tensor(r)
        right_mask[i, : len(r)] = True
    left = completion_logprobs(student, left_ids, left_mask, 1)
    right = completion_logprobs(student, right_ids, right_mask, 1)
    torch.testing.assert_close(left[1, 4:], right[1, 1:3], atol=1e-5, rtol=0)  # same tokens 12, 13
    torch.testing.assert_close(left[0], right[0], atol=1e-5, rtol=0)


def test_completion_logprobs_match_naive_and_hold_no_full_logits(student, tok):
    ids = torch.randint(5, len(tok), (3, 10))
    mask = torch.ones_like(ids, dtype=torch.bool)
    out = completion_logprobs(student, ids, mask, 4, chunk_size=3)
    naive = naive_target_logprobs(student(input_ids=ids).logits[:, 3:-1], ids[:, 4:])
    torch.testing.assert_close(out[:, 4:], naive, atol=1e-5, rtol=0)
    assert (out[:, :4] == 0).all()


def test_local_teacher_is_frozen_and_scores_like_a_forward(tok):
    model = build_tiny_model(len(tok), hidden_size=32, intermediate_size=64, seed=5).train()
    teacher = LocalTeacher(model, batch_size=2, chunk_size=4)
    assert isinstance(teacher, Teacher)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    student = build_tiny_model(len(tok), hidden_size=32, intermediate_size=64, seed=0)
    batch = _sample(student, tok)
    scores = teacher.score(batch)
    assert scores.shape == batch.input_ids_B_T.shape and not scores.requires_grad
    expected = completion_logprobs(model, batch.input_ids_B_T, batch.attention_mask_B_T, batch.prompt_len)
    torch.testing.assert_close(scores, expected.where(batch.loss_mask_B_T, 0.0), atol=1e-5, rtol=0)


class _ExactTextTask:
    """Scores 1 when the completion equals ``expected[prompt]``."""

    name = "exact_text"

    def __init__(self, expected):
        self.expected = expected

    def items(self, split, n, seed=0):
        prompts = sorted(self.expected)
        return [TaskItem(id=f"{split}-{i}", task=self.name, prompt=prompts[i % len(prompts)]) for i in range(n)]

    def score(self, item, completion):
        return float(completion == self.expected[item.prompt])


def _greedy_text(model, tok, prompt, max_new_tokens):
    ids = tok(prompt).input_ids
    for _ in range(max_new_tokens):
        next_id = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(next_id)
        if next_id == tok.eos_token_id:
            break
    return tok.decode(ids[len(tok(prompt).input_ids) :], skip_special_tokens=True)


def test_eval_hook_scores_greedy_or_sampled_completions(student, tok):
    from opdplus.train.evaluate import evaluate

    with torch.no_grad():
        expected = {p: _greedy_text(student, tok, p, 6) for p in ("hello", "abc", "count: 1")}
    task = _ExactTextTask(expected)
    teacher = LocalTeacher(build_tiny_model(len(tok), hidden_size=32, intermediate_size=64, seed=5))
    kwargs: dict[str, Any] = {"num_prompts": 6, "max_new_tokens": 6, "seed": 0}
    greedy = evaluate(student, tok, teacher, {"exact_text": task}, score_decoding="greedy", **kwargs)
    sampled = evaluate(student, tok, teacher, {"exact_text": task}, **kwargs)
    assert greedy["eval/exact_text/score"] == 1.0 == greedy["eval/score"]
    assert sampled["eval/score"] < 1.0
    assert greedy["eval/reverse_kl"] == sampled["eval/reverse_kl"] > 0  # KL always from temperature-1 samples
    assert evaluate(student, tok, teacher, {"exact_text": task}, **kwargs) == sampled  # own generator: repeatable


def test_eos_rule_adds_the_chat_templates_end_of_turn_token():
    from types import SimpleNamespace

    from opdplus.rollout.sampler import end_of_turn_id, eos_token_ids

    tok = build_char_tokenizer()
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tok) == end_of_turn
    tok.eos_token = "<s>"  # a tokenizer whose EOS is not the end-of-turn token
    config = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[tok.pad_token_id]))
    assert eos_token_ids(tok, config) == [tok.convert_tokens_to_ids("<s>"), tok.pad_token_id, end_of_turn]
    tok.chat_template = None
    assert end_of_turn_id(tok) is None
    assert eos_token_ids(tok, config) == [tok.convert_tokens_to_ids("<s>"), tok.pad_token_id]
