"""Synthetic math and tool-use tasks: generators (deterministic, disjoint splits) and exact scorers."""

import json
import re

import pytest

from opdplus.tasks import get_task, task_names
from opdplus.tasks.base import Task
from opdplus.tasks.synthetic import (
    MAX_VALUE,
    TOOLS,
    TaskItem,
    extract_final_answer,
    score_math,
    score_tool_call,
    solution_of,
    split_of,
)

TASKS = ("synthetic_math", "synthetic_tool_use")


@pytest.mark.parametrize("name", TASKS)
def test_registered_and_implements_task(name):
    assert name in task_names()
    assert isinstance(get_task(name), Task)


@pytest.mark.parametrize("name", TASKS)
def test_items_deterministic_per_seed(name):
    task = get_task(name)
    first, again, other = (
        task.items("train", 50, seed=3),
        task.items("train", 50, seed=3),
        task.items("train", 50, seed=4),
    )
    assert [i.prompt for i in first] == [i.prompt for i in again]
    assert [i.answer for i in first] == [i.answer for i in again]
    assert [i.prompt for i in first] != [i.prompt for i in other]


@pytest.mark.parametrize("name", TASKS)
def test_splits_disjoint(name):
    task = get_task(name)
    train = {i.prompt_text for i in task.items("train", 2000)}
    held_out = {i.prompt_text for i in task.items("eval", 300)}
    assert not train & held_out
    assert all(split_of(p) == "eval" for p in held_out)
    assert len(held_out) > 100  # the eval split is not a handful of repeats


@pytest.mark.parametrize("name", TASKS)
def test_reference_solution_scores_one(name):
    task = get_task(name)
    for item in task.items("eval", 200):
        assert task.score(item, solution_of(item)) == 1.0, item.prompt


@pytest.mark.parametrize("name", TASKS)
def test_unknown_split_rejected(name):
    with pytest.raises(ValueError, match="valid splits"):
        get_task(name).items("test", 1)


def test_math_problem_shape():
    for item in get_task("synthetic_math").items("train", 300):
        steps = re.findall(r"(\d+) ([+-]) (\d+) = (\d+)\.", solution_of(item))
        assert 2 <= len(steps) <= 3
        for a, op, b, c in steps:
            assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b))
            assert 0 <= int(c) <= MAX_VALUE
        assert int(steps[-1][3]) == item.answer
        assert item.prompt_text.startswith("Q: ") and item.prompt_text.endswith("\nA:")


@pytest.mark.parametrize(
    "completion, expected",
    [
        (" 5 + 3 = 8. 8 - 2 = 6. #### 6", 1.0),
        ("#### 6", 1.0),
        ("####6", 1.0),
        ("#### 6.0", 1.0),
        (" 5 + 3 = 8. #### 8", 0.0),
        (" 6", 0.0),  # no final-answer marker
        ("", 0.0),
        ("#### six", 0.0),
        ("#### -6", 0.0),
    ],
)
def test_score_math(completion, expected):
    assert score_math(6, completion) == expected


def test_extract_final_answer_non_string():
    assert extract_final_answer(None) is None


def _alarm_item(arguments):
    tools = [TOOLS["set_alarm"].schema(), TOOLS["get_weather"].schema()]
    return {"name": "set_alarm", "arguments": arguments}, tools


def _temp_item(arguments):
    return {"name": "set_temperature", "arguments": arguments}, [
        TOOLS["set_temperature"].schema(),
        TOOLS["play_music"].schema(),
    ]


