"""Synthetic demo tasks: a toy math and tool-use world that a tiny model learns on a CPU in minutes.

Both tasks are seeded and unlimited, use plain-text prompts (no chat template) and have exact
scorers that never raise on malformed output.

* ``synthetic_math``: 2-3 step arithmetic word problems with small numbers (all values 0..12)::

      Q: Ann has 5 pens. Ann finds 3. Ann loses 2. How many pens does Ann have?
      A: 5 + 3 = 8. 8 - 2 = 6. #### 6

  Scored on the number after ``####``.
* ``synthetic_tool_use``: a request plus 2-4 tool signatures; the answer is one JSON call::

      Tools: play_music(song: str, volume?: int); get_weather(city: str, unit?: str)
      User: play jazz at volume 4
      Call: {"name": "play_music", "arguments": {"song": "jazz", "volume": 4}}

  Scored BFCL-style: name and arguments must match with type awareness (see ``score_tool_call``).

Splits are disjoint by construction: a problem belongs to "eval" when a stable hash of its prompt
falls in the eval bucket, otherwise to "train"; each split's stream rejects the other's problems.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from opdplus.tasks.base import TaskItem, register_task

SPLITS = ("train", "eval")
EVAL_BUCKETS = 5  # one problem in EVAL_BUCKETS belongs to the eval split
MAX_VALUE = 12  # every number in a math problem (inputs, intermediates, answer) is in 0..MAX_VALUE
MAX_AMOUNT = 5  # the amount added or removed in one step is in 1..MAX_AMOUNT


def split_of(prompt: str) -> str:
    """The split a problem belongs to, from a stable hash of its prompt text."""
    digest = hashlib.sha256(prompt.encode()).digest()
    return "eval" if digest[0] % EVAL_BUCKETS == 0 else "train"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


def _stream(split: str, seed: int, name: str, make: Callable[[random.Random], TaskItem]) -> Iterator[TaskItem]:
    """Unlimited items of ``split``: draw problems from a seeded generator, keep those in the split."""
    _check_split(split)
    rng = random.Random(f"{name}/{split}/{seed}")
    while True:
        item = make(rng)
        if split_of(item.prompt_text) == split:
            yield item


def _take(stream: Iterator[TaskItem], n: int, split: str, seed: int) -> list[TaskItem]:
    items = []
    for i, item in zip(range(n), stream):
        items.append(
            TaskItem(
                id=f"{item.task}-{split}-{seed}-{i}",
                task=item.task,
                prompt=item.prompt,
                answer=item.answer,
                meta=item.meta,
            )
        )
    return items


# ----------------------------------------------------------------------------------------------
# Math
# ----------------------------------------------------------------------------------------------

MATH_NAMES = ("Ann", "Bob", "Tom", "Sue", "Max", "Eva")
MATH_OBJECTS = ("apples", "pens", "cards", "coins", "eggs")
MATH_GAIN_VERBS = ("gets", "finds", "buys")
MATH_LOSS_VERBS = ("loses", "gives away", "uses")
MATH_PROMPT_PREFIX = "Q: "
MATH_PROMPT_SUFFIX = "\nA:"


def make_math_problem(rng: random.Random) -> TaskItem:
    """One word problem: a start value and 2-3 steps of + or -, every value within 0..MAX_VALUE."""
    name, obj = rng.choice(MATH_NAMES), rng.choice(MATH_OBJECTS)
    value = rng.randint(1, 9)
    sentences = [f"{name} has {value} {obj}."]
    steps = []
    for _ in range(rng.randint(2, 3)):
        can_add = value + 1 <= MAX_VALUE
        if can_add and (value == 0 or rng.random() < 0.5):
            amount = rng.randint(1, min(MAX_AMOUNT, MAX_VALUE - value))
            sentences.append(f"{name} {rng.choice(MATH_GAIN_VERBS)} {amount}.")
            steps.append(f"{value} + {amount} = {value + amount}.")
            value += amount
        else:
            amount = rng.randint(1, min(MAX_AMOUNT, value))
            sentences.append(f"{name} {rng.choice(MATH_LOSS_VERBS)} {amount}.")
            steps.append(f"{value} - {amount} = {value - amount}.")
            value -= amount
    sentences.append(f"How many {obj} does {name} have?")
    prompt = MATH_PROMPT_PREFIX + " ".join(sentences) + MATH_PROMPT_SUFFIX
    solution = " " + " ".join(steps) + f" #### {value}"
    return TaskItem(id="", task="math", prompt=prompt, answer=value, meta={"solution": solution})


_FINAL_ANSWER = re.compile(r"####\s*(-?\d+(?:\.\d+)?)")


def extract_final_answer(completion: object) -> float | None:
    """The number after the first ``####``, or None when there is none (or ``completion`` is not a string)."""
    match = _FINAL_ANSWER.search(completion) if isinstance(completion, str) else None
    return float(match.group(1)) if match else None


