"""Multi-turn rollouts over scripted environments: the loss mask, tokens kept exactly as sampled, tool errors,
limits, and the KV-cache continuation against a full recompute."""

from __future__ import annotations

import time

import pytest
import torch

from opdplus.envs.base import AssistantTurn, EnvReply
from opdplus.envs.scripted import ScriptedToolsTask
from opdplus.models.forward import completion_logprobs
from opdplus.models.tiny import build_char_tokenizer, build_tiny_model
from opdplus.rollout import fast_sampler
from opdplus.rollout.fast_sampler import FastSampler
from opdplus.rollout.multiturn import EpisodeLimits, framing_ids, run_episodes
from opdplus.rollout.sampler import Sampler, SamplingSettings
from opdplus.tasks.base import TaskItem


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_tiny_model(
        len(tokenizer),
        seed=0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    ).eval()


class ScriptedSampler(Sampler):
    """A sampler whose every decode returns the next scripted turn (token ids) for each row, log-prob -1 each."""

    def __init__(self, model, tokenizer, turns: list[list[int]]) -> None:
        super().__init__(model, tokenizer, SamplingSettings(max_new_tokens=100), torch.Generator())
        self.turns = turns
        self.calls = 0

    def decode(self, prompt_ids_B_P, prompt_mask_B_P):
        turn = self.turns[min(self.calls, len(self.turns) - 1)]
        self.calls += 1
        rows = prompt_ids_B_P.shape[0]
        return torch.tensor([turn] * rows), torch.full((rows, len(turn)), -1.0)


def char_ids(tokenizer, text: str) -> list[int]:
    """One id per character, never merged into special tokens (``<s>`` stays three tokens)."""
    return [tokenizer.convert_tokens_to_ids(ch) for ch in text]


def test_loss_mask_is_true_exactly_on_scripted_turns_kept_as_sampled(model, tokenizer):
    eot = tokenizer.eos_token_id
    # "<s>" as three character tokens: decoding and re-tokenizing it would give the one BOS token
    turns = [
        char_ids(tokenizer, '<tool_call>{"name": "lookup", "arguments": {"key": "a"}}</tool_call>') + [eot],
        char_ids(tokenizer, "x<s>y") + [eot],
        char_ids(tokenizer, "done") + [eot],
    ]
    task = ScriptedToolsTask(replies=2)
    (item,) = task.items("eval", 1)
    sampler = ScriptedSampler(model, tokenizer, turns)
    batch, (result,) = run_episodes(sampler, task, [item], EpisodeLimits(max_turns=5, max_new_tokens=100))
    row = batch.input_ids_B_T[0, batch.prompt_len :][batch.attention_mask_B_T[0, batch.prompt_len :]].tolist()
    mask = batch.loss_mask_B_T[0, batch.prompt_len :][batch.attention_mask_B_T[0, batch.prompt_len :]].tolist()
    # the row is turn 1, framing of the tool's answer, turn 2, framing of the nudge, turn 3
    history = [*item.prompt, {"role": "assistant", "content": tokenizer.decode(turns[0][:-1])}]
    reply1 = [
        {
            "role": "tool",
            "content": "error: lookup takes one argument key, one of "
            + str(sorted(item.meta["table"]))
            + "; got {'key': 'a'}",
        }
    ]
    if "a" in item.meta["table"]:
        reply1 = [{"role": "tool", "content": str(item.meta["table"]["a"])}]
    framing1 = framing_ids(tokenizer, item, history, reply1, turn_end=tokenizer.eos_token)
    history += [*reply1, {"role": "assistant", "content": "x<s>y"}]
    framing2 = framing_ids(
        tokenizer,
        item,
        history,
        [{"role": "user", "content": "Call lookup(key=...) first."}],
        turn_end=tokenizer.eos_token,
    )
    expected = turns[0] + framing1 + turns[1] + framing2 + turns[2]
    assert row == expected
    assert mask == [True] * len(turns[0]) + [False] * len(framing1) + [True] * len(turns[1]) + [False] * len(
        framing2
    ) + [True] * len(turns[2])
    assert tokenizer.decode(framing1).startswith("\n<|im_start|>tool\n")
    assert tokenizer.decode(framing1).endswith("<|im_end|>\n<|im_start|>assistant\n")
    logprobs = batch.sampler_logprobs_B_T[0, batch.prompt_len :][: len(expected)]
    assert logprobs.tolist() == [-1.0 if m else 0.0 for m in mask]
    assert batch.prompt_len == len(
        tokenizer(
            tokenizer.apply_chat_template(
                item.prompt, tokenize=False, add_generation_prompt=True, tools=item.meta["tools"]
            ),
            add_special_tokens=False,
        ).input_ids
    )
    assert (result.turns, result.tool_calls, result.stop, result.truncated) == (3, 1, "done", False)
    assert result.env_tokens == len(framing1) + len(framing2)
    assert batch.meta[0]["episode"]["turns"] == 3