@pytest.mark.parametrize(
    "completion, expected",
    [
        ('{"name": "set_alarm", "arguments": {"hour": 7}}', 1.0),
        (' {"name": "set_alarm", "arguments": {"hour": 7}} ', 1.0),  # surrounding whitespace
        ('{"arguments": {"hour": 7}, "name": "set_alarm"}', 1.0),  # key order is irrelevant
        ('{"name": "set_alarm", "arguments": {"hour": 7.0}}', 0.0),  # float for an int param
        ('{"name": "set_alarm", "arguments": {"hour": "7"}}', 0.0),  # string for an int param
        ('{"name": "set_alarm", "arguments": {"hour": true}}', 0.0),  # bool is not a number
        ('{"name": "set_alarm", "arguments": {"hour": 8}}', 0.0),  # wrong value
        ('{"name": "set_alarm", "arguments": {"hour": 7, "minute": 0}}', 0.0),  # optional arg never asked for
        ('{"name": "set_alarm", "arguments": {"hour": 7, "second": 0}}', 0.0),  # extra key
        ('{"name": "set_alarm", "arguments": {}}', 0.0),  # missing required
        ('{"name": "get_weather", "arguments": {"hour": 7}}', 0.0),  # wrong tool
        ('{"name": "set_alarm", "arguments": {"hour": 7}, "id": 1}', 0.0),  # extra top-level key
        ('{"name": "set_alarm", "args": {"hour": 7}}', 0.0),  # wrong top-level key
        ('{"name": "set_alarm", "arguments": [7]}', 0.0),  # arguments not an object
        ('{"name": "set_alarm", "arguments": {"hour": 7}', 0.0),  # truncated JSON
        ('{"name": "set_alarm", "arguments": {"hour": 7}} {"name": "set_alarm"}', 0.0),  # two calls
        ('[{"name": "set_alarm", "arguments": {"hour": 7}}]', 0.0),  # list, not one call
        ("set_alarm(hour=7)", 0.0),
        ("", 0.0),
        ("null", 0.0),
        ('"set_alarm"', 0.0),
        ("[" * 100000, 0.0),  # pathological nesting must not crash
    ],
)
def test_score_tool_call_alarm(completion, expected):
    answer, tools = _alarm_item({"hour": 7})
    assert score_tool_call(answer, tools, completion) == expected


def test_score_tool_call_optional_given_must_be_present():
    answer, tools = _alarm_item({"hour": 7, "minute": 30})
    assert score_tool_call(answer, tools, '{"name": "set_alarm", "arguments": {"hour": 7, "minute": 30}}') == 1.0
    assert score_tool_call(answer, tools, '{"name": "set_alarm", "arguments": {"hour": 7}}') == 0.0
    assert score_tool_call(answer, tools, '{"name": "set_alarm", "arguments": {"hour": 7, "minute": 31}}') == 0.0


@pytest.mark.parametrize(
    "completion, expected",
    [
        ('{"name": "set_temperature", "arguments": {"degrees": 20}}', 1.0),
        ('{"name": "set_temperature", "arguments": {"degrees": 20.0}}', 1.0),  # 20 and 20.0 agree for float
        ('{"name": "set_temperature", "arguments": {"degrees": 2e1}}', 1.0),
        ('{"name": "set_temperature", "arguments": {"degrees": "20"}}', 0.0),
        ('{"name": "set_temperature", "arguments": {"degrees": 20.5}}', 0.0),
        ('{"name": "set_temperature", "arguments": {"degrees": NaN}}', 0.0),
        ('{"name": "set_temperature", "arguments": {"degrees": false}}', 0.0),
    ],
)
def test_score_tool_call_float_param(completion, expected):
    answer, tools = _temp_item({"degrees": 20})
    assert score_tool_call(answer, tools, completion) == expected


def test_score_tool_call_string_values_exact():
    answer = {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}
    tools = [TOOLS["get_weather"].schema()]
    ok = json.dumps(answer)
    assert score_tool_call(answer, tools, ok) == 1.0
    assert score_tool_call(answer, tools, ok.replace("Oslo", "oslo")) == 0.0
    assert score_tool_call(answer, tools, ok.replace('"celsius"', "1")) == 0.0


def test_tool_problem_shape():
    for item in get_task("synthetic_tool_use").items("train", 300):
        offered = [tool["name"] for tool in item.meta["tools"]]
        assert 2 <= len(offered) <= 4 and len(set(offered)) == len(offered)
        assert item.answer["name"] in offered
        assert any(not p["required"] for tool in item.meta["tools"] for p in tool["params"])
        assert item.prompt_text.endswith("\nCall:")


def test_task_score_never_raises_on_garbage():
    garbage = ["", "####", "{", "}}", "\x00", "#### x", '{"name": null, "arguments": null}', "9" * 5000]
    for name in TASKS:
        task = get_task(name)
        item = task.items("eval", 1)[0]
        for text in garbage:
            assert task.score(item, text) == 0.0


def test_items_have_unique_ids():
    for name in TASKS:
        items = get_task(name).items("train", 100)
        assert len({i.id for i in items}) == 100
        assert all(isinstance(i, TaskItem) and i.task in ("math", "tool_use") for i in items)
