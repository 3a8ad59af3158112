"""``opdplus sft``: TRL's SFTTrainer with LoRA on a tiny random model, a few steps; adapter, loss, held-out
evaluation and resume from a checkpoint."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("trl", reason="opdplus sft needs trl: make install includes it")
pytest.importorskip("peft", reason="opdplus sft needs peft: make install includes it")
pytest.importorskip("math_verify", reason="optional extra: pip install math-verify")
pytest.importorskip("reasoning_gym", reason="optional extra: pip install reasoning-gym")

from opdplus.commands import main  # noqa: E402
from opdplus.models.load import load_model_and_tokenizer  # noqa: E402
from opdplus.tasks.base import TaskItem  # noqa: E402
from opdplus.train.config import ConfigError  # noqa: E402
from opdplus.train.sft import (  # noqa: E402
    chain_steps,
    held_out_without_train,
    load_sft_config,
    reference_completion,
    sft,
    sft_examples,
)


def tiny_sft_overrides(run_dir, model_dir) -> list[str]:
    return [
        f"run.dir={run_dir}",
        f"model.model={model_dir}",
        "run.steps=4",
        "run.checkpoint_every=2",
        "run.threads=1",
        "run.log_every=1",
        "data.train_items=16",
        "data.eval_items=4",
        "optim.batch_size=4",
        "optim.warmup_steps=0",
        "optim.lr=0.01",
        "eval.max_new_tokens=6",
        "eval.batch_size=4",
    ]


def test_sft_writes_adapter_evaluates_and_resumes(tmp_path, tiny_model_dir, capsys):
    run_dir = tmp_path / "sft"
    cfg = load_sft_config(None, [*tiny_sft_overrides(run_dir, tiny_model_dir), "run.save_merged=true"])
    result = sft(cfg)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "adapter.sha256").read_text().split()[0] == result.adapter_sha256
    assert len(result.train_loss) == 4 and all(math.isfinite(x) for x in result.train_loss)
    assert result.train_loss[-1] < result.train_loss[0]  # lr 0.01 on 16 items: the loss goes down
    assert result.eval_n == 4 and result.eval_accuracy is not None and 0.0 <= result.eval_accuracy <= 1.0
    samples = [json.loads(line) for line in (run_dir / "eval_samples.jsonl").read_text().splitlines()]
    assert [set(s) for s in samples] == [{"id", "completion", "answer", "correct"}] * 4
    assert (run_dir / "checkpoints" / "checkpoint-4").is_dir()
    merged, _ = load_model_and_tokenizer(str(run_dir / "merged"))  # a plain model directory: a teacher spec
    assert not any("lora" in name for name, _ in merged.named_parameters())

    # the same command with more steps continues from the newest checkpoint (step 4), not from step 0
    capsys.readouterr()
    code = main(["sft", *tiny_sft_overrides(run_dir, tiny_model_dir), "run.steps=6"])
    assert code == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "checkpoint-4" in out
    summary = json.loads((run_dir / "result.json").read_text())
    assert summary["steps"] == 6 and len(summary["train_loss"]) == 6


def test_resume_with_another_config_is_an_error(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "sft"
    overrides = [*tiny_sft_overrides(run_dir, tiny_model_dir), "run.steps=2", "data.eval_items=0"]
    sft(load_sft_config(None, overrides))
    with pytest.raises(ConfigError, match="another config"):
        sft(load_sft_config(None, [*overrides, "optim.lr=0.5"]))


def test_every_sft_preset_loads_and_validates():
    from pathlib import Path

    presets = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*_sft_*.yaml"))
    assert presets
    for preset in presets:
        assert load_sft_config(preset).lora.enabled, preset


def test_unknown_key_names_the_valid_ones():
    with pytest.raises(ConfigError, match="valid keys at optim: lr, batch_size"):
        load_sft_config(None, ["optim.learning_rate=0.1"])


def test_lora_must_be_enabled():
    with pytest.raises(ConfigError, match="lora.enabled"):
        load_sft_config(None, ["lora.enabled=false"])


def test_reference_completion_of_a_math_item():
    item = TaskItem(id="a", task="math", prompt="p", answer="-4", meta={"expression": "5 - 9"})
    assert reference_completion(item) == "5 - 9 = \\boxed{-4}"
    assert reference_completion(TaskItem(id="b", task="math", prompt="p", answer="7")) == "\\boxed{7}"
    solved = TaskItem(id="c", task="math", prompt="p", answer="7", meta={"solution": "3 + 4 = 7"})
    assert reference_completion(solved) == "3 + 4 = 7"


def test_steps_reduce_a_chain_left_to_right():
    item = TaskItem(id="a", task="math", prompt="p", answer="13", meta={"expression": "8 + 6 - 1"})
    assert reference_completion(item, "steps") == "8 + 6 - 1 = 14 - 1 = \\boxed{13}"
    assert chain_steps("3 - 4 - 9 + -2") == ["-1 - 9 + -2", "-10 + -2", "-12"]
    assert chain_steps("5 - 9") == ["-4"]
    # not a flat chain of + and -: the expression form
    for expression in ("( 3 + 4 )", "3 * 4", "7", "3 + x"):
        assert chain_steps(expression) is None
    odd = TaskItem(id="b", task="math", prompt="p", answer="12", meta={"expression": "3 * 4"})
    assert reference_completion(odd, "steps") == "3 * 4 = \\boxed{12}"
    wrong = TaskItem(id="c", task="math", prompt="p", answer="5", meta={"expression": "2 + 2"})
    with pytest.raises(ValueError, match="reduces to 4"):
        reference_completion(wrong, "steps")


def test_examples_put_the_loss_on_the_completion_only(tiny_model_dir):
    from opdplus.models.load import load_tokenizer
    from opdplus.rollout.sampler import end_of_turn_id, tokenize_prompts

    tokenizer = load_tokenizer(str(tiny_model_dir))
    item = TaskItem(id="a", task="math", prompt=[{"role": "user", "content": "1 + 2"}], answer="3")
    (example,) = sft_examples(tokenizer, [item])
    (prompt_ids,) = tokenize_prompts(tokenizer, [item])
    n_prompt = len(prompt_ids)
    assert example["input_ids"][:n_prompt] == prompt_ids
    assert example["completion_mask"] == [0] * n_prompt + [1] * (len(example["input_ids"]) - n_prompt)
    completion = tokenizer.decode(example["input_ids"][n_prompt:-1])
    assert completion == "\\boxed{3}"
    assert example["input_ids"][-1] == (end_of_turn_id(tokenizer) or tokenizer.eos_token_id)


def test_held_out_items_drop_training_prompts(char_tokenizer):
    train = [TaskItem(id=f"t{i}", task="math", prompt=f"q{i}", answer="1") for i in range(3)]
    held_out = [TaskItem(id="e0", task="math", prompt="q1", answer="1"), TaskItem(id="e1", task="math", prompt="q9")]
    assert [item.id for item in held_out_without_train(char_tokenizer, train, held_out)] == ["e1"]