def test_malformed_call_is_answered_with_a_tool_error(model, tokenizer):
    eot = tokenizer.eos_token_id
    turns = [char_ids(tokenizer, '<tool_call>{"name": "lookup", "argu') + [eot], char_ids(tokenizer, "ok") + [eot]]
    task = ScriptedToolsTask(replies=1)
    sampler = ScriptedSampler(model, tokenizer, turns)
    batch, (result,) = run_episodes(sampler, task, task.items("eval", 1), EpisodeLimits(max_turns=4))
    assert (result.parse_failures, result.tool_errors, result.turns, result.stop) == (1, 1, 2, "done")
    assert "error: the tool call did not parse" in result.text


def test_call_to_an_unknown_tool_is_a_tool_error(model, tokenizer):
    eot = tokenizer.eos_token_id
    turns = [char_ids(tokenizer, '<tool_call>{"name": "rm", "arguments": {}}</tool_call>') + [eot], [eot]]
    task = ScriptedToolsTask(replies=1)
    _, (result,) = run_episodes(ScriptedSampler(model, tokenizer, turns), task, task.items("eval", 1), EpisodeLimits())
    assert (result.tool_calls, result.tool_errors, result.parse_failures) == (1, 1, 0)
    assert "unknown tool 'rm'" in result.text


def test_episode_that_hits_max_turns_is_truncated(model, tokenizer):
    task = ScriptedToolsTask(replies=10)
    turns = [char_ids(tokenizer, "hm") + [tokenizer.eos_token_id]]
    sampler = ScriptedSampler(model, tokenizer, turns)
    batch, results = run_episodes(sampler, task, task.items("eval", 2), EpisodeLimits(max_turns=3))
    assert [(r.turns, r.stop, r.truncated) for r in results] == [(3, "max_turns", True)] * 2
    assert batch.truncated_B is not None and batch.truncated_B.all()
    assert batch.loss_mask_B_T.sum(-1).tolist() == [9, 9]  # three turns of three sampled tokens


def test_episode_token_budget_and_slow_tool_stop_the_episode(model, tokenizer):
    turns = [char_ids(tokenizer, "abcdefgh")]  # never ends a turn: cut at max_new_tokens
    task = ScriptedToolsTask(replies=10)
    limits = EpisodeLimits(max_turns=10, max_new_tokens=5, max_episode_tokens=40)
    batch, (result,) = run_episodes(ScriptedSampler(model, tokenizer, turns), task, task.items("eval", 1), limits)
    assert result.stop == "max_episode_tokens" and result.truncated
    assert int(batch.attention_mask_B_T[0, batch.prompt_len :].sum()) <= 40

    class SlowTask(ScriptedToolsTask):
        def environment(self, item):
            env = super().environment(item)

            def slow_step(turn: AssistantTurn) -> EnvReply:
                time.sleep(5)
                return EnvReply(done=True)

            env.step = slow_step  # type: ignore[method-assign]
            return env

    slow = SlowTask()
    _, (result,) = run_episodes(
        ScriptedSampler(model, tokenizer, turns), slow, slow.items("eval", 1), EpisodeLimits(tool_timeout_s=0.2)
    )
    assert (result.stop, result.truncated, result.tool_errors, result.turns) == ("tool_timeout", True, 1, 1)


