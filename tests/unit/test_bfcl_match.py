"""The BFCL call parser and AST matcher: hand-written cases for every rule, then real BFCL v4 items
checked against BFCL's own checker (the reference twin in tests/bfcl_reference.py)."""

from __future__ import annotations

import copy
import importlib.util
import random
import sys
from pathlib import Path

import pytest

from opdplus.tasks.bfcl_match import format_calls, match_calls, normalize_string, parse_calls, reference_calls

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TRIANGLE = {
    "name": "calc.area",
    "parameters": {
        "type": "dict",
        "properties": {
            "base": {"type": "integer"},
            "height": {"type": "float"},
            "unit": {"type": "string"},
            "exact": {"type": "boolean"},
        },
        "required": ["base", "height"],
    },
}
TRIANGLE_ANSWER = [{"calc.area": {"base": [10], "height": [5.0], "unit": ["units", "cm", ""], "exact": [True, ""]}}]
WEATHER = {
    "name": "weather",
    "parameters": {
        "type": "dict",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"],
    },
}
LISTS = {
    "name": "stats",
    "parameters": {
        "type": "dict",
        "properties": {
            "values": {"type": "array", "items": {"type": "integer"}},
            "options": {"type": "dict", "properties": {}},
            "rows": {"type": "array", "items": {"type": "dict"}},
            "pair": {"type": "tuple", "items": {"type": "string"}},
        },
        "required": ["values"],
    },
}
LISTS_ANSWER = [
    {
        "stats": {
            "values": [[1, 2, 3]],
            "options": [{"mode": ["Fast", "quick"], "depth": [2, ""]}, ""],
            "rows": [[{"a": [1]}, {"a": [2]}], ""],
            "pair": [["New York", "LA"], ""],
        }
    }
]


def simple(text: str) -> tuple[bool, str]:
    return match_calls([TRIANGLE], parse_calls(text), TRIANGLE_ANSWER, "simple_python")


# --- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "[calc.area(base=10, height=5.0)]",
        "calc.area(base=10, height=5.0)",
        '[{"name": "calc.area", "arguments": {"base": 10, "height": 5.0}}]',
        '{"name": "calc.area", "parameters": {"base": 10, "height": 5.0}}',
        '{"function": "calc.area", "parameters": {"base": 10, "height": 5.0}}',
        '{"function": {"name": "calc.area", "arguments": "{\\"base\\": 10, \\"height\\": 5.0}"}}',
        '{"calc.area": {"base": 10, "height": 5.0}}',
        '```json\n[{"name": "calc.area", "arguments": {"base": 10, "height": 5.0}}]\n```',
        '<tool_call>\n{"name": "calc.area", "arguments": {"base": 10, "height": 5.0}}\n</tool_call>',
        "<TOOLCALL>[calc.area(base=10, height=5.0)]</TOOLCALL>",
        "Sure! Here is the call: [calc.area(base=10, height=5.0)]",
    ],
)
def test_parse_syntaxes(text):
    assert parse_calls(text) == [{"calc.area": {"base": 10, "height": 5.0}}]


def test_parse_several_calls_and_values():
    calls = parse_calls("[f(a=(1, 2), b=-3, c=None, d={'k': [1]}), g.h(x=some_var, y='s')]")
    assert calls == [{"f": {"a": [1, 2], "b": -3, "c": None, "d": {"k": [1]}}}, {"g.h": {"x": "some_var", "y": "s"}}]
    tagged = (
        '<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "g", "arguments": {}}</tool_call>'
    )
    assert parse_calls(tagged) == [{"f": {}}, {"g": {}}]


@pytest.mark.parametrize(
    "text", ["[calc.area(base=10, height=", "calc.area(10, 5)", '{"name": "f", "arguments": [1]}', "[1, 2]"]
)
def test_parse_malformed_is_none(text):
    assert parse_calls(text) is None


@pytest.mark.parametrize("text", ["", "   ", "I cannot help with that", "The area is 25 square units"])
def test_parse_no_call_is_empty(text):
    assert parse_calls(text) == []


# --- matching rules --------------------------------------------------------------------------


def test_exact_and_optional_params():
    assert simple("[calc.area(base=10, height=5.0)]") == (True, "")  # optional unit/exact omitted
    assert simple("[calc.area(base=10, height=5.0, unit='cm', exact=True)]")[0]
    assert simple("[calc.area(base=10, height=5.0, unit='units')]")[0]  # one of several values


def test_required_missing_and_unexpected_param():
    ok, why = simple("[calc.area(base=10)]")
    assert not ok and "missing required" in why
    ok, why = simple("[calc.area(base=10, height=5.0, color='red')]")
    assert not ok and "unexpected parameter" in why


def test_answer_param_missing_that_is_not_optional():
    answer = [{"weather": {"city": ["Paris"], "days": [3]}}]  # days required by the answer, not the schema
    assert not match_calls([WEATHER], parse_calls("weather(city='Paris')"), answer, "simple_python")[0]
    assert match_calls([WEATHER], parse_calls("weather(city='Paris', days=3)"), answer, "simple_python")[0]