def score_math(answer: int | float, completion: str) -> float:
    """1.0 when the number after ``####`` equals ``answer``, else 0.0."""
    value = extract_final_answer(completion)
    return float(value is not None and math.isclose(value, float(answer), abs_tol=1e-9))


class SyntheticMathTask:
    name = "synthetic_math"

    def items(self, split: str, n: int, seed: int = 0) -> list[TaskItem]:
        return _take(_stream(split, seed, self.name, make_math_problem), n, split, seed)

    def score(self, item: TaskItem, completion: str) -> float:
        return score_math(item.answer, completion)


# ----------------------------------------------------------------------------------------------
# Tool use
# ----------------------------------------------------------------------------------------------

PARAM_TYPES: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "float": (int, float)}


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # "str" | "int" | "float"
    required: bool = True

    def signature(self) -> str:
        return f"{self.name}{'' if self.required else '?'}: {self.type}"


@dataclass(frozen=True)
class Tool:
    name: str
    params: tuple[Param, ...]

    def signature(self) -> str:
        return f"{self.name}({', '.join(p.signature() for p in self.params)})"

    def schema(self) -> dict[str, Any]:
        """The tool as a plain dict (also what a scorer needs)."""
        return {
            "name": self.name,
            "params": [{"name": p.name, "type": p.type, "required": p.required} for p in self.params],
        }


CITIES = ("Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo")
UNITS = ("celsius", "fahrenheit")
CONTACTS = ("Bob", "Ann", "Max", "Eva")
MESSAGES = ("hi", "thanks", "later", "yes", "no")
SONGS = ("jazz", "rock", "blues", "pop")
ROOMS = ("kitchen", "bedroom", "office")

TOOLS: dict[str, Tool] = {
    tool.name: tool
    for tool in (
        Tool("get_weather", (Param("city", "str"), Param("unit", "str", required=False))),
        Tool("set_alarm", (Param("hour", "int"), Param("minute", "int", required=False))),
        Tool("send_message", (Param("to", "str"), Param("text", "str"))),
        Tool("play_music", (Param("song", "str"), Param("volume", "int", required=False))),
        Tool("set_temperature", (Param("degrees", "float"), Param("room", "str", required=False))),
    )
}


def _request_get_weather(rng: random.Random) -> tuple[str, dict[str, Any]]:
    city = rng.choice(CITIES)
    if rng.random() < 0.5:
        return f"weather in {city}", {"city": city}
    unit = rng.choice(UNITS)
    return f"weather in {city} in {unit}", {"city": city, "unit": unit}


def _request_set_alarm(rng: random.Random) -> tuple[str, dict[str, Any]]:
    hour = rng.randint(1, 12)
    if rng.random() < 0.5:
        return f"alarm at {hour}", {"hour": hour}
    minute = rng.choice((10, 15, 20, 30, 45))
    return f"alarm at {hour} {minute}", {"hour": hour, "minute": minute}


def _request_send_message(rng: random.Random) -> tuple[str, dict[str, Any]]:
    to, text = rng.choice(CONTACTS), rng.choice(MESSAGES)
    return f"tell {to} {text}", {"to": to, "text": text}


def _request_play_music(rng: random.Random) -> tuple[str, dict[str, Any]]:
    song = rng.choice(SONGS)
    if rng.random() < 0.5:
        return f"play {song}", {"song": song}
    volume = rng.randint(1, 9)
    return f"play {song} at volume {volume}", {"song": song, "volume": volume}


