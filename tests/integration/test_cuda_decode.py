"""The static-shape decode of ``opdplus.rollout.cuda_decode``: its step run eagerly on CPU gives the dynamic
decode's tokens and log-probs (greedy and sampled, rows ending at different steps); the CUDA-graph replay
and the sampler's selection of it need a GPU and are skipped without one."""

from __future__ import annotations

import pytest
import torch

from opdplus.models.tiny import build_char_tokenizer, build_tiny_model
from opdplus.rollout.cuda_decode import cuda_decoder_for, static_decode, supports_static_decode
from opdplus.rollout.fast_sampler import FastSampler
from opdplus.rollout.sampler import SamplingSettings, left_pad

PROMPTS = ["hello world", "ab", "count: 1 2 3 4 5", "x", "the quick brown fox"]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device (this machine has none)")


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def make_model(tokenizer, device: str = "cpu"):
    model = build_tiny_model(
        len(tokenizer),
        seed=0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return model.to(torch.device(device))  # pyright: ignore[reportCallIssue, reportArgumentType]  (HF's wrapped .to)


def prompts(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    return left_pad([tokenizer(p).input_ids for p in PROMPTS], tokenizer.pad_token_id)


def sampler_for(model, tokenizer, seed: int, **settings) -> FastSampler:
    return FastSampler(
        model.eval(),
        tokenizer,
        SamplingSettings(max_new_tokens=24, samples_per_prompt=1, **settings),
        torch.Generator(device=next(model.parameters()).device).manual_seed(seed),
    )


def extra_eos(model, tokenizer) -> int:
    """A token greedy decoding emits a few steps in: as an extra EOS, rows stop at different steps."""
    ids_B_P, mask_B_P = prompts(tokenizer)
    completion_B_C, _ = sampler_for(model, tokenizer, 0, greedy=True).decode(ids_B_P, mask_B_P)
    longest = int((completion_B_C != tokenizer.pad_token_id).sum(-1).argmax())
    return int(completion_B_C[longest, 5])


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_static_step_on_cpu_equals_the_dynamic_decode(tokenizer, greedy):
    model = make_model(tokenizer)
    ids_B_P, mask_B_P = prompts(tokenizer)
    settings = {"greedy": True} if greedy else {}
    if greedy:  # with an extra EOS the rows finish at different steps (the static batch keeps them)
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, extra_eos(model, tokenizer)]
    dynamic = sampler_for(model, tokenizer, 3, **settings)
    static = sampler_for(model, tokenizer, 3, **settings)
    if not greedy:  # no row stops: the dynamic decode draws one number per running row, the static one per row
        dynamic.eos_ids = static.eos_ids = [-1]
    assert supports_static_decode(static)
    tokens_dyn, logprobs_dyn = dynamic.decode(ids_B_P, mask_B_P)
    tokens_st, logprobs_st = static_decode(static, ids_B_P, mask_B_P, cuda_graph=False, check_every=4)
    if greedy:
        assert len({int((row == static.pad_id).sum()) for row in tokens_st}) > 1  # rows ended at different steps
    assert torch.equal(tokens_st, tokens_dyn)
    torch.testing.assert_close(logprobs_st, logprobs_dyn, atol=1e-5, rtol=1e-5)


def test_cuda_decoder_is_not_selected_on_cpu(tokenizer):
    sampler = sampler_for(make_model(tokenizer), tokenizer, 0)
    assert cuda_decoder_for(sampler) is None


def test_check_every_must_be_positive(tokenizer):
    sampler = sampler_for(make_model(tokenizer), tokenizer, 0)
    with pytest.raises(ValueError, match="check_every must be >= 1"):
        static_decode(sampler, *prompts(tokenizer), cuda_graph=False, check_every=0)


@needs_cuda
@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_cuda_graph_decode_equals_the_eager_static_step(tokenizer, greedy):
    model = make_model(tokenizer, "cuda")
    settings = {"greedy": True} if greedy else {}
    ids_B_P, mask_B_P = prompts(tokenizer)
    graph = sampler_for(model, tokenizer, 3, **settings)
    eager = sampler_for(model, tokenizer, 3, **settings)
    assert cuda_decoder_for(graph) is not None
    tokens_g, logprobs_g = graph.decode(ids_B_P, mask_B_P)  # FastSampler selects the CUDA-graph loop
    tokens_e, logprobs_e = static_decode(eager, ids_B_P, mask_B_P, cuda_graph=False)
    assert torch.equal(tokens_g, tokens_e)
    torch.testing.assert_close(logprobs_g, logprobs_e, atol=1e-4, rtol=1e-4)


def _decode_reads(tokenizer, monkeypatch, *, new_tokens: int, check_every: int) -> int:
    """Tensor -> Python reads (a host-device sync on a GPU) made by one static decode of ``new_tokens``."""
    model = make_model(tokenizer)
    sampler = FastSampler(
        model.eval(), tokenizer, SamplingSettings(max_new_tokens=new_tokens), torch.Generator().manual_seed(0)
    )
    sampler.eos_ids = [-1]  # no row stops, so every check runs
    reads = []
    with monkeypatch.context() as patch:
        for name in ("__bool__", "__int__", "__float__", "item", "tolist"):
            original = getattr(torch.Tensor, name)

            def counted(self, *args, _original=original, **kwargs):
                reads.append(1)
                return _original(self, *args, **kwargs)

            patch.setattr(torch.Tensor, name, counted)
        tokens_B_C, _ = static_decode(sampler, *prompts(tokenizer), cuda_graph=False, check_every=check_every)
    assert tokens_B_C.shape == (len(PROMPTS), new_tokens)
    return len(reads)


def test_static_decode_reads_the_device_per_check_not_per_token(tokenizer, monkeypatch):
    """Without checks the reads do not grow with the tokens; each all-done check adds one."""
    unchecked_12 = _decode_reads(tokenizer, monkeypatch, new_tokens=12, check_every=1000)
    unchecked_24 = _decode_reads(tokenizer, monkeypatch, new_tokens=24, check_every=1000)
    checked_24 = _decode_reads(tokenizer, monkeypatch, new_tokens=24, check_every=8)
    assert unchecked_24 == unchecked_12
    assert checked_24 == unchecked_24 + 2  # checks after tokens 8 and 16; after the 24th the loop just ends