@pytest.mark.parametrize("direct", [True, False], ids=["direct_decoder", "hf_forward_step"])
def test_kv_cache_continuation_equals_full_recompute(model, tokenizer, monkeypatch, direct):
    if not direct:
        monkeypatch.setattr(fast_sampler.DirectDecoder, "supports", staticmethod(lambda model, cache: False))
    task = ScriptedToolsTask(replies=2)
    items = task.items("eval", 3)
    limits = EpisodeLimits(max_turns=4, max_new_tokens=10, max_episode_tokens=400)
    greedy = SamplingSettings(max_new_tokens=10, samples_per_prompt=2, batch_size=4, greedy=True)
    cached, _ = run_episodes(FastSampler(model, tokenizer, greedy, torch.Generator()), task, items, limits)
    recomputed, _ = run_episodes(
        FastSampler(model, tokenizer, greedy, torch.Generator()), task, items, limits, kv_cache=False
    )
    reference, _ = run_episodes(Sampler(model, tokenizer, greedy, torch.Generator()), task, items, limits)
    assert torch.equal(cached.input_ids_B_T, recomputed.input_ids_B_T)
    assert torch.equal(cached.input_ids_B_T, reference.input_ids_B_T)
    assert torch.equal(cached.loss_mask_B_T, reference.loss_mask_B_T)
    # sampled: each recorded log-prob equals one teacher-forced forward over the whole trajectory
    sampled = SamplingSettings(max_new_tokens=10, samples_per_prompt=2, batch_size=4)
    batch, results = run_episodes(
        FastSampler(model, tokenizer, sampled, torch.Generator().manual_seed(1)), task, items, limits
    )
    assert max(r.turns for r in results) > 1 and batch.loss_mask_B_T.any()
    forced_B_T = completion_logprobs(model, batch.input_ids_B_T, batch.attention_mask_B_T, batch.prompt_len).detach()
    torch.testing.assert_close(
        batch.sampler_logprobs_B_T, forced_B_T.where(batch.loss_mask_B_T, 0.0), atol=1e-5, rtol=0
    )


def test_plain_prompts_get_a_plain_framing(model, tokenizer):
    task = ScriptedToolsTask(replies=1, prompt_format="plain")
    turns = [char_ids(tokenizer, "hi") + [tokenizer.eos_token_id], [tokenizer.eos_token_id]]
    batch, (result,) = run_episodes(
        ScriptedSampler(model, tokenizer, turns), task, task.items("eval", 1), EpisodeLimits()
    )
    assert "\n\nuser: Call lookup(key=...) first.\n\nassistant:" in result.text
    item = TaskItem(id="x", task="t", prompt="p")
    assert (
        tokenizer.decode(framing_ids(tokenizer, item, [], [{"role": "tool", "content": "7"}], turn_end=""))
        == "\n\ntool: 7\n\nassistant:"
    )


def test_eval_runner_scores_greedy_episodes_and_writes_their_records(model, tokenizer):
    import io
    import json

    from opdplus.eval.runner import evaluate, greedy_accuracy

    task = ScriptedToolsTask(replies=1)
    items = task.items("eval", 3)
    out = io.StringIO()
    result = evaluate(
        model, tokenizer, "scripted", task_and_items=(task, items), max_new_tokens=6, batch_size=2, samples_out=out
    )
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert result.n == 3 and [r["id"] for r in records] == [item.id for item in items]
    assert all({"id", "correct", "score", "calls", "turns"} <= set(r) for r in records)
    assert all(len(r["turns"]) == 2 for r in records)  # one reply, then the closing turn
    assert result.accuracy == sum(r["score"] for r in records) / 3
    scores = greedy_accuracy(model, tokenizer, {"scripted": task}, {"scripted": items}, max_new_tokens=6)
    assert scores == {"scripted": result.accuracy}