def _request_set_temperature(rng: random.Random) -> tuple[str, dict[str, Any]]:
    degrees = rng.choice((18, 19, 20, 21, 22, 18.5, 20.5, 21.5))
    if rng.random() < 0.5:
        return f"heat to {degrees}", {"degrees": degrees}
    room = rng.choice(ROOMS)
    return f"heat {room} to {degrees}", {"degrees": degrees, "room": room}


REQUESTS: dict[str, Callable[[random.Random], tuple[str, dict[str, Any]]]] = {
    "get_weather": _request_get_weather,
    "set_alarm": _request_set_alarm,
    "send_message": _request_send_message,
    "play_music": _request_play_music,
    "set_temperature": _request_set_temperature,
}
TOOL_PROMPT_SUFFIX = "\nCall:"


def format_call(name: str, arguments: dict[str, Any]) -> str:
    return json.dumps({"name": name, "arguments": arguments})


def make_tool_problem(rng: random.Random) -> TaskItem:
    """One request, the target tool among 1-3 distractors (shuffled), and the expected call."""
    target = rng.choice(sorted(TOOLS))
    request, arguments = REQUESTS[target](rng)
    distractors = rng.sample([name for name in sorted(TOOLS) if name != target], rng.randint(1, 3))
    offered = [target, *distractors]
    rng.shuffle(offered)
    tools = [TOOLS[name] for name in offered]
    prompt = "Tools: " + "; ".join(tool.signature() for tool in tools) + f"\nUser: {request}" + TOOL_PROMPT_SUFFIX
    answer = {"name": target, "arguments": arguments}
    return TaskItem(
        id="",
        task="tool_use",
        prompt=prompt,
        answer=answer,
        meta={"tools": [tool.schema() for tool in tools], "solution": " " + format_call(target, arguments)},
    )


def _type_ok(value: Any, type_name: str) -> bool:
    """BFCL-style type check: bool is never a number; an int is a valid float."""
    return not isinstance(value, bool) and isinstance(value, PARAM_TYPES[type_name])


def _value_ok(value: Any, expected: Any, type_name: str) -> bool:
    if not _type_ok(value, type_name):
        return False
    if type_name == "float":
        return math.isclose(float(value), float(expected), rel_tol=0, abs_tol=1e-9)
    return value == expected


def score_tool_call(answer: dict[str, Any], tools: list[dict[str, Any]], completion: str) -> float:
    """1.0 when ``completion`` is exactly one JSON object ``{"name": ..., "arguments": {...}}`` that calls
    ``answer["name"]`` with matching arguments, else 0.0.

    Arguments match when: every required parameter is present; every key is a parameter of the tool
    (extra keys score 0); every value has the declared type (int for int, int or float for float,
    str for str; bools are not numbers) and equals the expected value (floats compared numerically,
    so 5 and 5.0 agree). An optional parameter the request did not ask for may be omitted (and must
    be: an argument the request never gave is a hallucination and scores 0).
    Never raises: malformed output scores 0.
    """
    try:
        call = json.loads(completion)
    except (TypeError, ValueError, RecursionError):
        return 0.0
    if not isinstance(call, dict) or set(call) != {"name", "arguments"}:
        return 0.0
    if call["name"] != answer["name"] or not isinstance(call["arguments"], dict):
        return 0.0
    schema = next((tool for tool in tools if tool["name"] == answer["name"]), None)
    if schema is None:
        return 0.0
    params = {p["name"]: p for p in schema["params"]}
    arguments, expected = call["arguments"], answer["arguments"]
    if any(key not in params for key in arguments):
        return 0.0
    for name, param in params.items():
        if name not in arguments:
            if param["required"] or name in expected:
                return 0.0
            continue
        if name not in expected or not _value_ok(arguments[name], expected[name], param["type"]):
            return 0.0
    return 1.0


class SyntheticToolUseTask:
    name = "synthetic_tool_use"

    def items(self, split: str, n: int, seed: int = 0) -> list[TaskItem]:
        return _take(_stream(split, seed, self.name, make_tool_problem), n, split, seed)

    def score(self, item: TaskItem, completion: str) -> float:
        return score_tool_call(item.answer, item.meta["tools"], completion)


def solution_of(item: TaskItem) -> str:
    """The reference completion (text after the prompt) for a synthetic item."""
    return item.meta["solution"]


register_task("synthetic_math", SyntheticMathTask)
register_task("synthetic_tool_use", SyntheticToolUseTask)