def test_param_in_schema_but_not_in_answer_is_rejected():
    answer = [{"weather": {"city": ["Paris"]}}]
    assert not match_calls([WEATHER], parse_calls("weather(city='Paris', days=3)"), answer, "simple_python")[0]


def test_types():
    assert simple("[calc.area(base=10, height=5)]")[0]  # int accepted for float
    ok, why = simple("[calc.area(base=10.0, height=5.0)]")  # float not accepted for integer
    assert not ok and "wrong type" in why
    assert not simple("[calc.area(base='10', height=5.0)]")[0]
    assert not simple("[calc.area(base=10, height=5.0, exact=1)]")[0]  # bool is not int
    assert not simple("[calc.area(base=True, height=5.0)]")[0]  # and int is not bool


def test_wrong_value_and_string_normalisation():
    ok, why = simple("[calc.area(base=11, height=5.0)]")
    assert not ok and "wrong value" in why
    assert simple("[calc.area(base=10, height=5.0, unit='C.M ')]")[0]  # case, spaces, punctuation ignored
    assert not simple("[calc.area(base=10, height=5.0, unit='mm')]")[0]
    assert normalize_string("New York, NY") == "newyorkny"
    assert normalize_string("It's") == 'it"s'


def test_lists_dicts_and_tuples():
    lists = lambda text: match_calls([LISTS], parse_calls(text), LISTS_ANSWER, "simple_python")[0]  # noqa: E731
    assert lists("stats(values=[1, 2, 3])")
    assert not lists("stats(values=[3, 2, 1])")  # list order matters
    assert not lists("stats(values=[1, 2, '3'])")  # item types are checked
    assert lists("stats(values=[1, 2, 3], options={'mode': 'QUICK'})")  # dict: optional key omitted
    assert lists("stats(values=[1, 2, 3], options={'mode': 'fast', 'depth': 2})")
    assert not lists("stats(values=[1, 2, 3], options={'depth': 2})")  # required dict key missing
    assert not lists("stats(values=[1, 2, 3], options={'mode': 'fast', 'extra': 1})")
    assert lists("stats(values=[1, 2, 3], rows=[{'a': 1}, {'a': 2}])")
    assert not lists("stats(values=[1, 2, 3], rows=[{'a': 2}, {'a': 1}])")
    assert lists("stats(values=[1, 2, 3], pair=('new york', 'LA'))")  # tuple -> list, strings normalised


def test_variable_reference_accepted_when_answer_uses_one():
    function = {
        "name": "f",
        "parameters": {"type": "dict", "properties": {"x": {"type": "integer"}}, "required": ["x"]},
    }
    answer = [{"f": {"x": ["n"]}}]  # the answer refers to a variable by name
    assert match_calls([function], parse_calls("f(x=n)"), answer, "simple_python")[0]
    assert not match_calls([function], parse_calls("f(x=m)"), answer, "simple_python")[0]


def test_no_call_malformed_wrong_function_extra_calls():
    assert simple("The area is 25.") == (False, "no function call")
    assert simple("[calc.area(base=10, height=") == (False, "malformed output")
    ok, why = simple("[calc.volume(base=10, height=5.0)]")
    assert not ok and "wrong function" in why
    ok, why = simple("[calc.area(base=10, height=5.0), calc.area(base=10, height=5.0)]")
    assert not ok and "wrong number of calls" in why


def test_multiple_picks_the_expected_function():
    answer = [{"weather": {"city": ["Paris"], "days": [3, ""]}}]
    assert match_calls([TRIANGLE, WEATHER], parse_calls("weather(city='paris')"), answer, "multiple")[0]
    assert not match_calls([TRIANGLE, WEATHER], parse_calls("calc.area(base=10, height=5.0)"), answer, "multiple")[0]


def test_parallel_is_order_free_but_counts_calls():
    answer = [{"weather": {"city": ["Paris"], "days": [""]}}, {"weather": {"city": ["Rome"], "days": [2]}}]
    both = "[weather(city='Rome', days=2), weather(city='Paris')]"
    assert match_calls([WEATHER], parse_calls(both), answer, "parallel")[0]
    assert not match_calls([WEATHER], parse_calls("[weather(city='Rome', days=2)]"), answer, "parallel")[0]
    extra = both[:-1] + ", weather(city='Oslo')]"
    assert not match_calls([WEATHER], parse_calls(extra), answer, "parallel")[0]
    twice = "[weather(city='Rome', days=2), weather(city='Rome', days=2)]"  # one call cannot serve two answers
    assert not match_calls([WEATHER], parse_calls(twice), answer, "parallel")[0]


def test_parallel_matching_does_not_depend_on_candidate_order():
    # Answer 0 accepts both calls, answer 1 only the first: a greedy pass that gives the first call
    # to answer 0 fails; a full matching succeeds.
    answer = [{"weather": {"city": ["Paris", "Rome"]}}, {"weather": {"city": ["Paris"]}}]
    calls = parse_calls("[weather(city='Paris'), weather(city='Rome')]")
    assert match_calls([WEATHER], calls, answer, "parallel")[0]


