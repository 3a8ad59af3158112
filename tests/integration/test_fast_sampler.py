"""FastSampler against its slow twins: HF ``generate`` (greedy tokens), a teacher-forced forward
(log-probs to 1e-5) and the reference ``Sampler`` (the same RolloutBatch)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from opdplus.models.forward import completion_logprobs
from opdplus.models.tiny import build_char_tokenizer, build_tiny_model
from opdplus.rollout import fast_sampler
from opdplus.rollout.fast_sampler import FastSampler, PreallocatedLayer, inverse_cdf_sample, new_kv_cache
from opdplus.rollout.sampler import Sampler, SamplingSettings, left_pad
from opdplus.tasks.base import TaskItem

HEAD_LOGITS = fast_sampler.head_logits
PROMPTS = ["hello world", "ab", "count: 1 2 3 4 5", "x", "the quick brown fox"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def make_model(tokenizer, eos_id: int | None = None, seed: int = 0):
    model = build_tiny_model(
        len(tokenizer),
        seed=seed,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    ).eval()
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    if eos_id is not None:
        model.generation_config.eos_token_id = eos_id
    return model


def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer(p).input_ids for p in PROMPTS]


def frequent_greedy_token(model, tokenizer, max_new_tokens: int) -> int:
    """A token that greedy decoding emits mid-way in some rows: used as an extra EOS so rows finish at
    different steps (exercises dropping finished rows)."""
    ids_B_P, mask_B_P = left_pad(prompt_ids(tokenizer), tokenizer.pad_token_id)
    out = model.generate(
        input_ids=ids_B_P,
        attention_mask=mask_B_P.long(),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
    )
    return int(out[0, ids_B_P.shape[1] + max_new_tokens // 3])


def hf_greedy(model, tokenizer, eos_ids: list[int], max_new_tokens: int) -> torch.Tensor:
    ids_B_P, mask_B_P = left_pad(prompt_ids(tokenizer), tokenizer.pad_token_id)
    return model.generate(
        input_ids=ids_B_P,
        attention_mask=mask_B_P.long(),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
    )


@pytest.mark.parametrize("greedy", [{"greedy": True}, {"top_k": 1}], ids=["greedy", "top_k_1"])
@pytest.mark.parametrize("direct", [True, False], ids=["direct_decoder", "hf_forward_step"])
def test_greedy_tokens_equal_hf_generate(tokenizer, monkeypatch, direct, greedy):
    max_new = 30
    model = make_model(tokenizer)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, frequent_greedy_token(model, tokenizer, max_new)]
    if not direct:
        monkeypatch.setattr(fast_sampler.DirectDecoder, "supports", staticmethod(lambda model, cache: False))
    sampler = FastSampler(
        model,
        tokenizer,
        SamplingSettings(max_new_tokens=max_new, batch_size=3, **greedy),
        torch.Generator().manual_seed(0),
    )
    batch = sampler.sample_ids(prompt_ids(tokenizer))
    reference = hf_greedy(model, tokenizer, sampler.eos_ids, max_new)
    lengths = batch.completion_lengths_B()
    assert lengths.min() < max_new == lengths.max(), "the test needs rows that stop early and rows that do not"
    width = batch.input_ids_B_T.shape[1]
    expected = reference[:, :width].where(batch.attention_mask_B_T, tokenizer.pad_token_id)
    assert torch.equal(batch.input_ids_B_T, expected)
    assert batch.truncated_B is not None
    assert torch.equal(batch.truncated_B, lengths == max_new)


@pytest.mark.parametrize("head_layout", [False, True], ids=["head_call", "transposed_head"])
@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 0), (1.0, 20)])
def test_sampler_logprobs_equal_teacher_forced_forward(tokenizer, monkeypatch, temperature, top_k, head_layout):
    model = make_model(tokenizer)
    monkeypatch.setattr(fast_sampler, "CPU_HEAD_LAYOUT_MIN_VOCAB", 0 if head_layout else 10**9)
    laid_out = []  # per decode step: was the transposed weight given

    def head_logits(head, hidden_b_H, weight_H_V=None):
        laid_out.append(weight_H_V is not None)
        return HEAD_LOGITS(head, hidden_b_H, weight_H_V)

    monkeypatch.setattr(fast_sampler, "head_logits", head_logits)
    settings = SamplingSettings(max_new_tokens=24, temperature=temperature, top_k=top_k)
    with pytest.warns(UserWarning) if temperature != 1.0 else contextlib.nullcontext():
        sampler = FastSampler(model, tokenizer, settings, torch.Generator().manual_seed(3))
    batch = sampler.sample_ids(prompt_ids(tokenizer))
    forced_B_T = completion_logprobs(
        model, batch.input_ids_B_T, batch.attention_mask_B_T, batch.prompt_len, temperature=temperature
    ).detach()
    assert set(laid_out) == {head_layout}
    if top_k:  # the sampler's distribution is renormalised over the top k: its log-probs are >= the full ones
        assert (batch.sampler_logprobs_B_T >= forced_B_T.where(batch.loss_mask_B_T, 0.0) - 1e-5).all()
        return
    torch.testing.assert_close(
        batch.sampler_logprobs_B_T, forced_B_T.where(batch.loss_mask_B_T, 0.0), atol=1e-5, rtol=0
    )
    assert (batch.sampler_logprobs_B_T[~batch.loss_mask_B_T] == 0).all()


def test_fixed_seed_is_reproducible_and_seeds_differ(tokenizer):
    model = make_model(tokenizer)

    def run(seed):
        settings = SamplingSettings(max_new_tokens=20)
        return FastSampler(model, tokenizer, settings, torch.Generator().manual_seed(seed)).sample_ids(
            prompt_ids(tokenizer)
        )

    first, again, other = run(7), run(7), run(8)
    assert torch.equal(first.input_ids_B_T, again.input_ids_B_T)
    assert torch.equal(first.sampler_logprobs_B_T, again.sampler_logprobs_B_T)
    assert not torch.equal(first.input_ids_B_T, other.input_ids_B_T)


@pytest.mark.parametrize("greedy", [{"greedy": True}, {"top_k": 1}], ids=["greedy", "top_k_1"])
def test_same_rollout_batch_as_reference_sampler_when_greedy(tokenizer, greedy):
    model = make_model(tokenizer)
    items = [TaskItem(id=f"i{k}", task="contains", prompt=p) for k, p in enumerate(PROMPTS[:3])]
    settings = SamplingSettings(max_new_tokens=16, samples_per_prompt=2, batch_size=4, **greedy)
    fast = FastSampler(model, tokenizer, settings, torch.Generator().manual_seed(0)).sample(items)
    slow = Sampler(model, tokenizer, settings, torch.Generator().manual_seed(0)).sample(items)
    for name in ("input_ids_B_T", "attention_mask_B_T", "loss_mask_B_T", "truncated_B"):
        assert torch.equal(getattr(fast, name), getattr(slow, name)), name
    torch.testing.assert_close(fast.sampler_logprobs_B_T, slow.sampler_logprobs_B_T, atol=1e-5, rtol=0)
    assert (fast.prompt_len, fast.tasks, fast.meta) == (slow.prompt_len, slow.tasks, slow.meta)


def test_inverse_cdf_sample_matches_distribution_and_never_draws_zero_mass():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])
    logprobs_b_V = probs.log().expand(20_000, -1)
    draws, logprobs_b = inverse_cdf_sample(logprobs_b_V + 7.0, torch.Generator().manual_seed(0))  # unnormalised
    freq = torch.bincount(draws, minlength=6).double() / draws.numel()
    assert (freq[probs == 0] == 0).all()
    torch.testing.assert_close(freq, probs.double(), atol=0.015, rtol=0)
    torch.testing.assert_close(logprobs_b, probs.log()[draws], atol=1e-6, rtol=0)


def test_inverse_cdf_log_prob_equals_log_softmax_at_a_large_vocabulary():
    logits_b_V = torch.randn(8, 49152, generator=torch.Generator().manual_seed(0)) * 4
    tokens_b, logprobs_b = inverse_cdf_sample(logits_b_V, torch.Generator().manual_seed(1))
    exact_b = torch.log_softmax(logits_b_V.double(), -1).gather(-1, tokens_b[:, None]).squeeze(-1)
    torch.testing.assert_close(logprobs_b.double(), exact_b, atol=1e-5, rtol=0)


def test_cache_kind_follows_layer_types(tokenizer):
    model = make_model(tokenizer)
    assert all(isinstance(layer, PreallocatedLayer) for layer in new_kv_cache(model, 16).layers)
    model.config.layer_types = ["sliding_attention"] * model.config.num_hidden_layers
    model.config.sliding_window = 4
    assert not any(isinstance(layer, PreallocatedLayer) for layer in new_kv_cache(model, 16).layers)


def test_lora_student_direct_decoder_matches_teacher_forced_forward(tokenizer):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        make_model(tokenizer),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False),
    ).eval()
    sampler = FastSampler(model, tokenizer, SamplingSettings(max_new_tokens=16), torch.Generator().manual_seed(0))
    batch = sampler.sample_ids(prompt_ids(tokenizer))
    forced_B_T = completion_logprobs(model, batch.input_ids_B_T, batch.attention_mask_B_T, batch.prompt_len).detach()
    torch.testing.assert_close(
        batch.sampler_logprobs_B_T, forced_B_T.where(batch.loss_mask_B_T, 0.0), atol=1e-5, rtol=0
    )
    with model.disable_adapter():  # the adapters change the log-probs, so the check above covers them
        base_B_T = completion_logprobs(model, batch.input_ids_B_T, batch.attention_mask_B_T, batch.prompt_len).detach()
    assert (base_B_T - forced_B_T).abs().max() > 1e-3


@pytest.mark.parametrize("bias", [False, True])
def test_head_logits_equals_the_head_for_every_row_count(bias):
    """The transposed CPU layout (at most 8 rows, vocab >= 8192) and the plain call give the same logits."""
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 8192, bias=bias)
    for rows in range(1, 9):
        weight_H_V = fast_sampler.cpu_head_weight_H_V(head, rows)
        assert weight_H_V is not None and weight_H_V.shape == (32, 8192) and weight_H_V.is_contiguous()
        hidden_b_H = torch.randn(rows, 32)
        torch.testing.assert_close(
            fast_sampler.head_logits(head, hidden_b_H, weight_H_V), head(hidden_b_H), rtol=1e-5, atol=1e-5
        )
    assert fast_sampler.cpu_head_weight_H_V(head, 9) is None  # wide blocks: the call itself
    small = torch.nn.Linear(32, 64)
    assert fast_sampler.cpu_head_weight_H_V(small, 4) is None  # small heads: the call itself
    hidden_b_H = torch.randn(4, 32)
    assert torch.equal(fast_sampler.head_logits(small, hidden_b_H), small(hidden_b_H))
