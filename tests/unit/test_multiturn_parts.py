"""Pure parts of multi-turn rollouts: turn parsing, the tool time limit, framing errors, batch joining,
episode metrics and the new config keys."""

from __future__ import annotations

import time

import pytest
import torch

from opdplus.envs.base import AssistantTurn, EnvReply
from opdplus.envs.scripted import ScriptedEnvironment, lookup_results
from opdplus.models.tiny import build_char_tokenizer
from opdplus.rollout.multiturn import (
    EpisodeLimits,
    assistant_tail,
    assistant_turn,
    concat_batches,
    framing_ids,
    step_with_timeout,
)
from opdplus.rollout.types import RolloutBatch
from opdplus.tasks.base import TaskItem
from opdplus.train.config import ConfigError, load_config
from opdplus.train.metrics import episode_metrics


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def test_assistant_turn_parses_calls_and_flags_malformed_ones(tokenizer):
    def turn(text: str) -> AssistantTurn:
        return assistant_turn(tokenizer, tokenizer(text, add_special_tokens=False).input_ids)

    assert turn('<tool_call>{"name": "lookup", "arguments": {"key": "a"}}</tool_call>').calls == [
        {"lookup": {"key": "a"}}
    ]
    assert turn('lookup(key="b")').calls == [{"lookup": {"key": "b"}}]
    assert turn("the answer is 42") == AssistantTurn(text="the answer is 42", calls=[], malformed=False)
    broken = turn('<tool_call>{"name": "lookup", "argu')
    assert broken.malformed and broken.calls == []


def test_scripted_environment_answers_errors_and_ends():
    env = ScriptedEnvironment({"a": 11, "b": 22}, answer=22, replies=2)
    reply = env.step(AssistantTurn(text="", calls=[{"lookup": {"key": "b"}}, {"lookup": {"key": "z"}}]))
    assert [m["content"] for m in reply.messages][0] == "22" and reply.tool_calls == 2 and reply.tool_errors == 1
    assert env.step(AssistantTurn(text="", malformed=True)).tool_errors == 1
    assert env.step(AssistantTurn(text="it is 22")).done and env.score() == 1.0
    assert lookup_results([{"rm": {}}], {"a": 1}) == (["error: unknown tool 'rm'; the only tool is lookup(key=...)"], 1)


def test_step_with_timeout_returns_none_for_a_slow_step_and_reraises_errors():
    class Slow:
        def step(self, turn):
            time.sleep(2)
            return EnvReply(done=True)

    class Broken:
        def step(self, turn):
            raise RuntimeError("bug in the environment")

    assert step_with_timeout(Slow(), AssistantTurn(text=""), 0.05) is None  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="bug in the environment"):
        step_with_timeout(Broken(), AssistantTurn(text=""), 1.0)  # type: ignore[arg-type]


def test_framing_extends_the_rendered_history_and_refuses_re_rendering_templates(tokenizer):
    item = TaskItem(id="x", task="t", prompt=[{"role": "user", "content": "q"}])
    history = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "call"}]
    reply = [{"role": "tool", "content": "7"}]
    assert assistant_tail(tokenizer) == "<|im_end|>\n"
    ended = tokenizer.decode(framing_ids(tokenizer, item, history, reply, turn_end="<|im_end|>"))
    assert ended == "\n<|im_start|>tool\n7<|im_end|>\n<|im_start|>assistant\n"
    cut = tokenizer.decode(framing_ids(tokenizer, item, history, reply, turn_end=""))
    assert cut == "<|im_end|>" + ended  # the framing closes a turn cut by max_new_tokens
    dropping = build_char_tokenizer(
        chat_template="{% for m in messages %}{% if m.role != 'assistant' or loop.last %}{{ m.role + ':' + m.content + "
        "'<|im_end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    )
    with pytest.raises(ValueError, match="re-renders earlier turns"):
        framing_ids(dropping, item, history, reply, turn_end="<|im_end|>")


def _batch(prompt: list[int], completion: list[int], sampled: list[bool]) -> RolloutBatch:
    ids = torch.tensor([prompt + completion])
    return RolloutBatch(
        input_ids_B_T=ids,
        attention_mask_B_T=torch.ones_like(ids, dtype=torch.bool),
        loss_mask_B_T=torch.tensor([[False] * len(prompt) + sampled]),
        sampler_logprobs_B_T=torch.tensor([[0.0] * len(prompt) + [-1.0 if s else 0.0 for s in sampled]]),
        prompt_len=len(prompt),
        tasks=["a"],
        meta=[{"item_id": "a"}],
    )


def test_concat_batches_aligns_prompts_left_and_completions_right():
    joined = concat_batches([_batch([5, 6, 7], [8], [True]), _batch([9], [10, 11, 12], [True, False, True])], pad_id=0)
    assert joined.prompt_len == 3
    assert joined.input_ids_B_T.tolist() == [[5, 6, 7, 8, 0, 0], [0, 0, 9, 10, 11, 12]]
    assert joined.attention_mask_B_T.tolist() == [[True] * 4 + [False] * 2, [False] * 2 + [True] * 4]
    assert joined.loss_mask_B_T.tolist() == [[False] * 3 + [True, False, False], [False] * 3 + [True, False, True]]
    assert joined.sampler_logprobs_B_T[1].tolist() == [0, 0, 0, -1, 0, -1]
    assert joined.tasks == ["a", "a"] and len(joined.meta) == 2


def test_episode_metrics_average_over_episode_rows_only():
    batch = concat_batches([_batch([1], [2], [True]), _batch([1], [2], [True])], pad_id=0)
    assert episode_metrics(batch) == {}
    batch.meta = [
        {"episode": {"turns": 2, "tool_calls": 1, "tool_errors": 0, "parse_failures": 1, "env_tokens": 10}},
        {},
    ]
    assert episode_metrics(batch) == {
        "rollout/turns": 2.0,
        "rollout/tool_calls": 1.0,
        "rollout/tool_errors": 0.0,
        "rollout/parse_failures": 1.0,
        "rollout/env_tokens": 10.0,
    }


def test_episode_limits_and_config_keys_are_checked():
    with pytest.raises(ValueError, match="max_turns"):
        EpisodeLimits(max_turns=0)
    with pytest.raises(ValueError, match="tool_timeout_s"):
        EpisodeLimits(tool_timeout_s=-1)
    cfg = load_config(None, ["rollout.max_turns=3", "rollout.tool_timeout_s=0", "loss.normalizer=constant"])
    assert (cfg.rollout.max_turns, cfg.rollout.tool_timeout_s, cfg.loss.normalizer) == (3, 0.0, "constant")
    for override, key in [
        ("rollout.max_turns=0", "rollout.max_turns"),
        ("rollout.max_episode_tokens=0", "rollout.max_episode_tokens"),
        ("rollout.tool_timeout_s=-1", "rollout.tool_timeout_s"),
        ("loss.normalizer=mean", "loss.normalizer"),
    ]:
        with pytest.raises(ConfigError, match=key):
            load_config(None, [override])