def test_parallel_multiple_mixes_functions():
    answer = [{"calc.area": {"base": [1], "height": [2.0]}}, {"weather": {"city": ["Oslo"]}}]
    text = "[weather(city='Oslo'), calc.area(base=1, height=2)]"
    assert match_calls([TRIANGLE, WEATHER], parse_calls(text), answer, "parallel_multiple")[0]
    swapped = "[weather(city='Oslo'), calc.area(base=2, height=1)]"
    assert not match_calls([TRIANGLE, WEATHER], parse_calls(swapped), answer, "parallel_multiple")[0]


# --- real BFCL v4 items against BFCL's own checker -------------------------------------------


def _first(value):
    if isinstance(value, dict):
        return {k: _first(v[0]) for k, v in value.items() if v and v[0] != ""}
    if isinstance(value, list) and value and all(isinstance(d, dict) for d in value):
        return [_first(d) for d in value]
    return value


def _calls_from_answer(answer, rng):
    calls = []
    for call in answer:
        ((name, params),) = call.items()
        args = {k: _first(rng.choice(v)) for k, v in params.items() if v}
        calls.append({name: {k: v for k, v in args.items() if v != ""}})
    return calls


def _mutate(calls, rng):
    calls = copy.deepcopy(calls)
    i = rng.randrange(len(calls))
    ((name, args),) = calls[i].items()
    kind = rng.choice(["drop", "value", "str", "extra", "name", "shuffle", "missing"])
    keys = sorted(args)
    if kind == "drop" and keys:
        del args[rng.choice(keys)]
    elif kind == "value" and keys:
        k = rng.choice(keys)
        v = args[k]
        args[k] = (not v) if isinstance(v, bool) else v + 1 if isinstance(v, (int, float)) else f"{v}x"
    elif kind == "str" and keys:
        k = rng.choice(keys)
        args[k] = str(args[k])
    elif kind == "extra":
        calls.append(copy.deepcopy(calls[i]))
    elif kind == "name":
        calls[i] = {name + "_v2": args}
    elif kind == "shuffle":
        rng.shuffle(calls)
    elif kind == "missing" and len(calls) > 1:
        calls.pop(i)
    return calls


def test_real_items_agree_with_bfcl_reference_checker():
    if importlib.util.find_spec("bfcl_eval") is None:
        pytest.skip("optional extra: pip install --no-deps bfcl-eval")
    from bfcl_reference import load_reference_checker

    from opdplus.tasks.bfcl import ToolUseTask

    reference = load_reference_checker()
    rng = random.Random(0)
    task = ToolUseTask()
    items = task.split_items("train") + task.split_items("eval")
    assert len(items) > 1200
    outcomes = {True: 0, False: 0}
    disagreements = []
    for item in items:
        functions, category = item.meta["functions"], item.meta["category"]
        for trial in range(3):
            calls = _calls_from_answer(item.answer, rng)
            if trial:
                calls = _mutate(calls, rng)
            ours = match_calls(functions, calls, item.answer, category)[0]
            outcomes[ours] += 1
            if ours != reference(functions, calls, item.answer, category):
                disagreements.append((item.id, calls))
    assert outcomes[True] > 1000 and outcomes[False] > 500
    # Only allowed difference: BFCL's greedy parallel matching rejects some valid reorderings.
    for item_id, calls in disagreements:
        assert "parallel" in item_id, (item_id, calls)
    assert len(disagreements) <= 5


def test_prose_with_code_is_no_call_not_malformed():
    assert parse_calls("To do this, use math.hypot(x, y) in Python:\n```python\ndef f(x):\n    return x\n```") == []
    assert parse_calls("<tool_call>[f(a=</tool_call>") is None


def test_reference_calls_round_trip_through_the_parser():
    answer = [{"f": {"a": [1, 2], "b": ["", "x"], "c": [{"k": ["v"], "opt": [""]}]}}, {"g": {}}]
    calls = reference_calls(answer)
    assert calls == [{"f": {"a": 1, "c": {"k": "v"}}}, {"g": {}}]
    assert format_calls(calls) == "[f(a=1, c={'k': 'v'}), g()]"
    assert parse_calls(format_calls(calls)) == calls


def test_every_real_item_solution_is_correct_but_bfcls_own_inconsistent_answers():
    if importlib.util.find_spec("bfcl_eval") is None:
        pytest.skip("optional extra: pip install --no-deps bfcl-eval")
    from opdplus.tasks.bfcl import ToolUseTask

    task = ToolUseTask()
    items = task.split_items("train") + task.split_items("eval")
    wrong = sorted(item.id for item in items if task.score(item, item.meta["solution"]) != 1.0)
    # ground truths that BFCL's own rules reject (a required parameter absent, an empty list where one is needed)
    assert wrong == ["live_simple_106-63-0", "live_simple_112-68-0", "parallel_multiple_26", "simple_python_200"]
