"""The demo world's build path at a micro budget (a few steps, not to 95%): tokenizer, models, cache."""

import json

import pytest
import torch

from opdplus.eval.runner import greedy_completions
from opdplus.tasks import get_task
from opdplus.tasks.base import TaskItem
from opdplus.world.build import (
    SMOKE_SPEC,
    encode_episodes,
    encode_examples,
    ensure_world,
    reference_text,
    train_tokenizer,
    world_paths,
    world_ready,
    world_texts,
)

MICRO = SMOKE_SPEC


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(world_texts(MICRO.tasks, 200), 1024)


def test_tokenizer_lossless_with_special_tokens(tokenizer):
    for name in MICRO.tasks:
        task = get_task(name)
        for item in task.items("eval", 20):
            text = item.prompt_text + reference_text(task, item)
            ids = tokenizer(text)["input_ids"]
            assert ids[0] == tokenizer.bos_token_id
            assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3


def test_tokenizer_deterministic(tokenizer):
    again = train_tokenizer(world_texts(MICRO.tasks, 200), 1024)
    assert again.get_vocab() == tokenizer.get_vocab()


def test_numbers_are_single_tokens(tokenizer):
    for n in range(13):
        assert len(tokenizer(f" {n}", add_special_tokens=False)["input_ids"]) == 1


def test_encode_example_masks_prompt(tokenizer):
    item = get_task("synthetic_math").items("train", 1)[0]
    (example,) = encode_examples(tokenizer, [item])
    n_prompt = len(tokenizer(item.prompt)["input_ids"])
    assert example.labels[:n_prompt] == [-100] * n_prompt
    assert example.labels[n_prompt:] == example.input_ids[n_prompt:]
    assert example.input_ids[-1] == tokenizer.eos_token_id


def test_encode_episode_trains_assistant_turns_only(tokenizer):
    """A lookup item's reference episode: prompt, call + EOS, the tool's reply framed as a rollout frames it (not
    trained), answer + EOS; labels exactly on the two assistant turns and their EOS."""
    from opdplus.rollout.multiturn import plain_framing

    task = get_task("synthetic_lookup")
    (item,) = task.items("train", 1)
    (example,) = encode_episodes(tokenizer, task, [item])
    call, answer = item.meta["turns"]
    reply = plain_framing([{"role": "tool", "content": str(item.meta["table"][item.meta["key"]])}])
    eos = [tokenizer.eos_token_id]
    prompt_ids = tokenizer(item.prompt)["input_ids"]
    call_ids, reply_ids, answer_ids = (
        tokenizer(t, add_special_tokens=False)["input_ids"] for t in (call, reply, answer)
    )
    assert example.input_ids == prompt_ids + call_ids + eos + reply_ids + answer_ids + eos
    masked = [-100] * len(prompt_ids), [-100] * len(reply_ids)
    assert example.labels == masked[0] + call_ids + eos + masked[1] + answer_ids + eos


def test_build_world_micro(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    logs = []
    paths = ensure_world(tmp_path / "world", spec=MICRO, log=logs.append)
    assert world_ready(paths) and logs
    info = json.loads(paths.info.read_text())
    assert info["teacher"]["steps"] == 3 and info["student"]["steps"] == 2
    assert set(info["teacher"]["eval_accuracy"]) == set(MICRO.tasks)
    teacher = AutoModelForCausalLM.from_pretrained(paths.teacher)
    student = AutoModelForCausalLM.from_pretrained(paths.student)
    tok_t, tok_s = AutoTokenizer.from_pretrained(paths.teacher), AutoTokenizer.from_pretrained(paths.student)
    assert tok_t.get_vocab() == tok_s.get_vocab()
    assert teacher.config.vocab_size == student.config.vocab_size == len(tok_t)
    assert student.num_parameters() < teacher.num_parameters()
    items = [TaskItem(id=str(i), task="t", prompt=p) for i, p in enumerate(["Q: Ann has 1 pens.", "Tools:"])]
    completions = greedy_completions(student, tok_s, items, max_new_tokens=4)
    assert len(completions) == 2 and all(isinstance(c, str) for c in completions)
    # cached: a second call does not rebuild
    logs.clear()
    assert ensure_world(tmp_path / "world", spec=MICRO, log=logs.append) == paths and not logs
    assert not world_ready(world_paths(tmp_path / "missing"))


def test_greedy_completions_batching_and_padding_do_not_matter(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # a random model with large weights: its greedy output depends on every prompt token
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            initializer_range=0.5,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    items = [item for name in MICRO.tasks for item in get_task(name).items("eval", 3)]  # lengths differ
    tokenizer.padding_side = "right"  # the sampler pads on the left whatever the tokenizer says
    batched = greedy_completions(model, tokenizer, items, max_new_tokens=6)
    alone = [greedy_completions(model, tokenizer, [item], max_new_tokens=6)[0] for item in items]
    assert len(set(batched)) == len(items)  # the check below is not vacuous
    assert batched == alone
    tokenizer.padding_side = "left"
